"""Orbax checkpoints of the train state (restored onto the target sharding) plus JSON metadata.
Resuming falls back from an unreadable newest checkpoint to the newest readable one and keeps the
damaged one aside."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging

from rundir.workdir import RunDirError, error_line, path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Orbax's own error logs off while a damaged checkpoint is read: its error is reported in one line."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def saved_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint in WORKDIR/checkpoints, read without creating anything."""
  directory = path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


class Checkpointer:
  """Asynchronous `CheckpointManager` in WORKDIR/checkpoints keeping the newest `keep` steps.

  Every process calls every method (orbax writes and reads collectively across hosts)."""

  def __init__(self, workdir: str, keep: int, save_concurrent_gb: int | None = None):
    """`save_concurrent_gb` bounds the bytes a save holds in flight (host memory; orbax: 96)."""
    self.directory = path(workdir) / "checkpoints"  # local or gs://, never a URL made local
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True)
    handlers = None if save_concurrent_gb is None else {
        "state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
        "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"),
                                         item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore `step` onto the shapes, dtypes and shardings of `abstract_state`
    (a pytree of jax.ShapeDtypeStruct); a damaged checkpoint raises RunDirError."""
    try:
      with _quiet():
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged or foreign files
      raise RunDirError(f"checkpoint {self.directory}/{step} is corrupt or does not match the "
                        f"model ({error_line(e)})") from None
    state = out["state"]
    self._check_shapes(step, abstract_state, state)
    return state, dict(out["meta"] or {})

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of `step`, onto `abstract_params` (shapes, dtypes, shardings): from a
    training checkpoint, or from a params-only one (an imported model has no optimizer state)."""
    item = {"params": abstract_params}
    try:
      with _quiet():
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    except Exception as e:  # orbax raises many types for damaged or foreign files
      raise RunDirError(f"checkpoint {self.directory}/{step} is corrupt or does not match the "
                        f"model ({error_line(e)})") from None
    self._check_shapes(step, item, out["state"])
    return out["state"]["params"]

  def _check_shapes(self, step: int, abstract: Any, restored: Any) -> None:
    bad: list[str] = []
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: bad.append(jax.tree_util.keystr(path)) if a.shape != b.shape else None,
        abstract, restored)
    if bad:
      raise RunDirError(f"checkpoint {self.directory}/{step} does not match the model at {bad[0]}")

  def restore_newest(self, abstract_state: Any, *, say: Callable[[str], None] | None = None
                     ) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest checkpoint that reads, or None if there is none.

    Newer checkpoints that do not read (corrupt or partly written) are renamed to
    `<step>.damaged-<UTC time>` beside the others, where orbax no longer sees them, and `say` gets
    one line for each. If none reads, the newest's error is raised and nothing is moved (a model
    that no longer matches its checkpoints is not damage)."""
    failed: list[tuple[int, RunDirError]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except RunDirError as e:
        failed.append((step, e))
        continue
      for bad, error in failed:
        aside = self._set_aside(bad)
        (say or _stderr)(f"resuming from step {step}: {error}; kept aside as {aside}")
      return state, meta, step
    if failed:
      raise failed[0][1]
    return None

  def _set_aside(self, step: int) -> str:
    """Rename checkpoint `step` out of orbax's sight (process 0; every process waits for it)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = self.directory / f"{step}.damaged-{stamp}"
    _sync(f"damaged-{step}-before")
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    _sync(f"damaged-{step}-after")
    self.manager.reload()
    return str(aside)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _stderr(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
