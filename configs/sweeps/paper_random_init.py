"""Random-init control of Blayney et al. 2026 over all its axes and seeds: a 12-layer block, no
prelude or coda, evaluated at initialisation (train.steps = 0), injection none|concat x norm
pre|sandwich|peri x seeds 0, 1, 2 (18 trials)."""

from configs.random_init import get_config as random_init_config


def get_config():
  c = random_init_config()
  c.eval.update(iterations=128, batch_size=4)
  return c


def get_hyper(h):
  return h.product([
      h.sweep("model.injection", ["none", "concat"]),
      h.sweep("model.norm", ["pre", "sandwich", "peri"]),
      h.sweep("train.seed", [0, 1, 2]),
  ])
