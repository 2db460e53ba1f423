"""What the benchmark scripts share: their command line (the docstring as help, `--note`, `--section`,
`--dry-run`), the machine's description, the chips' peak rates, markdown tables, and writing one
benchmark's section of bench/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from typing import Any, Iterable

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# Dense bfloat16 FLOP/s per chip, by a substring of its device_kind.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def parser(doc: str, section: str | None = None, *, note: bool = True,
           **options: Any) -> argparse.ArgumentParser:
  """A script's parser: `doc` as its help, `--section` (default `section`, where given), `--note`,
  `--dry-run`, and one `--NAME` per option, NAME=default or NAME=(default, help): a bool default is a
  flag, any other takes its type; a type as the default (NAME=int) means that type, default None."""
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, value in options.items():
    default, help_ = value if isinstance(value, tuple) else (value, None)
    if isinstance(default, bool):
      p.add_argument(f"--{name}", action="store_true", help=help_)
    elif isinstance(default, type):
      p.add_argument(f"--{name}", type=default, default=None, help=help_)
    else:
      p.add_argument(f"--{name}", type=str if default is None else type(default), default=default,
                     help=help_)
  if note:
    p.add_argument("--note", default="", help="a sentence on the machine's state, for RESULTS.md")
  if section:
    p.add_argument("--section", default=section, help="the section of bench/RESULTS.md to write")
  p.add_argument("--dry-run", action="store_true",
                 help="print the section instead of writing it into bench/RESULTS.md")
  return p


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo; the platform's processor string elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    return found.group(1).strip() if found else platform.processor() or "unknown CPU"
  except OSError:
    return platform.processor() or "unknown CPU"


def machine() -> str:
  """The host, its CPU (model, cores), the devices, jax's version and today's date, in one line."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"{platform.node() or 'host'}: {cpu_model()}, {os.cpu_count()} CPU cores, "
          f"{dev.platform} x{jax.device_count()} ({kind}), jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")


def command(module: str, args: argparse.Namespace, *names: str) -> str:
  """`python -m MODULE --NAME VALUE ...` for the named options (a flag only where it is set)."""
  parts = [f"python -m {module}"]
  for name in names:
    value = getattr(args, name)
    if value is True:
      parts.append(f"--{name}")
    elif value is not False and value is not None:
      parts.append(f"--{name} {value}")
  return " ".join(parts)


def intro(cmd: str, how: str = "", note: str = "") -> str:
  """The line under a section's title: the machine, the command that measured it, how, the note."""
  return f"Machine: {machine()}. `{cmd}`{how} {note}".rstrip()


def peak_flops() -> float | None:
  """All devices' dense bfloat16 peak FLOP/s (None for a chip not in PEAK_BF16)."""
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
  return peak * jax.device_count() if peak else None


def share(x: float | None, digits: int = 1) -> str:
  """A fraction as a percentage, "n/a" for None."""
  return "n/a" if x is None else f"{x:.{digits}%}"


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
  """A markdown table's lines; cells are written as they are given (format them first)."""
  header = list(header)
  return (["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
          + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def record(section: str, lines: Iterable[str], dry_run: bool = False) -> str:
  """Print a section's body and, unless `dry_run`, write it as `section` of bench/RESULTS.md."""
  body = "\n".join(lines)
  print(body, flush=True)
  if not dry_run:
    write_section(section, body)
  return body


def write_section(name: str, body: str) -> None:
  """Replace section `name` of bench/RESULTS.md (between its markers) by `body`, or append it."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
  block = f"{begin}\n{body.strip()}\n{end}"
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
  text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
  with open(RESULTS, "w") as f:
    f.write(text)
