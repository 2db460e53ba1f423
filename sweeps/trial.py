"""One trial = train (skipped when train.steps = 0: the random-init control) + fixed-point evaluation
+ adaptive halting (`eval.halting`).

Run by the sweep runner as `python -m sweeps.trial WORKDIR` with the trial's config as JSON on stdin,
so that a crash, an out-of-memory kill or a NaN stays inside the trial. Exit status: 0 done, 2 bad
input, 3 diverged, 128+signal interrupted (checkpoint saved), anything else a crash.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections


def run_trial(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> tuple[int, dict]:
  from eval.evaluate import evaluate
  from train.trainer import Trainer

  if cfg.train.steps > 0:
    result = Trainer(cfg, workdir).run()
    if result["status"] != "done":
      return result["exit_code"], result
  predictions: dict = {}  # the accuracy curves' per-iteration predictions: the halting oracle's too
  summary = evaluate(cfg, workdir, init=cfg.train.steps == 0, progress=progress, predictions=predictions)
  # The savings of adaptive halting, per trial (measured against exact match: synthetic tasks).
  if cfg.eval.halting and cfg.train.steps > 0 and cfg.task.name != "text":
    from eval.halting import halting_summary
    summary.update(halting_summary(cfg, workdir, trajectories=predictions, progress=progress))
  return 0, summary


def main() -> int:
  from absl import logging

  from configs.errors import ConfigError
  from eval.fixed_points import TrajectoryError
  from train.workdir import RunDirError

  logging.set_verbosity(logging.WARNING)
  workdir = sys.argv[1]
  import jax
  # Trials of one sweep share compiled programs (same shapes across seeds, reruns after a stop).
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.dirname(os.path.abspath(workdir)), ".jax_cache"))
  try:
    cfg = ml_collections.ConfigDict(json.load(sys.stdin))
    code, result = run_trial(cfg, workdir, progress=False)
  except (ConfigError, RunDirError, TrajectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if code == 3:
    print(f"error: {result.get('error')}", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
