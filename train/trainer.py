"""The training loop: config -> task data -> model -> sharded train step -> checkpoints and logs.

Every process runs this same code; process 0 alone writes progress, metrics, W&B and the run files.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from configs import recurrence
from looped_models import LoopedTransformer, sharding
from rundir import distributed
from rundir.checkpoint import Checkpointer
from rundir.config import is_text, resolve, seq_lengths
from rundir.logger import MetricsLogger
from rundir.run import check_init_from, initial_params
from rundir.workdir import check_compatible, check_reachable, read_status, record_config, write_status
from rundir.writing import writing
from tasks.metrics import fractions
from tasks.synthetic import make_batch, task_of
from train import programs
from train.step import TrainState


class Diverged(Exception):
  """The loss became NaN or infinite."""


class LogWindow:
  """The training steps since the last log line: their metrics (on the device until flushed) and the
  time they took."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step, self.pending = tokens_per_step, []
    self.restart()

  def restart(self) -> None:
    """Time from now (an evaluation in between is not training time)."""
    self.start = time.perf_counter()

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)

  def wait_for_previous(self) -> None:
    """Wait for the step before the newest one, so that the host runs at most one step ahead of the
    device (it prepares the next batch meanwhile) and never queues up a whole log window."""
    if len(self.pending) > 1:
      jax.block_until_ready(self.pending[-2])

  def flush(self, step: int) -> dict[str, float] | None:
    """The window's mean metrics with steps/s and tokens/s (None if empty); Diverged on a NaN loss."""
    if not self.pending:
      return None
    host = jax.device_get(self.pending)
    losses = np.array([m["train/loss"] for m in host])
    if not np.all(np.isfinite(losses)):
      raise Diverged(f"loss is {losses[~np.isfinite(losses)][0]} at step "
                     f"{step - len(host) + int(np.argmin(np.isfinite(losses)))}")
    elapsed = time.perf_counter() - self.start
    metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    metrics["train/steps_per_s"] = len(host) / elapsed
    metrics["train/tokens_per_s"] = len(host) * self.tokens_per_step / elapsed
    self.pending = []
    self.restart()
    return metrics


