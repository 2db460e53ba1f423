"""A sweep trial's status: its run directory's status.json (rundir/workdir.py), which holds the
sweep's fields beside the run's own (step, steps, wandb_run_id, ... written by the trainer).

  status     pending, running, done, failed, diverged (or interrupted: a trainer stopped while no
             runner was there to record it)
  overrides  the trial's swept keys          config  the config it last ran with (checked on resume)
  error      one line: why it failed or diverged, or why it is pending
  wall_s     seconds, over all its runs       pid    its process, while running

Sweep directories written before kept these fields in TRIAL/trial.json: it is read while
status.json lacks them, and moved into status.json (then removed) at the trial's next update.
"""

from __future__ import annotations

from typing import Any

from rundir.workdir import path, read_json, read_status, write_status

SKIP = ("done", "diverged")  # diverged trials are deterministic: rerunning them would diverge again
LEGACY = "trial.json"


def _legacy(trial_dir: str, record: dict | None) -> dict | None:
  """The sweep's fields from trial.json, when status.json lacks them (a sweep written before)."""
  if record is not None and "overrides" in record:
    return None
  return read_json(path(trial_dir) / LEGACY)


def trial_record(trial_dir: str) -> dict:
  """The trial's status record ({"status": "pending"} before the sweep first started it)."""
  record = read_status(trial_dir)
  legacy = _legacy(trial_dir, record)
  if legacy is not None:
    return {**(record or {}), **legacy}
  return record or {"status": "pending"}


def set_trial(trial_dir: str, **fields: Any) -> None:
  """Update the trial's status record with `fields` (`status` kept when not given)."""
  legacy = _legacy(trial_dir, read_status(trial_dir))
  status = fields.pop("status", None) or trial_record(trial_dir)["status"]
  moved = {k: v for k, v in (legacy or {}).items() if k not in ("status", "updated")}
  write_status(trial_dir, status, **{**moved, **fields})
  if legacy is not None:
    (path(trial_dir) / LEGACY).unlink()
