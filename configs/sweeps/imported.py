"""Evaluation trials over an existing model — an imported Huginn / Raven checkpoint or any trained
run — without training it: every trial starts from that run's newest parameters
(`train.init_from`, `train.steps = 0`) and evaluates them under its own settings.

  python -m convert from-raven ~/huginn --out runs/huginn
  python -m sweeps --config configs/sweeps/imported.py:runs/huginn --workdir runs \
      [--config.task.path=data/shakespeare --config.task.name=text ...]

The axes: the analysis length R and the path-independence check's random starts.
"""

from rundir.run import load_run_config


def get_config(run: str = "runs/huginn"):
  c = load_run_config(run)
  c.train.update(init_from=run, steps=0)
  c.eval.update(halting=False)
  c.wandb.update(group="", name="", tags=())
  return c


def get_hyper(h):
  return h.product([h.sweep("eval.iterations", [32, 128]), h.sweep("eval.path_starts", [0, 3])])
