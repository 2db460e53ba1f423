"""Where evaluation outputs live, so that nothing is overwritten.

Every evaluation writes under the checkpoint step it measured: `WORKDIR/eval/STEP/` (`fixed_points.json`,
`fixed_points.md`, `plots/`, `halting.json`, `plots/halting_pareto.png`). A file that is already there
is never replaced: the next evaluation of that step (other settings, or the same again) gets
`eval/STEP.1/`, `eval/STEP.2/`, ... Readers take the newest (`latest`); runs made before this layout,
with the files at the top of WORKDIR, are still found.

The config a run finished with is its newest `config.N.json` (rundir.workdir.record_config writes one
per resume whose config changed), else `config.json`.
"""

from __future__ import annotations

import re

from rundir.workdir import config_files, path

EVAL = "eval"
_NAME = re.compile(r"^(\d+)(?:\.(\d+))?$")


def eval_dirs(workdir: str) -> list[tuple[int, int, str]]:
  """(step, n, path) of every evaluation directory, oldest step first, then in order of creation."""
  root = path(workdir) / EVAL
  if not root.is_dir():
    return []
  out = []
  for d in root.iterdir():
    m = _NAME.match(d.name)
    if m and d.is_dir():
      out.append((int(m.group(1)), int(m.group(2) or 0), str(d)))
  return sorted(out)


def output_dir(workdir: str, step: int, name: str) -> str:
  """The directory in which an evaluation of `step` writes `name` (e.g. "fixed_points.json"): the
  step's newest evaluation directory if it holds no `name` yet, else a new one (created)."""
  mine = [(n, d) for s, n, d in eval_dirs(workdir) if s == step]
  if mine and not (path(mine[-1][1]) / name).exists():
    return mine[-1][1]
  n = mine[-1][0] + 1 if mine else 0
  while True:  # another evaluation may take a name first: the next one is ours
    out = path(workdir) / EVAL / (str(step) if n == 0 else f"{step}.{n}")
    try:
      out.mkdir(parents=True)
      return str(out)
    except FileExistsError:
      n += 1


def latest(workdir: str, name: str) -> str | None:
  """The path of the newest `name` among the evaluation directories (highest step, then newest),
  else WORKDIR/name for a run evaluated before this layout, else None."""
  for _, _, d in reversed(eval_dirs(workdir)):
    if (path(d) / name).exists():
      return str(path(d) / name)
  legacy = path(workdir) / name
  return str(legacy) if legacy.exists() else None


def finished_config_path(workdir: str) -> str:
  """The config the run finished with: its newest config.N.json, else config.json."""
  names = config_files(workdir) if path(workdir).is_dir() else []
  return str(path(workdir) / (names[-1] if names else "config.json"))
