"""`python -m train --config configs/base.py --workdir runs/NAME [--config.KEY=VALUE ...]`.

Exit status: 0 done; 2 bad input (one line on stderr, nothing written; rundir/cli.py); 3 diverged
(NaN/inf loss); 128+signal after a clean save on SIGTERM/SIGINT.
"""

from __future__ import annotations

import sys

from rundir.host import tune_allocator

tune_allocator()  # before JAX starts its threads

from absl import flags, logging  # noqa: E402

from rundir.cli import command, define_config, require, run  # noqa: E402
from train.trainer import Trainer  # noqa: E402

_CONFIG = define_config("config", "configs/base.py", "Trial config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)  # orbax and jax are chatty at INFO
  command(argv, {None: []})
  require(_WORKDIR)
  result = Trainer(_CONFIG.value, _WORKDIR.value).run()
  status = result.get("status")
  if status == "diverged":
    print(f"error: {result.get('error')}; run marked diverged in {_WORKDIR.value}/status.json",
          file=sys.stderr)
  elif status == "interrupted":
    print(f"interrupted at step {result['step']}; checkpoint saved, rerun the same command to resume",
          file=sys.stderr)
  else:
    summary = {k: v for k, v in result.get("final", result).items()
               if k.endswith(("best_exact_match", "best_loss"))}
    print(f"done at step {result['step']}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
  return result["exit_code"]


if __name__ == "__main__":
  run(main)
