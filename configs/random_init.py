"""Random-init control (Blayney et al. 2026): a 12-layer looped block with no prelude or coda,
evaluated at initialisation (`python -m eval --init`), for injection none|concat, norm
pre|sandwich|peri and seeds 0, 1, 2.

  python -m eval --config configs/random_init.py:concat,sandwich,0 --init --workdir runs/ri-concat-sandwich-s0

The argument after ':' is "INJECTION,NORM,SEED" (default "none,pre,0"); configs/sweeps/paper_random_init.py
runs the whole grid.
"""

import ml_collections

from configs.base import get_config as base_config


def get_config(arg: str = "none,pre,0") -> ml_collections.ConfigDict:
  injection, norm, seed = (arg.split(",") + ["", "", ""])[:3]
  c = base_config()
  c.task.name, c.task.train_length, c.task.test_lengths = "prefix_or", 32, ()
  c.model.update(d_model=256, n_heads=4, d_ff=1024, max_len=32, n_prelude=0, block_size=12, n_coda=0,
                 injection=injection or "none", norm=norm or "pre", attention="full",
                 positions="rope", state_init="embed", init_std=0.0, embed_std=1.0)
  c.train.update(steps=0, seed=int(seed or 0), recurrence="fixed", mean_recurrence=8,
                 eval_batch_size=8)
  return c
