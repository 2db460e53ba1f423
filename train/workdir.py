"""The run directory: config.json, status.json, and the checks that protect an existing run.

Nothing here deletes or overwrites a run's data: config.json is written once, a changed config on
resume is kept beside it as config.N.json, and status.json is the only file rewritten (atomically).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from looped_models.config import SHAPE_KEYS

STATUSES = ("running", "done", "failed", "diverged", "interrupted")


class RunDirError(Exception):
  """A run directory that cannot be used as asked (one-line message)."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise RunDirError(f"{path} is unreadable or corrupt: {e}") from None


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


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
    path = config_path(workdir)
  elif old == json.loads(json.dumps(cfg_dict, default=str)):
    return None
  else:
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    path = os.path.join(workdir, f"config.{n}.json")
  write_json_atomic(path, cfg_dict)
  return path


def read_status(workdir: str) -> dict | None:
  return read_json(os.path.join(workdir, "status.json"))


def write_status(workdir: str, status: str, **fields: Any) -> None:
  assert status in STATUSES, status
  record = dict(read_status(workdir) or {})
  record.update(fields, status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
  write_json_atomic(os.path.join(workdir, "status.json"), record)
