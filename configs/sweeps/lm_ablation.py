"""The trained-model ablation of Blayney et al. 2026 (§5.1, App. E.6) on text, full size.

  make shakespeare                      # or prepare your own corpus and set task.path
  python -m sweeps --config configs/sweeps/lm_ablation.py --workdir runs \
      [--config.task.path=DIR] [--config.mesh.data=-1 ...]

Looped models (p, k⊗4, c) with k ∈ {4, 8, 12} × injection none | concat × with the prelude and coda
(2, k⊗4, 2) or without (0, k⊗4, 0) (the paper's "sandwich layers" are these prelude/coda layers, not
the norm scheme), pre-norm, a constant 4 recurrences, loss on the final latent only; plus the
12-layer feedforward control (0, 12⊗1, 0), marked `eval.control` so the report draws every trial's
stage metrics beside it. 13 trials. Beyond the paper, `lm_ablation_norms.py` adds the norm axis
pre | sandwich | peri.

Size: d = 512, 4 heads, windows of 512 byte tokens, batch 64, 20k steps = 655M tokens per trial (about
130 passes over Shakespeare's 4.8M bytes; for a study of generalisation use a corpus of 1B tokens or
more). Meant for one GPU host or a TPU slice of up to 64 chips (the batch of 64 windows spreads over
the data axis; `--config.model.dtype=bfloat16` on accelerators). On a v5e-16 slice its largest trial
needs `--config.train.grad_accum=2` (at float32: 16.8 of 16 GiB per chip without, 9.2 with; compiled
ahead of time, bench/RESULTS.md, "Pod presets"); `lm_ablation_cpu.py` is the same study at a size
that completes on 2 CPU cores.
"""

from configs.base import get_config as base_config

NORMS = ("pre",)


def get_config():
  c = base_config()
  c.task.update(name="text", path="data/shakespeare", train_length=512, test_lengths=())
  c.model.update(d_model=512, n_heads=4, d_ff=2048, max_len=512, n_prelude=2, block_size=4, n_coda=2,
                 injection="concat", norm="pre", attention="full", positions="rope", mlp="gelu",
                 init_std=0.02, embed_std=0.02)
  c.train.update(steps=20000, batch_size=64, lr=6e-4, warmup=500, recurrence="fixed",
                 mean_recurrence=4, eval_every=-1, checkpoint_every=1000, log_every=100,
                 eval_batch_size=64)
  c.eval.update(iterations=32, batch_size=8, halting=False)
  return c


def get_hyper(h, norms=NORMS):
  looped = h.product([
      h.sweep("model.block_size", [4, 8, 12]),
      h.sweep("model.injection", ["none", "concat"]),
      h.zip([h.sweep("model.n_prelude", [2, 0]), h.sweep("model.n_coda", [2, 0])]),
      h.sweep("model.norm", list(norms)),
  ])
  control = [{"model.block_size": 12, "model.injection": "none", "model.n_prelude": 0,
              "model.n_coda": 0, "model.norm": "pre", "train.mean_recurrence": 1,
              "eval.control": True}]
  return h.chain(control, looped)  # the control first: the looped trials' report compares with it
