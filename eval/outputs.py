"""Where evaluation outputs live, so that nothing is overwritten.

Every evaluation writes under the checkpoint step it measured: `WORKDIR/eval/STEP/` (`fixed_points.json`,
`fixed_points.md`, `plots/`, `halting.json`, `plots/halting_pareto.png`). A file that is already there
is never replaced: the next evaluation of that step (other settings, or the same again) gets
`eval/STEP.1/`, `eval/STEP.2/`, ... Readers take the newest (`latest`); runs made before this layout,
with the files at the top of WORKDIR, are still found.

The config a run finished with is its newest `config.N.json` (train.workdir.record_config writes one
per resume whose config changed), else `config.json`.
"""

from __future__ import annotations

import os
import re

EVAL = "eval"
_NAME = re.compile(r"^(\d+)(?:\.(\d+))?$")


def eval_dirs(workdir: str) -> list[tuple[int, int, str]]:
  """(step, n, path) of every evaluation directory, oldest step first, then in order of creation."""
  root = os.path.join(workdir, EVAL)
  if not os.path.isdir(root):
    return []
  out = []
  for name in os.listdir(root):
    m = _NAME.match(name)
    if m and os.path.isdir(os.path.join(root, name)):
      out.append((int(m.group(1)), int(m.group(2) or 0), os.path.join(root, name)))
  return sorted(out)


def output_dir(workdir: str, step: int, name: str) -> str:
  """The directory in which an evaluation of `step` writes `name` (e.g. "fixed_points.json"): the
  step's newest evaluation directory if it holds no `name` yet, else a new one (created)."""
  mine = [(n, path) for s, n, path in eval_dirs(workdir) if s == step]
  if mine and not os.path.exists(os.path.join(mine[-1][1], name)):
    return mine[-1][1]
  n = mine[-1][0] + 1 if mine else 0
  path = os.path.join(workdir, EVAL, str(step) if n == 0 else f"{step}.{n}")
  os.makedirs(path)
  return path


def latest(workdir: str, name: str) -> str | None:
  """The path of the newest `name` among the evaluation directories (highest step, then newest),
  else WORKDIR/name for a run evaluated before this layout, else None."""
  for _, _, path in reversed(eval_dirs(workdir)):
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  legacy = os.path.join(workdir, name)
  return legacy if os.path.exists(legacy) else None


def finished_config_path(workdir: str) -> str:
  """The config the run finished with: its newest config.N.json, else config.json."""
  numbered = []
  for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
    m = re.match(r"^config\.(\d+)\.json$", name)
    if m:
      numbered.append((int(m.group(1)), name))
  return os.path.join(workdir, max(numbered)[1] if numbered else "config.json")
