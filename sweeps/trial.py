"""One trial = train (skipped when train.steps = 0: the random-init control) + fixed-point evaluation
+ adaptive halting (`eval.halting`).

Run by the sweep runner as `python -m sweeps.trial WORKDIR` with the trial's config as JSON on stdin,
so that a crash, an out-of-memory kill or a NaN stays inside the trial. Exit status: 0 done, 2 bad
input, 3 diverged, 128+signal interrupted (checkpoint saved), 1 failed (recorded in status.json, the
traceback in the trial's error.log; rundir/writing.py), anything else a crash.

`python -m sweeps.trial WORKDIR WORKDIR ...` with a JSON list of configs runs a group of random-init
controls that share one program (`eval.vmap_trials`, see eval/group.py) and marks each trial done in
its status.json as soon as it is written, so that a group stopped halfway keeps what it finished.
"""

from __future__ import annotations

from rundir.host import tune_allocator

if __name__ == "__main__":  # a trial process: before JAX is imported (rundir/host.py)
  tune_allocator(default=False)  # only with LOOPED_HOST_ALLOCATOR=tuned

import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import logging  # noqa: E402

from configs.errors import ConfigError  # noqa: E402
from eval.fixed_points import TrajectoryError  # noqa: E402
from eval.group import evaluate_group  # noqa: E402
from eval.suite import evaluate_run  # noqa: E402
from rundir.outputs import latest  # noqa: E402
from rundir.workdir import RunDirError, path, read_json  # noqa: E402
from rundir.writing import RunFailed, writing  # noqa: E402
from sweeps.status import set_trial  # noqa: E402
from train.trainer import Trainer  # noqa: E402

PARENT_ENV = "LOOPED_SWEEP_RUNNER_PID"  # the runner's pid, set for each trial process
# A trial's plots as PNG alone: the report embeds PNGs and SVG costs about 1 s a figure
# (`python -m eval` writes both).
FORMATS = ("png",)


def die_with_runner() -> None:
  """On Linux, a SIGTERM when the sweep runner dies, even by SIGKILL, so that no orphan trial goes on
  writing while a restarted runner resumes it (the trial saves a checkpoint and exits). Set up in the
  trial itself (the runner starts it without running Python code between fork and exec)."""
  parent = os.environ.get(PARENT_ENV)
  if not parent or not sys.platform.startswith("linux"):
    return
  ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  if os.getppid() != int(parent):  # the runner died before the line above
    os.kill(os.getpid(), signal.SIGTERM)


def use_compilation_cache(sweep_dir: str) -> None:
  """Trials of one sweep share compiled programs through JAX's persistent cache in the sweep's
  directory: seeds of a cell (and reruns after a stop) compile the same programs. Every program is
  stored, however fast it compiled: a trial compiles dozens of sub-second programs."""
  jax.config.update("jax_compilation_cache_dir", os.path.join(sweep_dir, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def control_trial(workdir: str) -> str | None:
  """A sibling trial of this sweep marked `eval.control` (e.g. a feedforward model) that has been
  evaluated already: this trial's stage metrics are drawn beside its own (sweep files list the
  control first, so that with --parallel 1 it is always done before the others)."""
  me = path(workdir)
  for other in sorted(me.parent.iterdir(), key=lambda p: p.name):
    if other.name == me.name or not (other / "config.json").is_file():
      continue
    if (read_json(other / "config.json") or {}).get("eval", {}).get("control") and \
        latest(str(other), "fixed_points.json"):
      return str(other)
  return None


def run_trial(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> tuple[int, dict]:
  """Train, then evaluate; (exit status, the trainer's result or the evaluation's summary)."""
  if cfg.train.steps > 0:
    result = Trainer(cfg, workdir).run(ends_run=False)  # done once evaluated, as the runner records
    if result["status"] != "done":
      return result["exit_code"], result
  # Fixed points, then the savings of adaptive halting on the same predictions (judged by exact match,
  # or next-token accuracy on text): the run opened once, one W&B record.
  summary = evaluate_run(cfg, workdir, init=cfg.train.steps == 0, halting=cfg.eval.halting,
                         compare=None if cfg.eval.control else control_trial(workdir),
                         progress=progress, formats=FORMATS)
  return 0, summary


def run_group(cfgs: list[ml_collections.ConfigDict], workdirs: list[str]) -> int:
  """Evaluate a group of random-init controls in one program, each marked done once written."""
  def done(i: int, wall_s: float) -> None:
    set_trial(workdirs[i], status="done", wall_s=round(wall_s, 2), error=None)
    print(f"eval: {workdirs[i]} done ({i + 1}/{len(workdirs)})", flush=True)

  evaluate_group(cfgs, workdirs, on_done=done)
  return 0


def main() -> int:
  die_with_runner()
  logging.set_verbosity(logging.WARNING)
  workdirs = sys.argv[1:]
  use_compilation_cache(str(path(workdirs[0]).parent))
  try:
    config = json.load(sys.stdin)
    if isinstance(config, list):
      return run_group([ml_collections.ConfigDict(c) for c in config], workdirs)
    with writing(workdirs[0]):  # under the run lock the runner handed down; failures recorded
      code, result = run_trial(ml_collections.ConfigDict(config), workdirs[0], progress=False)
  except (ConfigError, RunDirError, TrajectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RunFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if code == 3:
    print(f"error: {result.get('error')}", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
