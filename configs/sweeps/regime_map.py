"""The random-init regime map: where each injection x norm cell of Blayney et al.'s random-init control
converges, across init scale and width.

  python -m sweeps --config configs/sweeps/regime_map.py --workdir runs

The control of configs/random_init.py (a 12-layer block, no prelude or coda, evaluated at
initialisation over R = 128 iterations) over injection none | add | concat | gate x norm pre |
sandwich | peri x hidden-weight std (0.005 ... 0.2 on a log grid, and 0 = 1/sqrt(fan_in)) x embedding
std (0.02, 1) x width (d = 64 with d_ff = 256, d = 256 with d_ff = 1024) x seeds 0, 1, 2: 1008 trials.
The report draws the phase diagram (report_phase.png: per injection x norm cell, the majority regime
and the agreement of the seeds against the weight std and the other axes).

The 42 trials of each injection x norm x width cell differ only in seed and init scales, so they run as
one vmapped group (`eval.vmap_trials`, eval/group.py): one compile per cell, each trial's trajectory
computed once and analysed by the same detector as any evaluation, without per-trial plots, attention
metrics or W&B runs (the sweep report's W&B run holds the map). The same command runs on a GPU.
"""

from configs.random_init import get_config as random_init_config

WEIGHT_STDS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # 0: 1/sqrt(fan_in)


def get_config():
  c = random_init_config()
  c.eval.update(iterations=128, batch_size=4, halting=False, vmap_trials=True)
  return c


def get_hyper(h):
  return h.product([
      h.sweep("model.injection", ["none", "add", "concat", "gate"]),
      h.sweep("model.norm", ["pre", "sandwich", "peri"]),
      h.sweep("model.init_std", list(WEIGHT_STDS)),
      h.sweep("model.embed_std", [0.02, 1.0]),
      h.zip([h.sweep("model.d_model", [64, 256]), h.sweep("model.d_ff", [256, 1024])]),
      h.sweep("train.seed", [0, 1, 2]),
  ])
