"""A sweep's trials as records, read from disk alone: sweep.json, each trial's status.json and its
newest evaluation (fixed_points.json, halting.json), grouped into cells over the seeds.

  index, rows = load("runs/SWEEP")       # one row per trial: name, overrides, trial, config, fp, ...
  cells(rows)                            # {(value of each swept key but the seed): [rows]}
"""

from __future__ import annotations

from typing import Any

from rundir import outputs
from rundir.workdir import RunDirError, path, read_json
from sweeps.status import trial_record

SEED = "train.seed"
# Okabe-Ito colours for the regimes and statuses (colour-blind safe); dark cells get white text.
REGIME_COLORS = {"cyclic": "#009E73", "degenerate": "#F0E442", "orbit": "#CC79A7", "slider": "#E69F00",
                 "divergent": "#D55E00", "unconverged": "#BBBBBB", "failed": "#000000",
                 "diverged": "#D55E00", "pending": "#FFFFFF", "running": "#FFFFFF",
                 "interrupted": "#FFFFFF"}
DARK = ("failed", "cyclic", "divergent", "diverged")


def config_value(cfg: dict, key: str) -> Any:
  """`cfg`'s value at dotted `key` (None when absent)."""
  node = cfg
  for part in key.split("."):
    node = node.get(part, {}) if isinstance(node, dict) else {}
  return None if node == {} else node


def _read_trial(tdir: str) -> tuple[dict | None, dict | None]:
  """(fixed_points.json, halting.json) of a trial: the newest evaluation, and the halting measured
  beside it (else the newest halting)."""
  fp_path = outputs.latest(tdir, "fixed_points.json")
  halting_path = None
  if fp_path and (path(fp_path).parent / "halting.json").exists():
    halting_path = str(path(fp_path).parent / "halting.json")
  halting_path = halting_path or outputs.latest(tdir, "halting.json")
  return (read_json(fp_path) if fp_path else None), (read_json(halting_path) if halting_path else None)


def load(sweep_dir: str) -> tuple[dict, list[dict]]:
  """(sweep.json, one record per trial with its status/config/fixed_points data)."""
  index = read_json(path(sweep_dir) / "sweep.json")
  if index is None:
    raise RunDirError(f"{sweep_dir} holds no sweep.json: not a sweep directory")
  rows = []
  for t in index["trials"]:
    tdir = str(path(sweep_dir) / t["name"])
    fp, halting = _read_trial(tdir)
    cfg = (read_json(outputs.finished_config_path(tdir)) if path(tdir).is_dir() else None) \
        or t.get("config") or {}
    rows.append({"name": t["name"], "overrides": t["overrides"], "trial": trial_record(tdir),
                 "config": cfg, "fp": fp, "summary": (fp or {}).get("summary", {}),
                 "halting": (halting or {}).get("summary")})
  return index, rows


def verdict(row: dict) -> str:
  """The trial's regime when it is done and evaluated, else its status."""
  status = row["trial"].get("status", "pending")
  if status == "done" and row["summary"]:
    return row["summary"]["fp/regime"]
  return status


def value_of(row: dict, key: str) -> Any:
  """A config value of a trial: its override, else its config."""
  if key in row["overrides"]:
    return row["overrides"][key]
  return config_value(row["config"], key)


def cell_axes(rows: list[dict]) -> list[str]:
  """Every swept key except the seed, in the order the sweep names them."""
  return [k for k in dict.fromkeys(k for r in rows for k in r["overrides"]) if k != SEED]


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
  """{(value of each cell axis): the trials (seeds) of that cell}, in sweep order."""
  axes = cell_axes(rows)
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(value_of(r, a) for a in axes), []).append(r)
  return out


def fmt(v: Any, spec: str = ".3f") -> str:
  """A table cell: "—" for None, floats by `spec`."""
  if v is None:
    return "—"
  if isinstance(v, float):
    return format(v, spec)
  return str(v)
