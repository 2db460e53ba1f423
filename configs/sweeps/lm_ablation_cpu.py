"""`lm_ablation.py` at a size that completes on 2 CPU cores (13 trials):

  make shakespeare && python -m sweeps --config configs/sweeps/lm_ablation_cpu.py --workdir runs --parallel 2

(20.5 minutes on a 2-core VM, measured 2026-12-02; bench/RESULTS.md.)

d = 64, 4 heads, windows of 64 bytes, batch 16, 250 steps per trial; R = 32 in the evaluation.
Its losses are far from a converged model's; the point is the whole study, regime grid and stage
comparison with the feedforward control, in one short run.
"""

from configs.sweeps import lm_ablation


def get_config():
  c = lm_ablation.get_config()
  c.task.train_length = 64
  c.model.update(d_model=64, n_heads=4, d_ff=256, max_len=64)
  c.train.update(steps=250, batch_size=16, lr=3e-3, warmup=25, checkpoint_every=125, log_every=25,
                 eval_batch_size=16)
  c.eval.update(iterations=32, batch_size=4)
  return c


def get_hyper(h):
  return lm_ablation.get_hyper(h)
