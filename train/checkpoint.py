"""Orbax checkpoints of the train state (restored onto the target sharding) plus JSON metadata."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.workdir import RunDirError


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def saved_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint in WORKDIR/checkpoints, read without creating anything."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


class Checkpointer:
  """Asynchronous `CheckpointManager` in WORKDIR/checkpoints keeping the newest `keep` steps.

  Every process calls every method (orbax writes and reads collectively across hosts)."""

  def __init__(self, workdir: str, keep: int, save_concurrent_gb: int | None = None):
    """`save_concurrent_gb` bounds the bytes a save holds in flight (host memory; orbax: 96)."""
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged or foreign files
      raise RunDirError(f"checkpoint {self.directory}/{step} is corrupt or does not match the "
                        f"model ({_first_line(e)})") from None
    state = out["state"]
    self._check_shapes(step, abstract_state, state)
    return state, dict(out["meta"] or {})

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of `step`, onto `abstract_params` (shapes, dtypes, shardings): from a
    training checkpoint, or from a params-only one (an imported model has no optimizer state)."""
    item = {"params": abstract_params}
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    except Exception as e:  # orbax raises many types for damaged or foreign files
      raise RunDirError(f"checkpoint {self.directory}/{step} is corrupt or does not match the "
                        f"model ({_first_line(e)})") from None
    self._check_shapes(step, item, out["state"])
    return out["state"]["params"]

  def _check_shapes(self, step: int, abstract: Any, restored: Any) -> None:
    bad: list[str] = []
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: bad.append(jax.tree_util.keystr(path)) if a.shape != b.shape else None,
        abstract, restored)
    if bad:
      raise RunDirError(f"checkpoint {self.directory}/{step} does not match the model at {bad[0]}")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
