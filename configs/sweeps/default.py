"""The main job: recurrent block size x injection x norm on prefix_or, 2 seeds per cell, small enough
for 2 CPU cores (`make run`, two trials at a time: 13 minutes on a 2-core VM, measured 2026-12-02;
see bench/RESULTS.md, section sweep_walltime_default_p2).

  python -m sweeps --config configs/sweeps/default.py

27 cells x 2 seeds = 54 trials; each trains a (1, k⊗r, 1) model, d=32, on prefix_or of size 8 with a
local window, then evaluates its fixed points over 48 iterations, its accuracy at sizes 8 and 32 and
what adaptive halting saves. The seeds of a cell compile the same programs, which the trials share
through JAX's persistent compilation cache in runs/default/.jax_cache: the runner starts a cell's second
seed after its first (sweeps/runner.py:next_trial), not beside it.
"""

from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.task.train_length, c.task.test_lengths = 8, (32,)
  c.model.update(d_model=32, n_heads=2, d_ff=64, max_len=32, n_prelude=1, n_coda=1, window=3)
  c.train.update(steps=100, batch_size=32, lr=3e-3, warmup=20, recurrence="uniform", eval_every=-1,
                 min_recurrence=2, max_recurrence=6, mean_recurrence=4, log_every=20,
                 checkpoint_every=50, eval_batch_size=64)
  c.eval.update(iterations=48, batch_size=4)
  return c


def get_hyper(h):
  return h.product([
      h.sweep("model.block_size", [1, 2, 4]),
      h.sweep("model.injection", ["none", "add", "concat"]),
      h.sweep("model.norm", ["pre", "sandwich", "peri"]),
      h.sweep("train.seed", [0, 1]),
  ])
