"""Jitted inference for the halting evaluation: the unfrozen trajectory's predictions (through
`looped_models.stepper`), fixed-r inference and adaptive halting; their wall time."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from looped_models.halting import halt_loop
from looped_models.sharding import place, to_host
from looped_models.stepper import Stepper


class Runner:
  """Jitted inference of one model: the full trajectory's predictions (the stepper, R iterations in
  one call), fixed r, and halting. With `mesh` (the parameters' mesh, `rundir.run.open_run`), token
  batches are split over its data axes where they divide (`looped_models.sharding.place`); `host`
  brings any result back whole to every process."""

  def __init__(self, graphdef: nnx.GraphDef, params: dict, R: int, seed: int, mesh: Mesh | None = None):
    self.params, self.mesh, self.R, key = params, mesh, R, jax.random.key(seed)
    read = lambda model, s_BSD, ctx, batch: model.decode(s_BSD, ctx).argmax(-1).astype(np.int32)
    self._stepper = Stepper(graphdef, params, read, seed=seed, chunk=R, mesh=mesh)

    def fixed(params, tokens_BS, *, r):
      return nnx.merge(graphdef, params)(tokens_BS, r, key=key).logits_BSV

    def halting(params, tokens_BS, threshold, *, criterion, slots):
      model = nnx.merge(graphdef, params)
      return halt_loop(model, tokens_BS, criterion=criterion, threshold=threshold, max_iters=R, key=key,
                       slots=slots)

    self._fixed = jax.jit(fixed, static_argnames=("r",))
    self._halting = jax.jit(halting, static_argnames=("criterion", "slots"))

  def place(self, tokens_BS: np.ndarray) -> jax.Array:
    return place({"tokens": tokens_BS}, self.mesh)["tokens"] if self.mesh else jax.device_put(tokens_BS)

  @staticmethod
  def host(tree: Any) -> Any:
    """A result (array or tuple of arrays) as numpy, whole, on every process."""
    return jax.tree.map(to_host, tree)

  def trajectory(self, tokens_BS: np.ndarray) -> np.ndarray:
    """Predictions after each of the R iterations, [R, B, S] (unfrozen, for curves and the oracle)."""
    return self._stepper.reads({"inputs": tokens_BS}, self.R)

  def fixed(self, tokens_BS: np.ndarray, r: int, rows: int | None = None) -> Callable[[], Any]:
    """Fixed inference at r iterations, the whole batch at once or `rows` sequences per call."""
    if rows is None or rows >= len(tokens_BS):
      whole = self.place(tokens_BS)
      return lambda: self._fixed(self.params, whole, r=r)
    parts = [self.place(tokens_BS[i:i + rows]) for i in range(0, len(tokens_BS), rows)]
    return lambda: [self._fixed(self.params, p, r=r) for p in parts]

  def halting(self, tokens_BS: np.ndarray, criterion: str, threshold: float,
              slots: int | None = None) -> Callable[[], Any]:
    thr = np.float32(threshold)
    slots = None if slots is not None and slots >= len(tokens_BS) else slots  # the same loop: one compile
    tokens = self.place(tokens_BS)
    return lambda: self._halting(self.params, tokens, thr, criterion=criterion, slots=slots)


def median_time(call: Callable[[], Any], repeats: int) -> float | None:
  """Median seconds of `repeats` calls of an already compiled and warmed-up `call` (None if 0)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) if times else None
