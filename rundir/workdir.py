"""The run directory: config.json, status.json, and the checks that protect an existing run.

Nothing here deletes or overwrites a run's data: config.json is written once, a changed config on
resume is kept beside it as config.N.json, and status.json is the only file rewritten (atomically).
Every path goes through `etils.epath`, so a run directory may be local or on Cloud Storage
(`gs://BUCKET/...`, with `gcsfs` installed); a URL is never turned into a local path.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from etils import epath

from looped_models.config import SHAPE_KEYS

PathLike = str | os.PathLike

# status.json's `status`: a run's (the trainer's, an evaluation's) and a sweep trial's alike; `pending`:
# a sweep trial not started yet, or stopped and to be resumed (its other fields: sweeps/status.py).
STATUSES = ("pending", "running", "done", "failed", "diverged", "interrupted")


class RunDirError(Exception):
  """A run directory that cannot be used as asked (one-line message)."""


def error_line(e: BaseException) -> str:
  """`Type: the first line of its message`, at most 300 characters (an unexpected error, in one line)."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def path(p: PathLike) -> epath.Path:
  """An epath.Path: local paths made absolute, URLs (gs://...) left as they are."""
  p = epath.Path(p)
  return p if "://" in str(p) else epath.Path(os.path.abspath(p))


def check_reachable(workdir: PathLike) -> epath.Path:
  """The run directory as a path, after checking that its storage answers (a bucket that does not
  exist, missing credentials or a missing gcsfs give one line, before anything is compiled)."""
  p = path(workdir)
  try:
    p.exists()
    if "://" in str(p):
      p.parent.exists()
  except Exception as e:  # the storage backend's own error types
    text = str(e).strip().splitlines()
    raise RunDirError(f"cannot reach {workdir}: {type(e).__name__}: {text[0][:200] if text else ''}"
                      ) from None
  return p


def config_path(workdir: PathLike) -> epath.Path:
  return path(workdir) / "config.json"


def read_json(file: PathLike) -> dict | None:
  file = path(file)
  if not file.exists():
    return None
  try:
    return json.loads(file.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise RunDirError(f"{file} is unreadable or corrupt: {e}") from None


def write_json_atomic(file: PathLike, obj: Any) -> None:
  """Write then rename (atomic on local disks; on object stores the rename is a copy and delete,
  so a reader sees the old or the new file, never a part)."""
  file = path(file)
  tmp = file.parent / f"{file.name}.tmp{os.getpid()}"
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(file)


def check_compatible(workdir: str, cfg_dict: dict) -> dict | None:
  """The config of the run already in `workdir` (None if there is none), after checking that its
  model shape agrees with `cfg_dict`. Raises RunDirError otherwise."""
  old = read_json(config_path(workdir))
  if old is None:
    return None
  old_model, new_model = old.get("model", {}), cfg_dict["model"]
  for key in SHAPE_KEYS:
    if old_model.get(key) != new_model.get(key):
      raise RunDirError(
          f"{workdir} holds a run with model.{key}={old_model.get(key)!r}, but the config asks for "
          f"model.{key}={new_model.get(key)!r}; use another --workdir")
  if old.get("task", {}).get("name") != cfg_dict["task"]["name"]:
    raise RunDirError(f"{workdir} holds a run on task.name={old['task'].get('name')!r}, but the config "
                      f"asks for {cfg_dict['task']['name']!r}; use another --workdir")
  return old


def record_config(workdir: str, cfg_dict: dict, old: dict | None) -> str | None:
  """Write config.json for a new run; for a resumed run whose config changed (e.g. more steps), keep
  the original and write the new one as config.N.json. Returns the path written, if any."""
  if old is None:
    file = config_path(workdir)
  elif old == json.loads(json.dumps(cfg_dict, default=str)):
    return None
  else:
    n = 1
    while (path(workdir) / f"config.{n}.json").exists():
      n += 1
    file = path(workdir) / f"config.{n}.json"
  write_json_atomic(file, cfg_dict)
  return str(file)


def config_files(workdir: str) -> list[str]:
  """config.json and the config.N.json a resumed run with changed keys wrote, oldest first."""
  names = [p.name for p in path(workdir).iterdir() if re.fullmatch(r"config(\.\d+)?\.json", p.name)]
  return sorted(names, key=lambda n: int(n.split(".")[1]) if n.count(".") == 2 else 0)


def read_status(workdir: PathLike) -> dict | None:
  return read_json(path(workdir) / "status.json")


def write_status(workdir: PathLike, status: str, **fields: Any) -> None:
  """Set `status` and `fields` in status.json, keeping the fields other writers set (the trainer's
  step and W&B id, a sweep's overrides and config, ...)."""
  assert status in STATUSES, status
  record = dict(read_status(workdir) or {})
  record.update(fields, status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
  write_json_atomic(path(workdir) / "status.json", record)
