"""The one command-line style and the one error path of every command (docs/design.md, Conventions).

`python -m train`, `eval`, `sweeps`, `convert` and `train.data` read absl flags, with positional
subcommands among them (`python -m eval generate --workdir ...`), and stop on bad input with one line
`error: MESSAGE` on stderr and exit status 2: an unknown or bad flag, a missing one, an unknown
subcommand, extra arguments, or one of the `BAD_INPUT` errors that the work itself raises.

  run(main, also=...)         app.run(main) with this error path; main(argv) -> exit status
  call(main, argv, fv)        the same in this process, on a FlagValues of its own (tests)
  command(argv, commands)     (subcommand, its positional arguments) from main's argv
  require(*flags)             UsageError "--NAME is required" for a flag without a value
  report(e)                   print the one line, return 2
`--help` prints the command's docstring and its flags, and exits 0.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app, flags

from configs.errors import ConfigError
from looped_models.raven import RavenError
from rundir.workdir import RunDirError
from tasks import DataError

OURS = {"configs", "looped_models", "tasks", "rundir", "train", "eval", "convert", "sweeps", "bench"}
HELP = {"-h", "-?", "--help", "--helpshort"}


class UsageError(ValueError):
  """A command line that names no program run: unknown subcommand, missing flag, extra arguments."""


BAD_INPUT: tuple[type[BaseException], ...] = (ConfigError, RunDirError, DataError, RavenError,
                                              UsageError)


def one_line(e: BaseException) -> str:
  """The message of `e` on one line (the lines of a longer one joined with '; ')."""
  return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def report(e: BaseException) -> int:
  """Print `error: MESSAGE` on stderr (one line); the exit status of bad input, 2."""
  print(f"error: {one_line(e)}", file=sys.stderr)
  return 2


def guard(main: Callable[..., int], also: Sequence[type[BaseException]] = ()) -> Callable[..., int]:
  """`main` with the BAD_INPUT errors (and those of `also`) reported as one line, exit status 2."""
  caught = BAD_INPUT + tuple(also)

  @functools.wraps(main)
  def guarded(*args: Any, **kwargs: Any) -> int:
    try:
      return main(*args, **kwargs)
    except caught as e:
      return report(e)
  return guarded


def parse(argv: list[str], fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """The flags of `argv` parsed into `fv`; what is left (the program and the positional arguments).
  A bad or unknown flag: UsageError naming it."""
  try:
    return fv(argv)
  except flags.Error as e:
    raise UsageError(one_line(e)) from None


def print_help(fv: flags.FlagValues, doc: str | None) -> None:
  """The command's docstring, then the flags that the command (not absl or a library) defines."""
  print((doc or "").strip() + "\n\nflags:")
  for module in fv.flags_by_module_dict():
    if module == sys.argv[0] or module.split(".")[0] in OURS:
      print(fv.module_help(module))


def _flags_parser(argv: list[str], doc: str | None) -> list[str]:
  """app.run's flags parser: `--help` prints and exits 0; bad flags are one line and exit 2."""
  words = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if HELP & set(words):
    print_help(flags.FLAGS, doc)
    sys.exit(0)
  try:
    return parse(argv)
  except BAD_INPUT as e:
    sys.exit(report(e))


def run(main: Callable[[list[str]], int], *, also: Sequence[type[BaseException]] = (),
        doc: str | None = None) -> None:
  """Run `main(argv)` as the program (app.run on the global flags), exit with what it returns; bad
  input anywhere (BAD_INPUT or `also`) is one line and exit status 2. `doc`: what `--help` prints
  before the flags (default: the docstring of the module run as __main__)."""
  doc = sys.modules["__main__"].__doc__ if doc is None else doc
  app.run(guard(main, also), flags_parser=functools.partial(_flags_parser, doc=doc))


def call(main: Callable[[list[str]], int], argv: list[str], fv: flags.FlagValues,
         also: Sequence[type[BaseException]] = ()) -> int:
  """`run` in this process: `argv` (the program first) parsed into `fv`, then `main(rest)`; the exit
  status (bad input: one line on stderr, 2)."""
  return guard(lambda: main(parse(argv, fv)), also)()


def command(argv: Sequence[str], commands: Mapping[str | None, Sequence[str]]
            ) -> tuple[str | None, list[str]]:
  """(subcommand, its positional arguments) from main's `argv` (the program first). `commands` maps
  each subcommand to the names of the arguments it takes; the key None, where there, is the command
  run without a subcommand word. Anything else: UsageError."""
  words = list(argv[1:])
  name = words[0] if words and words[0] in commands else None
  if name is None and None not in commands:
    allowed = ", ".join(str(c) for c in commands)
    raise UsageError(f"unknown command {words[0]!r}; allowed: {allowed}" if words
                     else f"a command is required; allowed: {allowed}")
  args, names = words[1:] if name else words, list(commands[name])
  if len(args) > len(names):
    raise UsageError(f"unexpected arguments {args[len(names):]}")
  if len(args) < len(names):
    raise UsageError(f"{name} needs {' '.join(names)}")
  return name, args


def require(*holders: flags.FlagHolder) -> None:
  """UsageError `--NAME is required` for the first of `holders` without a value."""
  for h in holders:
    if h.value in (None, "", []):
      raise UsageError(f"--{h.name} is required")
