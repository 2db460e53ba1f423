"""The evaluation driver: what every evaluator of a run shares, written once.

An evaluator (fixed points `eval.evaluate`, halting `eval.halting`, a group of random-init controls
`eval.group`) is a small unit with one entry point; through this module each
- checks its input (`check_control`: a random-init control never lands on a trained run, nor on one
  of another config) and takes the default R (`iterations_of`);
- opens the run once (`open_evaluation`: `rundir.run.open_run`, sharded onto the run's mesh, the
  control's config.json written once);
- builds its batches (`eval_batch`, `eval_batches`: deterministic, as the trainer's evaluation);
- writes its files under WORKDIR/eval/STEP/ (`Evaluation.output_dir`) and logs to W&B once
  (`Evaluation.publish`: `rundir.logger.log_to_wandb`, into the run's own W&B run).
Several evaluators of one run share one `Evaluation` (`eval.suite`): the run opened once, and their
W&B records gathered and logged once (`defer`, `flush`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from configs.recurrence import max_recurrence
from rundir import distributed, outputs
from rundir.checkpoint import saved_steps
from rundir.logger import log_to_wandb
from rundir.run import Run, open_run
from rundir.workdir import (RunDirError, check_compatible, path, read_status, write_json_atomic,
                            write_status)
from tasks.synthetic import make_batch, task_of


def default_iterations(cfg: Any) -> int:
  """max(128, 4 x the training maximum)."""
  return max(128, 4 * max_recurrence(cfg.train))


def iterations_of(cfg: Any, given: int | None = None) -> int:
  """R: `given`, else the config's eval.iterations, else `default_iterations`."""
  return given or cfg.eval.iterations or default_iterations(cfg)


def check_control(cfg: Any, workdir: str) -> None:
  """A random-init control's run directory: refused when it holds a trained run, or another config."""
  if saved_steps(workdir):
    raise RunDirError(f"{workdir} holds a trained run; evaluate the random-init control elsewhere")
  if path(workdir).is_dir():
    check_compatible(workdir, cfg.to_dict())


def write_control_config(cfg: Any, workdir: str) -> None:
  """The control's run directory with its config.json (written once, never overwritten)."""
  path(workdir).mkdir(parents=True, exist_ok=True)
  if not (path(workdir) / "config.json").exists():
    write_json_atomic(path(workdir) / "config.json", cfg.to_dict())


def eval_batch(task: Any, cfg: Any, length: int, size: int, seed: int | None = None) -> dict:
  """The deterministic eval batch of `size` sequences of `length` ({"inputs", "targets", "mask"})."""
  b = make_batch(task, seed=cfg.train.seed if seed is None else seed, step=0, batch_size=size,
                 min_length=length, max_length=length, stream=1)
  b.pop("lengths")
  return b


def eval_batches(cfg: Any, task: Any = None) -> dict[int, dict]:
  """One eval batch of `train.eval_batch_size` per length: the training length and every test length."""
  task = task or task_of(cfg)
  return {n: eval_batch(task, cfg, n, cfg.train.eval_batch_size)
          for n in (cfg.task.train_length, *cfg.task.test_lengths)}


@dataclasses.dataclass
class Evaluation:
  """One opened run under evaluation: its config (resolved), the opened run, its task."""
  cfg: ml_collections.ConfigDict
  workdir: str
  run: Run
  task: Any
  init: bool = False
  defer: bool = False   # W&B records gathered by `publish` and logged once by `flush`
  pending: dict = dataclasses.field(default_factory=lambda: {"tables": {}, "images": {}, "summary": {}})

  @property
  def step(self) -> int:
    return self.run.step

  @property
  def main(self) -> bool:
    """With several processes, each evaluates; process 0 writes."""
    return jax.process_index() == 0

  def output_dir(self, name: str) -> str:
    """WORKDIR/eval/STEP/ for `name` (a new eval/STEP.N/ when that step's `name` exists)."""
    return outputs.output_dir(self.workdir, self.step, name)

  def publish(self, *, tables: dict | None = None, images: dict | None = None,
              summary: dict | None = None) -> None:
    """Log once to the run's own W&B run (resumed by the id in status.json) or, for a random-init
    control without one, a new run whose id status.json then keeps; nothing when W&B is disabled.
    With `defer`, gathered until `flush` (several evaluators of one run, logged once)."""
    if self.defer:
      for key, value in (("tables", tables), ("images", images), ("summary", summary)):
        self.pending[key].update(value or {})
      return
    status = read_status(self.workdir) or {}
    run_id = log_to_wandb(self.workdir, self.cfg.wandb, self.cfg.to_dict(),
                          run_id=status.get("wandb_run_id"),
                          job_type="init_control" if self.init else "train", step=self.step,
                          tables=tables, images=images, summary=summary)
    if run_id and status.get("wandb_run_id") is None and self.init:
      write_status(self.workdir, "done", wandb_run_id=run_id, step=0)

  def flush(self) -> None:
    """Log what the deferred evaluators gathered, once (nothing if they gathered nothing)."""
    self.defer, pending = False, self.pending
    if any(pending.values()):
      self.publish(**pending)


def open_evaluation(cfg: ml_collections.ConfigDict, workdir: str, *, init: bool = False,
                    defer: bool = False) -> Evaluation:
  """Open `workdir` for evaluation (`cfg` resolved): distributed set up, the guard of a random-init
  control, the run opened onto its mesh (the newest checkpoint, or the model at initialisation),
  and the control's config.json written by process 0. `defer`: W&B logged once, by `flush`."""
  distributed.initialize(cfg.distributed)
  if init:
    check_control(cfg, workdir)
  run = open_run(workdir, cfg=cfg, init=init)
  ev = Evaluation(cfg, workdir, run, task_of(cfg), init, defer)
  if ev.main:
    path(workdir).mkdir(parents=True, exist_ok=True)
    if init:
      write_control_config(cfg, workdir)
  return ev
