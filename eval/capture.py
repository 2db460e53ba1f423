"""Run a model's own forward pass for R iterations, chunk by chunk, for the analysis and the curves.

Nothing here re-implements the block: `LoopedTransformer.iterate` runs `chunk` iterations at a time
(returning that chunk's per-layer states and attention maps), so the device holds O(chunk) states,
never all R. The trajectory is deterministic, so `analyze_stream` can replay it twice.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from looped_models.sharding import place, to_host
from tasks.metrics import text_counts
from tasks.metrics import accuracy_counts


class Capture:
  """Jitted pieces of one model for trajectory capture; `params` is the pure-dict parameter tree."""

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
    self.graphdef, self.chunk, self.mesh = graphdef, chunk, mesh
    stacked = isinstance(seed, (list, tuple))
    self.load(params, seed)

    def start(params, key, tokens_BS, start_key):
      """The injected input e and the initial state: the model's own (start_key None), or a random
      one (truncated normal of the per-token scale of e: a path-independence start)."""
      model = nnx.merge(graphdef, params)
      ctx = model.context(tokens_BS.shape[1])
      e_BSD = model.encode(tokens_BS, ctx)
      if start_key is None:
        return model.initial_state(e_BSD, key), e_BSD
      scale_BS1 = jnp.sqrt(jnp.mean(jnp.square(e_BSD.astype(jnp.float32)), -1, keepdims=True))
      noise = jax.random.truncated_normal(start_key, -3.0, 3.0, e_BSD.shape, jnp.float32)
      return (noise * scale_BS1).astype(e_BSD.dtype), e_BSD

    def advance(params, s_BSD, e_BSD, targets_BS, mask_BS, *, n: int, attention: bool):
      """n iterations: the new state, per-layer states [n,k,B,S,D], attention [n,k,B,H,S,S], the
      accuracy counts of the model's prediction after each of the n iterations, and those
      predictions [n,B,S]."""
      model = nnx.merge(graphdef, params)
      ctx = model.context(s_BSD.shape[1])
      trace = model.iterate(s_BSD, e_BSD, ctx, n, n, return_states=True, return_attention=attention)

      def read(s):  # one iteration's prediction (and text loss), one logits tensor at a time
        logits_BSV = model.decode(s, ctx)
        extra = ({} if token_bytes is None else
                 text_counts(logits_BSV, targets_BS, mask_BS, token_bytes))
        return logits_BSV.argmax(-1).astype(jnp.int32), extra

      preds_nBS, extra = jax.lax.map(read, trace.states_RkBSD[:, -1])
      counts = jax.vmap(lambda p: accuracy_counts(p, targets_BS, mask_BS))(preds_nBS)
      counts.update(extra)
      att = trace.attention_RkBHSS
      S = s_BSD.shape[1]
      if att is not None and S > attention_rows:
        att = att[..., np.linspace(0, S - 1, attention_rows).round().astype(int), :]
      return trace.state_BSD, trace.states_RkBSD, att, counts, preds_nBS

    if stacked:
      one_start, one_advance = start, advance
      start = jax.vmap(one_start, in_axes=(0, 0, 0, None))

      def advance(params, s_BSD, e_BSD, targets_BS, mask_BS, *, n: int, attention: bool):
        step = functools.partial(one_advance, n=n, attention=attention)
        return jax.vmap(step)(params, s_BSD, e_BSD, targets_BS, mask_BS)
    self._start = jax.jit(start)
    self._advance = jax.jit(advance, static_argnames=("n", "attention"))

  def load(self, params: dict, seed: int | list[int]) -> None:
    """Other parameters (and seeds) of the same shapes: the compiled programs are reused."""
    self.params = params
    self.keys = (jnp.stack([jax.random.key(s) for s in seed]) if isinstance(seed, (list, tuple))
                 else jax.random.key(seed))

  def run(self, batch: dict, R: int, *, states: bool = True, attention: bool = False,
          start_key: jax.Array | None = None
          ) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, dict, np.ndarray]]:
    """Yield, per chunk of consecutive iterations, (states [n,k,B,S,D] or None,
    attention [n,k,B,H,S,S] or None, accuracy counts per iteration {name: [n]}, predictions [n,B,S])
    as numpy. `start_key`: start from a random state instead of the model's own."""
    batch = self.place(batch)
    s_BSD, e_BSD = self._start(self.params, self.keys, batch["inputs"], start_key)
    done = 0
    while done < R:
      n = min(self.chunk, R - done)
      s_BSD, st, att, counts, preds = self._advance(self.params, s_BSD, e_BSD, batch["targets"],
                                                    batch["mask"], n=n, attention=attention)
      done += n
      yield (to_host(st) if states else None, to_host(att) if attention else None,
             jax.tree.map(to_host, counts), to_host(preds))

  def place(self, batch: dict) -> dict:
    return place(batch, self.mesh)

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
    cos_KBS = np.stack([(unit(own) * unit(end(jax.random.key(seed * 1000 + i)))).sum(-1)
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
    parts = list(self.run(batch, R, states=False))
    c = {k: np.concatenate([p[2][k] for p in parts]).astype(np.float64) for k in parts[0][2]}
    out = {"exact_match": c["seq_right"] / np.maximum(c["seq_count"], 1),
           "per_position": c["pos_right"] / np.maximum(c["pos_count"], 1),
           "predictions": np.concatenate([p[3] for p in parts])}
    if "nats" in c:  # text: loss (nats per token) and bits per byte after each iteration count
      out["loss"] = c["nats"] / np.maximum(c["pos_count"], 1)
      out["bits_per_byte"] = c["nats"] / np.maximum(c["bytes"], 1) / np.log(2)
    return out
