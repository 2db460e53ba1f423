"""Where peri's per-iteration norm sits, at random init: concat + peri with `model.peri_norm` state |
input x init_std 1/sqrt(fan_in) | 0.02 x seeds 0, 1, 2 (12 trials of configs/random_init.py, about
7 minutes on 2 CPU cores). Findings: docs/regime_map.md.

  python -m sweeps --config configs/sweeps/peri_order.py --workdir runs
"""

from configs.random_init import get_config as random_init_config


def get_config():
  c = random_init_config("concat,peri,0")
  c.eval.update(iterations=128, batch_size=4, halting=False)
  return c


def get_hyper(h):
  return h.product([
      h.sweep("model.peri_norm", ["state", "input"]),
      h.sweep("model.init_std", [0.0, 0.02]),
      h.sweep("train.seed", [0, 1, 2]),
  ])
