"""`python -m convert COMMAND ...`, COMMAND one of "from-raven", "to-raven" and "logits": the flags
and the commands of convert/cli.py, bad input one line on stderr and exit status 2 (rundir/cli.py)."""

from __future__ import annotations

from absl import flags

from convert import cli
from rundir.cli import run

FLAGS = cli.define_flags(flags.FLAGS)

if __name__ == "__main__":
  run(lambda argv: cli.command(FLAGS, argv), doc=cli.__doc__)
