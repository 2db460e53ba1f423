"""A run's whole evaluation (a sweep trial's): fixed points, accuracy against iterations and, for a
trained run, the savings of adaptive halting on the same predictions; the run opened once, the
outputs of each under WORKDIR/eval/STEP/, and one W&B record for all of them (`eval.driver`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from eval import plots
from eval.driver import open_evaluation
from eval.evaluate import evaluate
from eval.halting import halting_summary
from rundir.config import resolve


def evaluate_run(cfg: ml_collections.ConfigDict, workdir: str, *, init: bool = False,
                 halting: bool = False, iterations: int | None = None, compare: str | None = None,
                 log_wandb: bool = True, progress: bool = True, formats: tuple[str, ...] = plots.FORMATS,
                 **options: Any) -> dict:
  """`eval.evaluate.evaluate` (`options`: its other arguments), then with `halting` on a trained run
  `eval.halting.halting_summary` on the accuracy curves' predictions (both at R = `iterations`, by
  default the config's; figures in `formats`); returns the summary fields of both (fp/*, acc/* or val/*, halting/*)."""
  cfg = resolve(cfg)
  ev = open_evaluation(cfg, workdir, init=init, defer=True)
  predictions: dict = {}  # the accuracy curves' per-iteration predictions: the halting oracle's too
  summary = evaluate(cfg, workdir, init=init, iterations=iterations, compare=compare,
                     log_wandb=log_wandb, progress=progress, predictions=predictions, formats=formats, ev=ev,
                     **options)
  if halting and not init:
    summary.update(halting_summary(cfg, workdir, iterations=iterations, trajectories=predictions,
                                   progress=progress, log_wandb=log_wandb, formats=formats, ev=ev))
  if ev.main:
    ev.flush()
  return summary
