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
`--help` prints the command's docstring and its flags, and exits 0. A run that fails after its
directory was opened (rundir/writing.py: RunFailed, recorded in status.json) is one line too, exit 1.
A `--config` file that is missing, does not import (its file and line named) or has no key given by
`--config.KEY=VALUE` (the nearest keys named) is bad input.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
import traceback
from typing import Any, Callable, Mapping, Sequence

from absl import app, flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags.config_flags import is_config_flag

from configs.errors import ConfigError
from looped_models.raven import RavenError
from rundir.workdir import RunDirError
from rundir.writing import RunFailed
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
    except RunFailed as e:
      print(f"error: {one_line(e)}", file=sys.stderr)
      return 1
  return guarded


_DEFAULT_CONFIGS: dict[str, str] = {}


def define_config(name: str, default: str | None, help: str) -> flags.FlagHolder:
  """A `--NAME FILE` config file flag (with `--NAME.KEY=VALUE` overrides, locked) whose `default`
  file is loaded when the command line is parsed, where its errors and those of the overrides are
  one line, rather than when the flag is defined (at import, before any error path)."""
  if default:
    _DEFAULT_CONFIGS[name] = default
    help = f"{help} (default {default})"
  return config_flags.DEFINE_config_file(name, None, help, lock_config=True)


def parse(argv: list[str], fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """The flags of `argv` parsed into `fv`; what is left (the program and the positional arguments).
  A bad or unknown flag, or a config file that cannot be used: UsageError naming it."""
  for name, default in _DEFAULT_CONFIGS.items():
    if name in fv and not any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
      argv = [*argv[:1], f"--{name}={default}", *argv[1:]]
  try:
    rest = fv(argv)
  except flags.Error as e:
    raise UsageError(one_line(e)) from None
  except (KeyError, AttributeError) as e:  # --config.KEY=VALUE for a key the config lacks
    raise UsageError(_unknown_key(argv, fv) or f"unknown config key {e}") from None
  except Exception as e:  # the config file itself: a syntax error, a failing import, ...
    raise UsageError(_config_file_error(e)) from None
  for name in list(fv):
    flag = fv[name]
    if is_config_flag(flag) and flag.present:
      try:
        flag.value.keys  # noqa: B018 - a file that failed to load raises on any access
      except OSError as e:
        raise UsageError(f"--{name}: cannot load config file "
                         f"{config_flags.get_config_filename(flag)} ({_errno_text(e)})") from None
  return rest


def _errno_text(e: BaseException) -> str:
  """The innermost cause's message ('[Errno 2] No such file or directory: ...')."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  found = re.findall(r"\[Errno \d+\][^\n]*", str(e))
  return found[-1].strip() if found else one_line(e)


def _config_file_error(e: BaseException) -> str:
  """`config file F line N: Type: message` for an error raised while loading a config file."""
  if isinstance(e, SyntaxError):
    return f"config file {e.filename} line {e.lineno}: SyntaxError: {e.msg}"
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if "site-packages" not in f.filename and not f.filename.startswith("<")]
  where = f"config file {frames[-1].filename} line {frames[-1].lineno}: " if frames else ""
  text = re.sub(r"^Error whilst parsing config file:.*", "", str(e), flags=re.S).strip()
  return f"{where}{type(e).__name__}: {(text or str(e)).splitlines()[-1].strip()}"


def _unknown_key(argv: list[str], fv: flags.FlagValues) -> str | None:
  """'unknown config key model.bogus; nearest: ...' for the first --NAME.KEY=VALUE whose key the
  config file's config lacks (the file loaded again: the failed parse keeps no value)."""
  for name in list(fv):
    flag = fv[name]
    if not is_config_flag(flag):
      continue
    file = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
    if file is None and f"--{name}" in argv[:-1]:
      file = argv[argv.index(f"--{name}") + 1]
    try:  # the default is parsed already when the flag is defined
      config = flag.parser.parse(file) if file else flag.default
    except Exception:  # noqa: BLE001 - a file that does not load is reported when read
      continue
    for arg in argv:
      m = re.match(rf"--{re.escape(name)}\.([\w.]+)(=|$)", arg)
      if not m:
        continue
      node, keys = config, m.group(1).split(".")
      for i, key in enumerate(keys):
        if not isinstance(node, config_dict.ConfigDict) or key not in node:
          known = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
          near = difflib.get_close_matches(key, known, n=3, cutoff=0.5) or sorted(known)[:8]
          prefix = ".".join(keys[:i])
          return (f"unknown config key {'.'.join(keys[:i + 1])}"
                  + (f"; nearest: {', '.join(f'{prefix}.{k}' if prefix else k for k in near)}"
                     if near else ""))
        node = node[key]
  return None


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
