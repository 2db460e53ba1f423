"""Load a sweep file and expand it into named trials.

A sweep file (configs/sweeps/NAME.py) defines `get_config()` — the base trial config — and
`get_hyper(h)` returning a list of override dicts built with `sweeps.hyper` (`h`). Each override dict
is one trial; its name is made from the override values (e.g. `k4-concat-sandwich-s0`).

A sweep over an existing run (configs/sweeps/imported.py) also defines `over_run(config, run)`: its
trials start from the config that run `train.init_from` last ran with (keys added since at their
defaults), with `over_run` and then the command line's --config.KEY=VALUE applied (`base_config`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from configs.errors import ConfigError
from rundir.config import resolve
from rundir.run import load_run_config
from sweeps import hyper

# How an override key shows up in a trial name: a short prefix before the value ("" = value alone).
NAME_PREFIX = {"model.block_size": "k", "model.injection": "", "model.norm": "", "train.seed": "s",
               "model.norm_type": "", "model.d_model": "d", "model.n_prelude": "p", "model.n_coda": "c",
               "train.mean_recurrence": "r", "task.name": "", "model.state_init": "init-",
               "model.attention": "", "model.mlp": "", "eval.iterations": "R",
               "eval.path_starts": "starts"}


@dataclasses.dataclass
class Trial:
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  invalid: str | None = None  # the config error, when the trial's config cannot work


def load_sweep_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError("--config", path, reason="sweep file not found")
  spec = importlib.util.spec_from_file_location(f"sweep_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_hyper"):
    raise ConfigError("--config", path, reason="a sweep file defines get_config() and get_hyper(h)")
  return module


def sweep_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (tuple, list)):
    return "x".join(_fmt(v) for v in value)
  return str(value)


def trial_name(overrides: dict[str, Any]) -> str:
  parts = []
  for key, value in overrides.items():
    if isinstance(value, bool) and key not in NAME_PREFIX:  # eval.control=True -> "control"
      parts.append(("" if value else "no-") + key.split(".")[-1])
      continue
    prefix = NAME_PREFIX.get(key, key.split(".")[-1] + "=")
    parts.append(f"{prefix}{_fmt(value)}")
  return "-".join(parts).replace("/", "_") or "base"


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
      if part not in node:
        raise ConfigError(key, value, reason="no such config key")
      node = node[part]
    if leaf not in node:
      raise ConfigError(key, value, reason="no such config key")
    node[leaf] = value
  return cfg


def base_config(cfg: ml_collections.ConfigDict, module, overrides: dict[str, Any]
                ) -> ml_collections.ConfigDict:
  """The sweep's base config: `cfg` (the sweep file's get_config, with the command line's `overrides`
  applied), or for a sweep file with `over_run`, the stored config of run `cfg.train.init_from` with
  `over_run` and then `overrides` applied over it (RunDirError when that run does not exist)."""
  if not hasattr(module, "over_run"):
    return cfg
  run = cfg.train.init_from
  return apply_overrides(module.over_run(load_run_config(run), run), overrides)


def expand(base: ml_collections.ConfigDict, module) -> list[Trial]:
  """The trials of a sweep, in order; names are unique."""
  trials, seen = [], set()
  for overrides in module.get_hyper(hyper):
    name = trial_name(overrides)
    if name in seen:
      raise ConfigError("sweep", name, reason="two trials have the same name")
    seen.add(name)
    trial = Trial(name, dict(overrides), apply_overrides(base, overrides))
    try:
      resolve(trial.config)
    except ConfigError as e:
      trial.invalid = str(e)
    trials.append(trial)
  return trials
