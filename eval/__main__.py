"""`python -m eval --workdir runs/NAME` evaluates a trained run's newest checkpoint;
`python -m eval --config FILE --init --workdir runs/NAME` evaluates the model at initialisation.

Writes WORKDIR/fixed_points.json, fixed_points.md and plots/*.png, and logs them to the run's W&B run.
Exit status 2 with one line on stderr for bad input (missing run, corrupt checkpoint, bad config).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trial config (needed with --init).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_INIT = flags.DEFINE_bool("init", False, "Evaluate the model at initialisation (random-init control).")
_ITERS = flags.DEFINE_integer("iterations", None, "R (default: config eval.iterations, else "
                               "max(128, 4 x the training maximum)).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences analysed (default: eval.batch_size).")
_CHUNK = flags.DEFINE_integer("chunk", None, "Iterations per device call (default: eval.chunk).")
_TAU = flags.DEFINE_float("tau", 0.05, "Token-class cosine threshold.")
_RHO = flags.DEFINE_float("rho", 0.9, "Share of the tail that must satisfy a class.")


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  if not _WORKDIR.value:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  from configs.errors import ConfigError
  from eval.evaluate import evaluate, load_run_config
  from eval.fixed_points import TrajectoryError
  from train.workdir import RunDirError

  try:
    if _INIT.value:
      if _CONFIG.value is None:
        raise RunDirError("--init needs --config FILE")
      cfg = _CONFIG.value
    else:
      cfg = load_run_config(_WORKDIR.value)
    summary = evaluate(cfg, _WORKDIR.value, init=_INIT.value, iterations=_ITERS.value,
                       batch_size=_BATCH.value, chunk=_CHUNK.value,
                       thresholds={"tau": _TAU.value, "rho": _RHO.value})
  except (ConfigError, RunDirError, TrajectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{summary['fp/regime']}: degeneracy {summary['fp/degeneracy_min_cosine']:.4f}; "
        f"see {_WORKDIR.value}/fixed_points.md")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
