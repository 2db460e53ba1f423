"""Random-init control of Blayney et al. 2026 over all its axes and seeds: a 12-layer block, no
prelude or coda, evaluated at initialisation (train.steps = 0), injection none|concat x norm
pre|sandwich|peri x seeds 0, 1, 2 (18 trials).

The paper does not state its init. This preset uses hidden-weight std 0.02 with embedding std 1 at
d = 256, the init of the regime map (configs/sweeps/regime_map.py, docs/regime_map.md) that
reproduces the paper's table best: concat + pre comes out cyclic 3/3 there (as the paper has it),
which at this width it does only at weight std 0.005 to 0.02, and not at 1/sqrt(fan_in) (unconverged
2/3). Measured at this init (2-core CPU, 2026-12-02): none + pre degenerate 3/3, none + sandwich
slider 2/3, none + peri slider 2/3, concat + pre cyclic 3/3, concat + sandwich cyclic 3/3, concat +
peri cyclic 3/3 (the paper: not converged; see docs/regime_map.md on where peri puts its
per-iteration norm). Pass `--config.model.init_std=0` for 1/sqrt(fan_in).
"""

from configs.random_init import get_config as random_init_config


def get_config():
  c = random_init_config()
  c.model.init_std = 0.02
  c.eval.update(iterations=128, batch_size=4)
  return c


def get_hyper(h):
  return h.product([
      h.sweep("model.injection", ["none", "concat"]),
      h.sweep("model.norm", ["pre", "sandwich", "peri"]),
      h.sweep("train.seed", [0, 1, 2]),
  ])
