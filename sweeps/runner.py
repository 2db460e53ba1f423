"""Run a sweep: every trial in runs/SWEEP/TRIAL/, resumable, failure-isolated, N at a time.

Each trial runs as its own process (`python -m sweeps.trial`), so a crash or a NaN is recorded in the
trial's `status.json` (sweeps/status.py) and the sweep goes on. On SIGINT/SIGTERM the runner passes
SIGTERM to its trials (each saves a checkpoint), marks them pending and stops. Rerunning the
command skips done (and diverged) trials and resumes the rest from their checkpoints. With several
JAX processes (a pod), every host runs the same command and trials run one after another in-process
over the whole mesh; process 0's list of trials still to run is the one every host follows.

One runner per sweep directory: the runner holds the sweep's lock (rundir/lock.py; shared among
runners of single trials, `--trial`, as W&B agents run them), and each trial's run lock while the
trial runs, handed down to the trial's process. A trial held by another process is left to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from configs.errors import ConfigError
from eval.group import groupable, shape_key
from rundir import lock
from rundir.logger import flatten
from rundir.workdir import RunDirError, error_line, path, read_json, write_json_atomic
from sweeps.expand import Trial
from sweeps.records import SEED
from sweeps.status import SKIP, set_trial, trial_record
from sweeps.trial import PARENT_ENV, run_trial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trial_config(trial: Trial, sweep: str) -> dict:
  cfg = trial.config.to_dict()
  w = cfg["wandb"]
  w["group"] = w["group"] or sweep
  w["name"] = w["name"] or trial.name
  w["tags"] = list(w["tags"]) + [sweep] + [str(v) for v in trial.overrides.values()]
  return cfg


def _error_text(log_path: str) -> str:
  lines = [l.strip() for l in open(log_path, errors="replace").read().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  if errors:
    return errors[-1][len("error:"):].strip()
  tail = [l for l in lines if not l.startswith(("train:", "eval:"))][-3:]
  return " | ".join(tail)[-500:] or "trial process failed without output"


def config_diff(old: dict, new: dict) -> list[str]:
  """`key: old -> new` for every flattened key that differs (JSON-normalised: tuples are lists).
  `distributed.*` is not compared: it says where a trial runs, not what it computes (on a pod every
  host has its own process_id, and every launch may have its own coordinator and process count)."""
  old, new = flatten(json.loads(json.dumps(old))), flatten(json.loads(json.dumps(new)))
  return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and not k.startswith("distributed.")]


def program_key(trial: Trial) -> tuple:
  """Trials that differ only in their seed compile the same programs."""
  return tuple(sorted((k, json.dumps(v)) for k, v in trial.overrides.items() if k != SEED))


def next_trial(queue: list[list[Trial]], running: list[list[Trial]], warm: set[tuple]) -> int:
  """The index in `queue` (of units: a trial, or a group run in one process) of the unit to start
  next: the first one whose programs are not being compiled right now by a running sibling (same
  cell, another seed) with none of them in the persistent cache yet. Starting it after that sibling
  finishes lets it load them from the cache (a default trial: about 27 s cold, 11 s warm), so two
  seeds of a cell do not compile the same programs side by side; when every queued unit waits on a
  sibling, the first one starts anyway."""
  compiling = {program_key(u[0]) for u in running} - warm
  return next((i for i, u in enumerate(queue) if program_key(u[0]) not in compiling), 0)


def units(trials: list[Trial], sweep: str, max_group: int = 64) -> list[list[Trial]]:
  """The trials in the order they run, as units: one trial each, except random-init controls with
  `eval.vmap_trials` that share one program (`eval.group.shape_key`), which run as groups of up to
  `max_group` in one process."""
  groups: dict[str, list[Trial]] = {}
  out: list[list[Trial]] = []
  for t in trials:
    cfg = trial_config(t, sweep)
    if t.invalid or not (cfg["eval"].get("vmap_trials") and groupable(cfg)):
      out.append([t])
      continue
    key = shape_key(cfg)
    if key not in groups or len(groups[key]) >= max_group:
      groups[key] = []
      out.append(groups[key])
    groups[key].append(t)
  return out


class Runner:
  def __init__(self, sweep: str, trials: list[Trial], root: str, parallel: int = 1,
               force: bool = False, argv: list[str] | None = None, only: list[str] | None = None):
    """`only`: run just these trials (e.g. the one a W&B agent was given); the others are listed."""
    self.sweep, self.trials, self.parallel = sweep, trials, max(1, parallel)
    names = [t.name for t in trials]
    for name in only or ():
      if name not in names:
        raise ConfigError("--trial", name, reason=f"no such trial in sweep {sweep} (see --dry-run)")
    self.selected = [t for t in trials if not only or t.name in only]
    self.only = bool(only)
    self.sweep_dir = str(path(root) / sweep)  # local or gs://
    self.force, self.argv = force, list(argv or sys.argv)
    self.stop_signal: int | None = None

  def trial_dir(self, trial: Trial) -> str:
    return str(path(self.sweep_dir) / trial.name)

  def _on_signal(self, signum, frame) -> None:
    self.stop_signal = signum

  def changed_trials(self) -> dict[str, list[str]]:
    """{trial: its config differences} for trials that ran before with another config."""
    changed = {}
    for t in self.selected:
      old = trial_record(self.trial_dir(t)).get("config")
      if old is not None and not t.invalid:
        diff = config_diff(old, trial_config(t, self.sweep))
        if diff:
          changed[t.name] = diff
    return changed

  def check_changed(self) -> list[str]:
    """Refuse (RunDirError, one line) to reuse trials whose config changed since they ran, unless
    `force`; with `force`, such trials run again from their own directory (resumed from their
    checkpoint under the new config). Returns the names of those trials."""
    changed = self.changed_trials()
    if changed and not self.force:
      first, diff = next(iter(changed.items()))
      raise RunDirError(
          f"{len(changed)} trial(s) of {self.sweep_dir} ran with another config, e.g. {first}: "
          + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
          + "; use another --workdir, or --force to run them again with the new config")
    return list(changed)

  def record_invocation(self, forced: list[str]) -> None:
    """sweep.json: the current trials, and one entry per invocation of the sweep (never rewritten)."""
    file = path(self.sweep_dir) / "sweep.json"
    previous = read_json(file) or {}
    invocations = previous.get("invocations", [])
    invocations.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": self.argv,
                        "parallel": self.parallel, "trials": [t.name for t in self.selected],
                        "forced": forced})
    write_json_atomic(file, {
        "sweep": self.sweep, "invocations": invocations,
        "trials": [{"name": t.name, "overrides": t.overrides, "config": t.config.to_dict()}
                   for t in self.trials]})

  def run(self) -> dict[str, str]:
    """Run every trial not yet done, holding the sweep directory (one line naming the holder when
    another runner has it); returns {trial name: status}."""
    main = jax.process_index() == 0
    with lock.hold(self.sweep_dir, shared=self.only, enabled=main):
      return self._run(main)

  def claim(self, dirs: list[str]) -> bool:
    """Take the run locks of `dirs` (one unit's trials); False, with one line, when another process
    holds one of them (that trial is left to it; the locks taken here are given back)."""
    taken = []
    try:
      for d in dirs:
        lock.acquire(d)
        taken.append(d)
      return True
    except lock.Locked as e:
      for d in taken:
        lock.release(d)
      print(f"skipped: {e}", file=sys.stderr, flush=True)
      return False

  def _run(self, main: bool) -> dict[str, str]:
    forced = self.check_changed()
    if main:
      path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
      self.record_invocation(forced)
      for name in forced:
        set_trial(str(path(self.sweep_dir) / name), status="pending", error=None)
    todo = [t for t in self.selected if trial_record(self.trial_dir(t))["status"] not in SKIP
            or t.name in forced]
    if jax.process_count() > 1:  # every host runs the same trials, in step: process 0's list
      names = {t.name for t in todo}
      mine = np.array([t.name in names for t in self.selected], np.int32)
      todo = [t for t, m in zip(self.selected, multihost_utils.broadcast_one_to_all(mine)) if m]
    handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=len(self.selected), initial=len(self.selected) - len(todo), desc=self.sweep,
               unit="trial", disable=not main, dynamic_ncols=True)
    local: dict[str, str] = {}  # with several processes, each knows its own outcome
    try:
      if jax.process_count() > 1:
        local = self._run_in_process(todo, bar)
      else:
        self._run_subprocesses(todo, bar)
    finally:
      bar.close()
      for s, h in handlers.items():
        signal.signal(s, h)
    return {t.name: local.get(t.name) or trial_record(self.trial_dir(t))["status"] for t in self.selected}

  def _run_subprocesses(self, todo: list[Trial], bar) -> None:
    running: dict[str, tuple[list[Trial], subprocess.Popen, float, Any]] = {}
    queue = units(todo, self.sweep)
    # Programs already compiled into the sweep's persistent cache, by a done trial of the same cell.
    warm = {program_key(t) for t in self.trials if trial_record(self.trial_dir(t))["status"] in SKIP}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
         PARENT_ENV: str(os.getpid())}
    while (queue or running):
      if self.stop_signal is not None:
        for _, proc, _, _ in running.values():
          if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        queue = []
      while queue and len(running) < self.parallel and self.stop_signal is None:
        unit = queue.pop(next_trial(queue, [r[0] for r in running.values()], warm))
        dirs = [self.trial_dir(t) for t in unit]
        if not self.claim(dirs):
          bar.update(len(unit))
          continue
        if unit[0].invalid:  # rejected before anything is compiled; the others go on
          set_trial(dirs[0], status="failed", overrides=unit[0].overrides, error=unit[0].invalid,
                    wall_s=0.0)
          lock.release(dirs[0])
          bar.update(1)
          continue
        log = open(self.log_file(dirs[0]), "a")
        configs = [trial_config(t, self.sweep) for t in unit]
        for t, tdir, cfg in zip(unit, dirs, configs):  # before the trial process writes there too
          set_trial(tdir, status="running", overrides=t.overrides, error=None, pid=None, config=cfg)
        # No Python code runs between fork and exec (no preexec_fn), so nothing of JAX's threads is
        # duplicated; its own session keeps a Ctrl-C for the runner, which stops the trials in order.
        held_env, fds = lock.handed_down(dirs)
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.trial", *dirs], stdin=subprocess.PIPE,
                                stdout=log, stderr=subprocess.STDOUT, env={**env, **held_env},
                                cwd=ROOT, text=True, start_new_session=True, pass_fds=fds)
        proc.stdin.write(json.dumps(configs if len(unit) > 1 else configs[0]))
        proc.stdin.close()
        for tdir in dirs:
          set_trial(tdir, pid=proc.pid)
        running[unit[0].name] = (unit, proc, time.perf_counter(), log)
      for name, (unit, proc, start, log) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[name]
        wall = time.perf_counter() - start
        for t in unit:
          self.keep_log(t, unit[0])
          if len(unit) == 1 or trial_record(self.trial_dir(t))["status"] != "done":
            self._record(t, proc.returncode, wall / len(unit), log_of=unit[0])
          # else: the group process marked it done as it wrote it (before the group stopped)
          lock.release(self.trial_dir(t))
        warm.add(program_key(unit[0]))
        bar.update(len(unit))
      time.sleep(0.1)

  def log_file(self, tdir: str) -> str:
    """Where a trial process writes its output: TRIAL/trial.log, or for a sweep on an object store
    (a process writes only local files) a local file, copied into the trial's directory after it."""
    if "://" not in str(path(tdir)):
      return os.path.join(tdir, "trial.log")
    local = os.path.join(os.path.expanduser("~/.cache/looped/logs"), self.sweep)
    os.makedirs(local, exist_ok=True)
    return os.path.join(local, f"{path(tdir).name}.log")

  def keep_log(self, trial: Trial, writer: Trial | None = None) -> None:
    """Into the trial's directory: the log of the process that ran it (`writer`, the first trial of
    its group; default the trial itself), when that log was written elsewhere."""
    tdir, src = self.trial_dir(trial), self.log_file(self.trial_dir(writer or trial))
    if "://" in str(path(tdir)) or src != self.log_file(tdir):
      (path(tdir) / "trial.log").write_bytes(open(src, "rb").read())

  def _record(self, trial: Trial, code: int, wall_s: float, log_of: Trial | None = None) -> None:
    tdir = self.trial_dir(trial)
    log = self.log_file(self.trial_dir(log_of or trial))
    prev = trial_record(tdir).get("wall_s", 0.0) or 0.0
    wall = round(prev + wall_s, 2)
    if code == 0:
      set_trial(tdir, status="done", wall_s=wall, error=None)
    elif code == 3:
      set_trial(tdir, status="diverged", wall_s=wall, error=_error_text(log))
    elif code in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT):
      set_trial(tdir, status="pending", wall_s=wall, error="interrupted; rerun the sweep to resume")
    else:
      set_trial(tdir, status="failed", wall_s=wall, error=_error_text(log))

  def _run_in_process(self, todo: list[Trial], bar) -> dict[str, str]:
    """Multi-host: all processes run each trial together over the whole mesh."""
    main = jax.process_index() == 0
    statuses: dict[str, str] = {}
    for trial in todo:
      if self.stop_signal is not None:
        break
      tdir = self.trial_dir(trial)
      if main:  # every process follows process 0: a trial held elsewhere is skipped by all
        claimed = self.claim([tdir])
      if not bool(multihost_utils.broadcast_one_to_all(np.int32(claimed if main else 0))):
        bar.update(1)
        continue
      if main:
        set_trial(tdir, status="running", overrides=trial.overrides, error=None,
                  config=trial_config(trial, self.sweep))
      start = time.perf_counter()
      try:
        code, result = run_trial(ml_collections.ConfigDict(trial_config(trial, self.sweep)), tdir,
                                 progress=main)
        error = result.get("error") if code else None
      except Exception as e:  # one trial's failure must not end the sweep
        code, error = 1, error_line(e)
      statuses[trial.name] = {0: "done", 3: "diverged"}.get(code, "pending" if code >= 128 else "failed")
      if main:
        set_trial(tdir, status=statuses[trial.name], wall_s=round(time.perf_counter() - start, 2),
                  error=error)
        lock.release(tdir)
      bar.update(1)
    return statuses
