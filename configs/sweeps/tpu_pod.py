"""A looped language model at pod scale (every worker of a TPU slice runs the same command), for a
v5e-256 or a v5p-128 slice (checked ahead of time: bench/RESULTS.md, "Pod presets"):

  .venv-tpu/bin/python -m sweeps --config configs/sweeps/tpu_pod.py --topology v5e-256 --dry-run \
      --config.model.vocab_size=65536                     # the preflight, on any machine
  python -m sweeps --config configs/sweeps/tpu_pod.py --workdir gs://BUCKET/runs \
      --config.task.path=/data/corpus                     # on every worker of the slice

d = 1024, 16 heads, gated-SiLU MLP of 4096, (2, 4⊗r, 2), windows of 1024 tokens of a prepared text
corpus (`python -m train.data prepare`; every worker reads its own rows from its local copy of the
corpus, e.g. copied from gs:// with `gcloud storage cp -r` before the run), Huginn's recurrence
sampling (Poisson-log-normal, mean 8, cap 32) with truncated backpropagation through the last 8
iterations, bf16 compute with the recurrent state in float32, per-iteration remat, 2 micro-batches
of the global batch of 256 windows (on v5e-256 each chip's 2 windows are its 2 micro-batches; more
than 2 do not divide them), warmup-stable-decay schedule. The mesh is FSDP 4 × tensor 2
with the remaining devices data-parallel; the work directory (checkpoints, metrics, reports) lives
on Cloud Storage. Injection add | concat × norm sandwich | peri, one seed (4 trials).
"""

from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.task.update(name="text", path="data/corpus", train_length=1024, test_lengths=())
  c.model.update(d_model=1024, n_heads=16, d_ff=4096, mlp="swiglu", max_len=1024, n_prelude=2,
                 block_size=4, n_coda=2, attention="full", injection="concat", norm="sandwich",
                 dtype="bfloat16", state_dtype="float32", remat=True, init_std=0.02, embed_std=0.02)
  c.train.update(steps=20000, batch_size=256, grad_accum=2, lr=4e-4, warmup=1000, schedule="wsd",
                 decay_fraction=0.2, recurrence="poisson_lognormal", mean_recurrence=8,
                 max_recurrence=32, backprop_depth=8, log_every=50, eval_every=1000,
                 checkpoint_every=1000, eval_batch_size=128)
  c.mesh.update(data=-1, fsdp=4, tensor=2)
  c.eval.update(iterations=128, batch_size=16, halting=False)
  return c


def get_hyper(h):
  return h.product([
      h.sweep("model.injection", ["add", "concat"]),
      h.sweep("model.norm", ["sandwich", "peri"]),
  ])
