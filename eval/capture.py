"""Run a model's own forward pass for R iterations, chunk by chunk, for the analysis and the curves.

Nothing here re-implements the block: `looped_models.stepper.Stepper` runs `chunk` iterations at a
time (returning that chunk's per-layer states and attention maps, and each iteration's prediction
and its counts), so the device holds O(chunk) states, never all R. The trajectory is deterministic,
so `analyze_stream` can replay it twice.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from looped_models.stepper import Stepper
from tasks.metrics import accuracy_counts, text_counts


def prediction_read(token_bytes: np.ndarray | None = None):
  """A stepper read: {"preds" [B, S] (argmax), the accuracy counts (`tasks.metrics.accuracy_counts`)
  and, with `token_bytes` (text), "nats" and "bytes" (`text_counts`)}."""
  def read(model, s_BSD, ctx, batch):
    logits_BSV = model.decode(s_BSD, ctx)
    preds_BS = logits_BSV.argmax(-1).astype(jnp.int32)
    out = {"preds": preds_BS, **accuracy_counts(preds_BS, batch["targets"], batch["mask"])}
    if token_bytes is not None:
      out.update(text_counts(logits_BSV, batch["targets"], batch["mask"], token_bytes))
    return out
  return read


@jax.jit
def _random_state(e_BSD: jax.Array, key: jax.Array) -> jax.Array:
  scale_BS1 = jnp.sqrt(jnp.mean(jnp.square(e_BSD.astype(jnp.float32)), -1, keepdims=True))
  noise = jax.random.truncated_normal(key, -3.0, 3.0, e_BSD.shape, jnp.float32)
  return (noise * scale_BS1).astype(e_BSD.dtype)


def random_start(seed: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A path-independence start: a truncated normal state of the per-token scale of e."""
  return lambda s_BSD, e_BSD: _random_state(e_BSD, jax.random.key(seed))


class Capture:
  """Trajectory capture of one model; `params` is the pure-dict parameter tree."""

  def __init__(self, graphdef: nnx.GraphDef, params: dict, *, chunk: int = 4, seed: int | list[int] = 0,
               token_bytes: np.ndarray | None = None, mesh: Mesh | None = None,
               attention_rows: int = 128):
    """`token_bytes` ([V] UTF-8 bytes per token id; text) adds the summed loss ("nats") and the
    targets' "bytes" to the per-iteration counts. With `mesh` (the parameters' mesh, see
    rundir.run.open_run), batches are split over its data axes where they divide, and every process
    gets the whole result back. Attention maps leave the device with at most `attention_rows` evenly
    spaced query rows ([n, k, B, H, rows, S]: all rows up to that length), so what reaches the host
    grows with S, not S^2.

    Several models of one shape at once (e.g. random-init controls that differ only in their seed
    and init scales): `params` with a leading axis of G models, `seed` a list of their G seeds, and
    every batch given to `run` with a leading axis of G too (each model its own tokens). `run` then
    yields every array with that leading axis, computed under `jax.vmap`."""
    self.stepper = Stepper(graphdef, params, prediction_read(token_bytes), seed=seed, chunk=chunk,
                           mesh=mesh, attention_rows=attention_rows)

  def load(self, params: dict, seed: int | list[int]) -> None:
    """Other parameters (and seeds) of the same shapes: the compiled programs are reused."""
    self.stepper.load(params, seed)

  def run(self, batch: dict, R: int, *, states: bool = True, attention: bool = False,
          start_key: int | None = None
          ) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, dict, np.ndarray]]:
    """Yield, per chunk of consecutive iterations, (states [n,k,B,S,D] or None,
    attention [n,k,B,H,S,S] or None, accuracy counts per iteration {name: [n]}, predictions [n,B,S])
    as numpy. `start_key` (an int): start from a random state instead of the model's own."""
    start = None if start_key is None else random_start(start_key)
    for out in self.stepper.run(batch, R, layers=states, attention=attention, start=start):
      counts = dict(out.reads)
      preds = counts.pop("preds")
      yield out.layers_nkBSD, out.attention_nkBHSS, counts, preds

  def path_independence(self, batch: dict, R: int, starts: int, seed: int = 0) -> dict:
    """Run the same tokens for R iterations from the model's own initial state and from `starts`
    random ones; compare where each token's last block layer ends: {"starts", "min_cosine" (over
    tokens and starts, of each end against the model's own end), "mean_cosine", "same_point" (share
    of tokens whose every end lies within 1 - cos < 0.05 of the model's own: one fixed point,
    reached from anywhere)}."""
    def end(start_key):
      last = None
      for st, _, _, _ in self.run(batch, R, start_key=start_key):
        last = st[-1, -1]
      return last.astype(np.float64)

    own = end(None)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
    cos_KBS = np.stack([(unit(own) * unit(end(seed * 1000 + i))).sum(-1)
                        for i in range(1, starts + 1)])
    return {"starts": starts, "min_cosine": float(np.nanmin(cos_KBS)),
            "mean_cosine": float(np.nanmean(cos_KBS)),
            "same_point": float(np.mean(np.all(1 - cos_KBS < 0.05, axis=0)))}

  def chunks(self, batch: dict, R: int, attention: bool = True) -> Callable[[], Iterator]:
    """A replayable chunk source for `eval.fixed_points.analyze_stream`."""
    return lambda: ((st, att) for st, att, _, _ in self.run(batch, R, attention=attention))

  def accuracy_curve(self, batch: dict, R: int) -> dict[str, np.ndarray]:
    """Exact-match and per-position accuracy after each of 1..R iterations ([R] arrays), the
    predictions behind them ([R, B, S]) and, for text, "loss" and "bits_per_byte" ([R])."""
    c = self.stepper.reads(batch, R)
    preds = c.pop("preds")
    c = {k: v.astype(np.float64) for k, v in c.items()}
    out = {"exact_match": c["seq_right"] / np.maximum(c["seq_count"], 1),
           "per_position": c["pos_right"] / np.maximum(c["pos_count"], 1),
           "predictions": preds}
    if "nats" in c:  # text: loss (nats per token) and bits per byte after each iteration count
      out["loss"] = c["nats"] / np.maximum(c["pos_count"], 1)
      out["bits_per_byte"] = c["nats"] / np.maximum(c["bytes"], 1) / np.log(2)
    return out