class Trainer:
  """Builds everything for one run; `run()` trains to `train.steps` (resuming from WORKDIR)."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    # Everything that can reject the input runs first, before any compile or write.
    self.cfg = cfg = resolve(cfg)
    self.workdir = workdir
    distributed.initialize(cfg.distributed)
    self.mesh = sharding.make_mesh(cfg.mesh)
    if cfg.train.init_from:
      check_init_from(cfg)
    self.is_main = jax.process_index() == 0
    self.old_config = (check_compatible(workdir, cfg.to_dict()) if check_reachable(workdir).exists()
                       else None)
    self.task = task_of(cfg)
    self.text = is_text(cfg)
    self.lengths = seq_lengths(cfg)
    self.programs = programs.build(cfg, self.mesh, self.task.data.token_bytes if self.text else None)
    self.abstract_state = self.programs.abstract_state
    self._stop_signal: int | None = None

  # -- pieces -------------------------------------------------------------------------------------

  def init_state(self) -> TrainState:
    cfg = self.cfg
    if cfg.train.init_from:  # another run's parameters (e.g. an imported model), a fresh optimizer
      params = initial_params(cfg, self.abstract_state["params"])
      start = lambda params: {"params": params, "opt_state": self.programs.tx.init(params),
                              "step": jnp.zeros((), jnp.int32)}
      return jax.jit(start, out_shardings=self.programs.state_sharding)(params)

    def init(seed):  # the seed traced, so that seeds share one compiled program (a sweep's cache)
      model = LoopedTransformer(cfg.model, rngs=nnx.Rngs(jax.random.key(seed)))
      params = nnx.to_pure_dict(nnx.state(model))
      return {"params": params, "opt_state": self.programs.tx.init(params),
              "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=self.programs.state_sharding)(np.int32(cfg.train.seed))

  def global_batch(self, step: int, min_length: int, max_length: int, batch_size: int,
                   stream: int) -> dict:
    """The deterministic global batch as sharded arrays; this process generates only the rows its
    devices hold (a slice when the batch axis spans processes, all rows when it is replicated)."""
    S = self.task.seq_len(max_length)
    index = self.programs.batch_sharding.addressable_devices_indices_map((batch_size, S))
    spans = [sl[0].indices(batch_size)[:2] for sl in index.values()]
    first, stop = min(lo for lo, _ in spans), max(hi for _, hi in spans)
    local = make_batch(self.task, seed=self.cfg.train.seed, step=step, batch_size=batch_size,
                       min_length=min_length, max_length=max_length, stream=stream,
                       rows=(first, stop))
    local.pop("lengths")

    def array(v: np.ndarray) -> jax.Array:
      def shard(idx):
        lo, hi, _ = idx[0].indices(batch_size)
        return v[lo - first:hi - first]
      return jax.make_array_from_callback((batch_size, S), self.programs.batch_sharding, shard)

    return {k: array(v) for k, v in local.items()}

  def evaluate(self, params: dict) -> dict[str, float]:
    """Accuracy at the training length and every test length, at each evaluation iteration count
    (text: held-out loss, bits per byte and next-token accuracy)."""
    if self.text:
      return self.evaluate_text(params)
    t = self.cfg.train
    out: dict[str, float] = {}
    for n in self.lengths:
      batch = self.global_batch(0, n, n, t.eval_batch_size, stream=1)
      best = (-1.0, 0)
      per_r = jax.device_get(self.programs.eval_step(params, batch))  # one pass, read at every r
      for i, r in enumerate(t.eval_recurrences):
        counts = {k: v[i] for k, v in per_r.items()}
        acc = fractions(counts)
        for name, value in acc.items():
          out[f"eval/len{n}/iters{r}/{name}"] = value
        out[f"eval/len{n}/iters{r}/loss"] = float(counts["loss"])
        best = max(best, (acc["exact_match"], -r))
      out[f"eval/len{n}/best_exact_match"] = best[0]
      out[f"eval/len{n}/best_iters"] = -best[1]
    return out

  def evaluate_text(self, params: dict) -> dict[str, float]:
    """Held-out windows of the validation split at every `train.eval_recurrences` count:
    val/iters{r}/{loss, bits_per_byte, accuracy} (loss in nats per token), and the best of them
    (windows of a test length n > train_length: val/len{n}/iters{r}/...)."""
    t = self.cfg.train
    out: dict[str, float] = {}
    for n in self.lengths:
      prefix = "val/" if n == self.cfg.task.train_length else f"val/len{n}/"
      batch = self.global_batch(0, n, n, t.eval_batch_size, stream=1)
      best = (np.inf, 0)
      per_r = jax.device_get(self.programs.eval_step(params, batch))  # one pass, read at every r
      for i, r in enumerate(t.eval_recurrences):
        c = {k: v[i] for k, v in per_r.items()}
        loss = float(c["nats"]) / max(float(c["pos_count"]), 1.0)
        out[f"{prefix}iters{r}/loss"] = loss
        out[f"{prefix}iters{r}/bits_per_byte"] = float(c["nats"]) / max(float(c["bytes"]), 1.0) / np.log(2)
        out[f"{prefix}iters{r}/accuracy"] = fractions(c)["per_position"]
        best = min(best, (loss, r))
      out[f"{prefix}best_loss"], out[f"{prefix}best_iters"] = best
    return out

  def _on_signal(self, signum, frame) -> None:
    self._stop_signal = signum

  def _stop_requested(self) -> bool:
    """Whether any process was signalled; every process must stop at the same step, so with several
    processes the flag is agreed on (an all-gather, done only at logging steps)."""
    if jax.process_count() == 1:
      return self._stop_signal is not None
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self._stop_signal or 0))
    if self._stop_signal is None and flags.max() > 0:
      self._stop_signal = int(flags.max())
    return self._stop_signal is not None

  # -- the loop -----------------------------------------------------------------------------------

  def run(self, ends_run: bool = True) -> dict[str, Any]:
    """Train to `train.steps`, resuming from the newest checkpoint. Returns the final status record.
    `ends_run=False` (a sweep trial, evaluated next): status.json stays `running` when training is done.
    The run directory is held for the whole run (rundir/writing.py): a second writer is refused, and
    an error on the way is recorded in status.json and raised as RunFailed."""
    state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.abstract_state))
    with writing(self.workdir, main=self.is_main, need_bytes=state_bytes):
      ckpt = Checkpointer(self.workdir, self.cfg.train.keep_checkpoints)
      try:
        result = self._train(ckpt, ends_run)
      except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
          ckpt.close()
        raise
      ckpt.close()  # waits for the last save: a failure to write it is the run's failure
      return result

  def _train(self, ckpt: Checkpointer, ends_run: bool) -> dict[str, Any]:
    cfg, t = self.cfg, self.cfg.train
    state, latest, meta = self._resume(ckpt)
    step = int(state["step"])
    prior = read_status(self.workdir) if self.is_main else None
    if latest is not None and step >= t.steps:  # finished earlier: leave the run as it is
      return {**(prior or {}), "status": "done", "step": step, "exit_code": 0}
    run_id = meta.get("wandb_run_id") or (prior or {}).get("wandb_run_id")
    logger = MetricsLogger(self.workdir, cfg.wandb, cfg.to_dict(), run_id, enabled=self.is_main)
    if self.is_main:
      record_config(self.workdir, cfg.to_dict(), self.old_config)
      write_status(self.workdir, "running", step=step, steps=t.steps, error=None,
                   wandb_run_id=logger.run_id, resumed_from=latest)
    window = LogWindow(t.batch_size * self.task.seq_len(cfg.task.train_length))
    bar = tqdm(total=t.steps, initial=step, disable=not self.is_main, desc="train", unit="step",
               dynamic_ncols=True)
    started = time.perf_counter()
    final: dict[str, Any] = {}
    status, exit_code = "done", 0

    def flush() -> None:
      metrics = window.flush(step)
      if metrics:
        metrics["train/lr"] = float(self.programs.schedule(step))
        metrics["elapsed_s"] = time.perf_counter() - started
        logger.log(step, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", steps_s=f"{metrics['train/steps_per_s']:.1f}",
                        tok_s=f"{metrics['train/tokens_per_s']:.0f}")

    try:
      with self._signals_caught():
        stop = False
        while step < t.steps and not stop:
          batch = self.global_batch(step, cfg.task.min_train_length, cfg.task.train_length,
                                    t.batch_size, stream=0)
          state, metrics = self.programs.train_step(state, batch, jnp.int32(recurrence.sample(t, step)))
          window.add(metrics)
          window.wait_for_previous()  # at most one step in flight: the bar counts finished steps
          step += 1
          bar.update(1)
          at_end = step == t.steps
          save = at_end or (t.checkpoint_every and step % t.checkpoint_every == 0)
          if save or step % t.log_every == 0:
            flush()  # also the divergence check: never checkpoint a NaN state
            stop = self._stop_requested()
          elif jax.process_count() == 1:
            stop = self._stop_signal is not None
          if t.eval_every >= 0 and (at_end or (t.eval_every and step % t.eval_every == 0)):
            final = self.evaluate(state["params"])
            logger.log(step, {**final, "elapsed_s": time.perf_counter() - started})
            window.restart()
          if save:
            ckpt.save(step, state, {"wandb_run_id": logger.run_id})
        if stop and step < t.steps:
          flush()
          if ckpt.latest_step() != step:
            ckpt.save(step, state, {"wandb_run_id": logger.run_id})
          status, exit_code = "interrupted", 128 + self._stop_signal
    except Diverged as e:
      status, exit_code = "diverged", 3
      final = {"error": f"training diverged: {e}"}
    except BaseException:
      bar.close()
      with contextlib.suppress(Exception):
        logger.close(exit_code=1)
      raise
    bar.close()
    logger.summary({k: v for k, v in final.items() if k != "error"})
    logger.close(exit_code=0 if status == "done" else 1)
    if self.is_main:
      write_status(self.workdir, "running" if status == "done" and not ends_run else status,
                   step=step, error=final.get("error"),
                   final={k: v for k, v in final.items() if k.startswith(("eval/", "val/"))})
    return {"step": step, "exit_code": exit_code, **final, "status": status}

  @contextlib.contextmanager
  def _signals_caught(self):
    """SIGTERM and SIGINT set the stop flag (the loop saves a checkpoint and stops) for the block."""
    old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield
    finally:
      for s, h in old.items():
        signal.signal(s, h)

  def _resume(self, ckpt: Checkpointer) -> tuple[TrainState, int | None, dict]:
    """(state, the step it was restored from or None, the checkpoint's metadata): the newest
    readable checkpoint in WORKDIR (newer damaged ones are set aside), or a fresh state."""
    restored = ckpt.restore_newest(self.abstract_state)  # falls back past damaged checkpoints
    if restored is None:
      return self.init_state(), None, {}
    state, meta, step = restored
    return state, step, meta
