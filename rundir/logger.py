"""Metrics to WORKDIR/metrics.jsonl (always) and to W&B (offline unless asked for online).

Only process 0 logs. A W&B failure never loses a metric: the JSONL line is written first, and a W&B
run that cannot start online falls back to offline mode.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from rundir.workdir import path

WANDB_MODES = ("offline", "online", "disabled")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{"model": {"d_model": 64}} -> {"model.d_model": 64}, the form W&B groups and filters by."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def _py(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def read_metrics(workdir: str) -> list[dict]:
  """The metrics of a run, one dict per logged step; a step logged twice (a resumed run repeats the
  steps after its last checkpoint) keeps its latest line. A torn line (a crash mid-write) is skipped
  with a warning."""
  by_step: dict[int, dict] = {}
  file = path(workdir) / "metrics.jsonl"
  if file.exists():
    for n, line in enumerate(file.read_bytes().decode(errors="replace").splitlines(), 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        by_step.setdefault(int(rec["step"]), {}).update(rec)
      except (ValueError, KeyError, TypeError):
        _warn(f"{file} line {n} is torn or not a metrics record; skipped")
  return [by_step[s] for s in sorted(by_step)]


def repair_torn_tail(file) -> int:
  """Cut a torn last line (no newline at the end: the writer stopped mid-line) from a local JSONL
  file, so that the next line starts on its own; the bytes removed (0 when the file is whole)."""
  try:
    with open(file, "rb+") as f:
      size = f.seek(0, os.SEEK_END)
      if size == 0:
        return 0
      f.seek(size - 1)
      if f.read(1) == b"\n":
        return 0
      f.seek(max(0, size - (1 << 20)))
      tail = f.read()
      keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
      f.truncate(keep)
      return size - keep
  except FileNotFoundError:
    return 0


class JsonlFile:
  """Appends JSON lines. A local file is appended to and flushed line by line (a torn last line left
  by a crash is cut first, with a warning); object stores (gs://...) cannot append, so there the
  whole file is rewritten (write, then rename) on each line."""

  def __init__(self, file):
    self.file = path(file)
    self.local = "://" not in str(self.file)
    if self.local:
      cut = repair_torn_tail(str(self.file))
      if cut:
        _warn(f"{self.file}: removed a torn last line ({cut} bytes) left by an interrupted write")
    self.handle = self.file.open("a") if self.local else None
    self.lines = ([] if self.local or not self.file.exists() else  # rewritten whole: never torn
                  self.file.read_text().splitlines(keepends=True))

  def write(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if self.local:
      self.handle.write(line)
      self.handle.flush()
      return
    self.lines.append(line)
    tmp = self.file.parent / f"{self.file.name}.tmp{os.getpid()}"
    tmp.write_text("".join(self.lines))
    tmp.replace(self.file)

  def close(self) -> None:
    if self.handle is not None:
      self.handle.close()


def wandb_dir(workdir: str) -> str:
  """Where W&B keeps its files: the run directory, or for a run on an object store (W&B writes
  only local files) a local folder named after it under ~/.cache/looped/wandb."""
  if "://" not in str(path(workdir)):
    return str(workdir)
  local = os.path.join(os.path.expanduser("~/.cache/looped/wandb"),
                       str(path(workdir)).split("://", 1)[1].replace("/", "_"))
  os.makedirs(local, exist_ok=True)
  return local


class MetricsLogger:
  """JSONL + W&B logger for one run. `run_id` resumes the same W&B run after a restart."""

  def __init__(self, workdir: str, wandb_cfg: Any, config: dict, run_id: str | None,
               job_type: str = "train", enabled: bool = True, jsonl: bool = True):
    self.enabled = enabled
    self.run = None
    self.run_id = run_id
    self.file = None
    if not enabled:
      return
    if jsonl:
      self.file = JsonlFile(path(workdir) / "metrics.jsonl")
    if wandb_cfg.mode == "disabled":
      return
    import wandb  # imported lazily: start-up cost only where W&B is used

    mode = wandb_cfg.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
      print("W&B: no API key found, logging offline (upload later with `wandb sync`)", file=sys.stderr)
      mode = "offline"
    kwargs = dict(project=wandb_cfg.project, entity=wandb_cfg.entity or None,
                  group=wandb_cfg.group or None, name=wandb_cfg.name or path(workdir).name,
                  tags=list(wandb_cfg.tags) or None,
                  job_type=job_type, config=flatten(config), id=run_id, resume="allow",
                  dir=os.environ.get("WANDB_DIR") or wandb_dir(workdir))
    try:
      self.run = wandb.init(mode=mode, **kwargs)
    except Exception as e:  # unreachable server, bad key: keep going offline
      print(f"W&B: online run failed ({e}); logging offline", file=sys.stderr)
      self.run = wandb.init(mode="offline", **kwargs)
    self.run_id = self.run.id

  def log(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
    if self.file is not None:
      self.file.write(record)
    if self.run is not None:
      self.run.log({k: v for k, v in record.items() if k != "step"}, step=int(step))

  def summary(self, metrics: dict) -> None:
    if self.run is not None:
      self.run.summary.update({k: _py(v) for k, v in metrics.items()})

  def close(self, exit_code: int = 0) -> None:
    if not self.enabled:
      return
    if self.file is not None:
      self.file.close()
    if self.run is not None:
      self.run.finish(exit_code=exit_code)


def log_to_wandb(workdir: str, wandb_cfg: Any, config: dict, *, run_id: str | None = None,
                 job_type: str = "train", step: int | None = None,
                 tables: dict[str, tuple[list[str], list[list]]] | None = None,
                 images: dict[str, str] | None = None, summary: dict | None = None) -> str | None:
  """Attach once to a W&B run (resumed by `run_id`, else a new one of `job_type`), log `tables`
  ({key: (columns, rows)}) and `images` ({key: PNG path}) at `step` (at least the run's own step;
  None: W&B's next), add the non-None `summary` fields, finish. Returns the run's id, or None when
  W&B is disabled or the run did not start. No JSONL: what is logged here is in the caller's files."""
  if wandb_cfg.mode == "disabled":
    return None
  logger = MetricsLogger(workdir, wandb_cfg, config, run_id, job_type=job_type, jsonl=False)
  if logger.run is None:
    return None
  import wandb  # already imported by MetricsLogger; named here for the table and image types

  record = {k: wandb.Table(columns=list(cols), data=[list(r) for r in rows])
            for k, (cols, rows) in (tables or {}).items()}
  record.update({k: wandb.Image(p) for k, p in (images or {}).items()})
  if record:
    logger.run.log(record, **({} if step is None else {"step": max(step, logger.run.step)}))
  if summary:
    logger.run.summary.update({k: _py(v) for k, v in summary.items() if v is not None})
  run_id = logger.run.id
  logger.run.finish()
  return run_id
