"""A W&B sweep definition for a sweep file, so that `wandb agent` runs its trials on many machines.

  python -m sweeps export-wandb --config configs/sweeps/NAME.py [--workdir runs] [--out FILE]
  wandb sweep FILE               # prints the sweep id
  wandb agent ENTITY/PROJECT/ID  # on every machine (sharing --workdir, e.g. gs://BUCKET/runs)

The definition is a grid over one parameter, `trial` (the sweep's trial names: products, zips and
chains alike), and the training command runs exactly that trial through the sweep runner, so it is
trained, evaluated and recorded as `python -m sweeps` would (status.json, resume, halting), in W&B
group NAME. The W&B agent builds the command line from `command`, replacing `${env}`, `${interpreter}`
and `${args}` (`--trial=NAME --config.wandb.group=NAME --config.wandb.mode=online`).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from rundir.workdir import path
from sweeps.expand import Trial


def definition(sweep: str, config_path: str, trials: list[Trial], workdir: str, base: Any,
               overrides: dict | None = None) -> dict:
  """The W&B sweep definition (a dict, written as YAML) over the trials of one sweep file; the
  `--config.KEY=VALUE` overrides of the export's command line (`overrides`, {KEY: value}) become
  fixed parameters, so that every agent trains the trials the export expanded."""
  out: dict[str, Any] = {
      "name": sweep,
      "description": f"{len(trials)} trials of {config_path} (python -m sweeps export-wandb)",
      "method": "grid",
      "parameters": {"trial": {"values": [t.name for t in trials if not t.invalid]},
                     "config.wandb.group": {"value": base.wandb.group or sweep},
                     # online for a W&B server (a machine without an API key falls back to offline)
                     "config.wandb.mode": {"value": "online"}},
      "command": ["${env}", "${interpreter}", "-m", "sweeps", "--config", config_path,
                  "--workdir", workdir, "${args}"],
  }
  for key, value in (overrides or {}).items():
    out["parameters"][f"config.{key}"] = {"value": str(value) if isinstance(value, (tuple, list))
                                          else value}
  if base.wandb.project:
    out["project"] = base.wandb.project
  if base.wandb.entity:
    out["entity"] = base.wandb.entity
  return out


def agent_command(defn: dict, trial: str, interpreter: str = sys.executable) -> list[str]:
  """The command line `wandb agent` runs for one trial: `${args}` as `--NAME=VALUE` for each parameter
  (its grid value, or its fixed `value`), `${env}` dropped (Linux), `${interpreter}` the Python."""
  args = []
  for name, spec in defn["parameters"].items():
    args.append(f"--{name}={trial if name == 'trial' else spec['value']}")
  cmd = []
  for part in defn["command"]:
    if part == "${env}":
      continue
    cmd += args if part == "${args}" else [interpreter if part == "${interpreter}" else part]
  return cmd


def write(defn: dict, file: str) -> str:
  path(file).parent.mkdir(parents=True, exist_ok=True)
  path(file).write_text(yaml.safe_dump(defn, sort_keys=False))
  return file
