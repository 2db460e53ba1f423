"""Evaluation trials over an existing model — an imported Huginn / Raven checkpoint or any trained
run — without training it: every trial starts from that run's newest parameters
(`train.init_from`, `train.steps = 0`) and evaluates them under its own settings.

  python -m convert from-raven ~/huginn --out runs/huginn
  python -m sweeps --config configs/sweeps/imported.py:runs/huginn --workdir runs \
      [--config.task.path=data/shakespeare --config.task.name=text ...]

The trials' config is the one the run last ran with: the sweep runner reads it and applies
`over_run`, then the command line's --config.KEY=VALUE (sweeps/expand.py `base_config`).
The axes: the analysis length R and the path-independence check's random starts.
"""

from configs.base import get_config as defaults


def over_run(c, run: str):
  """This sweep's settings over the run's own config `c`."""
  c.train.update(init_from=run, steps=0)
  c.eval.update(halting=False)
  c.wandb.update(group="", name="", tags=())
  return c


def get_config(run: str = "runs/huginn"):
  return over_run(defaults(), run)  # every key, for --config.KEY=VALUE


def get_hyper(h):
  return h.product([h.sweep("eval.iterations", [32, 128]), h.sweep("eval.path_starts", [0, 3])])
