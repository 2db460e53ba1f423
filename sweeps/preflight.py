"""A sweep checked against the TPU slice it is for, before anything runs.

  python -m sweeps --config configs/sweeps/tpu_pod.py --topology v5e-256 --dry-run   # the table
  python -m sweeps --config configs/sweeps/tpu_pod.py --topology v5e-256 ...         # a launch

Every distinct trial shape (trials that differ only in their seed compile the same programs) has its
training and evaluation steps compiled once for the topology (train/aot.py, libtpu: run it with
`.venv-tpu/bin/python`), and each trial is listed as fitting or not with the GiB per chip. A launch
with `--topology` refuses the trials that do not fit (they are recorded as failed, with the figure,
and the others run) unless `--force`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from configs.errors import ConfigError
from sweeps.expand import Trial
from sweeps.runner import program_key
from train import aot

PROGRAMS = ("train_step", "eval_step")


def check(trials: list[Trial], topology: str, slices: int = 1,
          say: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
  """{trial name: the AOT report of its shape} for the trials that compile (one compile per shape;
  a text trial whose corpus is not on this machine compiles with `model.vocab_size`)."""
  reports: dict[tuple, dict] = {}
  out = {}
  for t in trials:
    if t.invalid:
      try:
        aot.compile_config(t.config)
      except ConfigError:
        continue
    key = program_key(t)
    if key not in reports:
      say(f"compiling {t.name} (and the trials of its shape) for {topology} x{slices} ...")
      try:
        reports[key] = aot.preflight(t.config, topology, slices, PROGRAMS)
      except ConfigError as e:
        if "--topology" in str(e) or "--slices" in str(e):
          raise  # the topology itself: one line for the whole sweep
        reports[key] = {"error": str(e), "fits": False}
    out[t.name] = reports[key]
  return out


def verdict(report: dict) -> str:
  return report["error"] if "error" in report else aot.verdict(report)


def lines(trials: list[Trial], reports: dict[str, dict]) -> list[str]:
  """One line per trial: name, overrides, fits / does not fit with the GiB per chip."""
  out = []
  for t in trials:
    if t.name not in reports:
      what = f"INVALID: {t.invalid}"
    else:
      what = verdict(reports[t.name]) + (f" (here: {t.invalid})" if t.invalid else "")
    out.append(f"{t.name}\t" + " ".join(f"{k}={v}" for k, v in t.overrides.items()) + f"\t{what}")
  return out


def refuse_misfits(trials: list[Trial], reports: dict[str, dict], topology: str) -> list[Trial]:
  """The trials, those that do not fit marked invalid (the runner records them failed, unrun)."""
  return [dataclasses.replace(t, invalid=f"does not fit {topology} ({verdict(reports[t.name])}); "
                              "python -m train.aot shows why; --force runs it anyway")
          if not t.invalid and t.name in reports and not reports[t.name]["fits"] else t
          for t in trials]
