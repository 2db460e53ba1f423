"""One trial = train (skipped when train.steps = 0: the random-init control) + fixed-point evaluation
+ adaptive halting (`eval.halting`).

Run by the sweep runner as `python -m sweeps.trial WORKDIR` with the trial's config as JSON on stdin,
so that a crash, an out-of-memory kill or a NaN stays inside the trial. Exit status: 0 done, 2 bad
input, 3 diverged, 128+signal interrupted (checkpoint saved), anything else a crash.

`python -m sweeps.trial WORKDIR WORKDIR ...` with a JSON list of configs runs a group of random-init
controls that share one program (`eval.vmap_trials`, see eval/group.py) and marks each trial done in
its trial.json as soon as it is written, so that a group stopped halfway keeps what it finished.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import ml_collections

from rundir.host import tune_allocator

PARENT_ENV = "LOOPED_SWEEP_RUNNER_PID"  # the runner's pid, set for each trial process


def die_with_runner() -> None:
  """On Linux, a SIGTERM when the sweep runner dies, even by SIGKILL, so that no orphan trial goes on
  writing while a restarted runner resumes it (the trial saves a checkpoint and exits). Set up in the
  trial itself (the runner starts it without running Python code between fork and exec)."""
  parent = os.environ.get(PARENT_ENV)
  if not parent or not sys.platform.startswith("linux"):
    return
  import ctypes
  ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  if os.getppid() != int(parent):  # the runner died before the line above
    os.kill(os.getpid(), signal.SIGTERM)


def use_compilation_cache(sweep_dir: str) -> None:
  """Trials of one sweep share compiled programs through JAX's persistent cache in the sweep's
  directory: seeds of a cell (and reruns after a stop) compile the same programs. Every program is
  stored, however fast it compiled: a trial compiles dozens of sub-second programs."""
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(sweep_dir, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def control_trial(workdir: str) -> str | None:
  """A sibling trial of this sweep marked `eval.control` (e.g. a feedforward model) that has been
  evaluated already: this trial's stage metrics are drawn beside its own (sweep files list the
  control first, so that with --parallel 1 it is always done before the others)."""
  from rundir.outputs import latest
  from rundir.workdir import path, read_json
  me = path(workdir)
  for other in sorted(me.parent.iterdir(), key=lambda p: p.name):
    if other.name == me.name or not (other / "config.json").is_file():
      continue
    if (read_json(other / "config.json") or {}).get("eval", {}).get("control") and \
        latest(str(other), "fixed_points.json"):
      return str(other)
  return None


def run_trial(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> tuple[int, dict]:
  from eval.evaluate import evaluate
  from train.trainer import Trainer

  if cfg.train.steps > 0:
    result = Trainer(cfg, workdir).run()
    if result["status"] != "done":
      return result["exit_code"], result
  predictions: dict = {}  # the accuracy curves' per-iteration predictions: the halting oracle's too
  summary = evaluate(cfg, workdir, init=cfg.train.steps == 0, progress=progress, predictions=predictions,
                     compare=None if cfg.eval.control else control_trial(workdir))
  # The savings of adaptive halting, per trial (judged by exact match, or next-token accuracy on text).
  if cfg.eval.halting and cfg.train.steps > 0:
    from eval.halting import halting_summary
    summary.update(halting_summary(cfg, workdir, trajectories=predictions, progress=progress))
  return 0, summary


def run_group(cfgs: list[ml_collections.ConfigDict], workdirs: list[str]) -> int:
  from eval.group import evaluate_group
  from sweeps.runner import set_trial

  def done(i: int, wall_s: float) -> None:
    set_trial(workdirs[i], status="done", wall_s=round(wall_s, 2), error=None)
    print(f"eval: {workdirs[i]} done ({i + 1}/{len(workdirs)})", flush=True)

  evaluate_group(cfgs, workdirs, on_done=done)
  return 0


def main() -> int:
  tune_allocator(default=False)  # only with LOOPED_HOST_ALLOCATOR=tuned (rundir/host.py)
  from absl import logging

  from configs.errors import ConfigError
  from eval.fixed_points import TrajectoryError
  from rundir.workdir import RunDirError

  die_with_runner()
  from eval import plots
  plots.FORMATS = ("png",)  # the report's figures come as SVG too; `python -m eval` writes a trial's
  logging.set_verbosity(logging.WARNING)
  workdirs = sys.argv[1:]
  from rundir.workdir import path
  use_compilation_cache(str(path(workdirs[0]).parent))
  try:
    config = json.load(sys.stdin)
    if isinstance(config, list):
      return run_group([ml_collections.ConfigDict(c) for c in config], workdirs)
    code, result = run_trial(ml_collections.ConfigDict(config), workdirs[0], progress=False)
  except (ConfigError, RunDirError, TrajectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if code == 3:
    print(f"error: {result.get('error')}", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
