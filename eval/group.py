"""Random-init controls that differ only in parameter values, evaluated together.

The trials of a random-init sweep that differ only in their seed and init scales (`VALUE_KEYS`; e.g.
the regime map, configs/sweeps/regime_map.py: 42 trials per injection x norm x width cell) run the
same program on different parameters. `evaluate_group` compiles it once and runs G of them at a time
under `jax.vmap` (G as many as `memory_bytes` of host trajectory allow); each trial's trajectory is
computed once, kept on the host and analysed by the one fixed-point detector (`eval.fixed_points`).
A model whose trajectory alone exceeds `memory_bytes` is run alone and its trajectory streamed twice,
as `eval.evaluate` does. The guard, the default R, the batches and
config.json are the evaluation driver's (`eval.driver`).

Each trial gets what `python -m eval --init` writes, lighter: config.json and eval/0/fixed_points.json
and .md with the same analysis and summary (`fp/*`), but no plots, no attention metrics (the regime
does not depend on them), no accuracy curves (a model at initialisation predicts nothing) and no W&B
run of its own (the sweep report's run holds the map). `python -m eval --init` on one trial's config
gives the full evaluation of that trial.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from configs.errors import ConfigError
from eval.capture import Capture
from eval.driver import check_control, eval_batch, iterations_of, write_control_config
from eval.fixed_points import analyze_stream, analyze_trajectory
from eval.summary import markdown, summary_fields
from looped_models.model import abstract_model, init_model
from rundir import outputs
from rundir.config import resolve
from rundir.logger import flatten
from rundir.workdir import path, write_json_atomic
from tasks.synthetic import task_of

VALUE_KEYS = ("train.seed", "model.init_std", "model.embed_std")  # they change parameter values only
MEMORY_BYTES = 1 << 30  # host memory for the trajectories of one vmapped batch of trials


def shape_key(cfg: dict) -> str:
  """Equal for configs whose models run the same program: all but `VALUE_KEYS` and W&B naming."""
  return json.dumps({k: v for k, v in flatten(cfg).items()
                     if k not in VALUE_KEYS and not k.startswith("wandb.")}, sort_keys=True)


def groupable(cfg: dict) -> bool:
  """A random-init control of its own (nothing trained or imported), on one process."""
  train, dist = cfg.get("train", {}), cfg.get("distributed", {})
  return (train.get("steps") == 0 and not train.get("init_from")
          and int(dist.get("num_processes") or 1) <= 1 and not cfg.get("eval", {}).get("path_starts"))


def evaluate_group(cfgs: list[ml_collections.ConfigDict], workdirs: list[str], *,
                   memory_bytes: int = MEMORY_BYTES,
                   on_done: Callable[[int, float], None] | None = None) -> list[dict]:
  """Evaluate random-init controls of one shape (see the module docstring); returns their summaries
  in order and calls `on_done(index, wall_s)` as each one is written (wall_s: its share of the time)."""
  if len(cfgs) != len(workdirs) or not cfgs:
    raise ValueError("evaluate_group needs one workdir per config, and at least one")
  cfgs = [resolve(c) for c in cfgs]
  keys = {shape_key(c.to_dict()) for c in cfgs}
  if len(keys) > 1:
    raise ConfigError("trials", len(cfgs), reason="differ in more than " + ", ".join(VALUE_KEYS)
                      + ": they cannot share one program")
  for cfg, wd in zip(cfgs, workdirs):
    if not groupable(cfg.to_dict()):
      raise ConfigError("train.steps", cfg.train.steps,
                        reason="only random-init controls (train.steps=0, one process) evaluate as a group")
    check_control(cfg, wd)
  cfg0 = cfgs[0]
  R = iterations_of(cfg0)  # resolve() refused 0 < R < 3
  B, S, m = cfg0.eval.batch_size, cfg0.task.train_length, cfg0.model
  graphdef, _ = abstract_model(m, 0)
  task = task_of(cfg0)
  per_trial = 4 * R * m.block_size * B * S * m.d_model
  stream = per_trial > memory_bytes  # one model at a time, its trajectory replayed (as `evaluate`)
  G = 1 if stream else int(min(len(cfgs), memory_bytes // per_trial))
  capture: Capture | None = None
  summaries: list[dict] = []
  for lo in range(0, len(cfgs), G):
    part = cfgs[lo:lo + G]
    start = time.perf_counter()
    params = [init_model(c.model, c.train.seed)[1] for c in part]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *params)
    seeds = [c.train.seed for c in part]
    batches = [eval_batch(task, c, S, B) for c in part]
    batch = {k: np.stack([b[k] for b in batches]) for k in ("inputs", "targets", "mask")}
    if capture is None:
      capture = Capture(graphdef, stacked, chunk=cfg0.eval.chunk, seed=seeds)
    else:  # the same compiled programs (a last, smaller part compiles once more)
      capture.load(stacked, seeds)
    if stream:
      reports = [analyze_stream(lambda: ((st[0], None) for st, _, _, _ in capture.run(batch, R)))]
    else:
      states = np.empty((len(part), R, m.block_size, B, S, m.d_model), np.float32)
      done = 0
      for st, _, _, _ in capture.run(batch, R):
        states[:, done:done + st.shape[1]] = st
        done += st.shape[1]
      reports = [analyze_trajectory(states[g]) for g in range(len(part))]
      del states
    share = (time.perf_counter() - start) / len(part)
    for g, (cfg, wd, report) in enumerate(zip(part, workdirs[lo:lo + G], reports)):
      summary = summary_fields(report, {}, S)
      _write(cfg, wd, summary, report, R, B, len(cfgs), share)
      summaries.append(summary)
      if on_done is not None:
        on_done(lo + g, share)
  return summaries


def _write(cfg: Any, workdir: str, summary: dict, report: Any, R: int, batch_size: int, group: int,
           wall_s: float) -> None:
  write_control_config(cfg, workdir)
  outdir = outputs.output_dir(workdir, 0, "fixed_points.json")
  result = {"summary": summary, "step": 0, "init": True, "iterations": R, "batch_size": batch_size,
            "report": report.to_dict(), "accuracy_curves": {},
            "group": {"trials": group, "wall_s": round(wall_s, 3)}}
  write_json_atomic(path(outdir) / "fixed_points.json", result)
  (path(outdir) / "fixed_points.md").write_text(markdown(summary, report, cfg, 0, True, plots=False))
