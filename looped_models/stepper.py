"""One stepper: run a model's block iteration by iteration and read each iteration's state.

Every consumer of per-iteration states or predictions goes through here: the evaluator's trajectory
capture (eval/capture.py), the halting evaluation's unfrozen trajectory (eval/halting.py) and the
trainer's evaluation at several iteration counts (train/step.py). The block itself is the model's
own `block_step`; nothing here re-implements it.

API
- A *read* is `read(model, s_BSD, ctx, batch) -> pytree of arrays`: what one iteration's state gives
  (e.g. the argmax prediction and accuracy counts of `tasks.metrics`, or the logits and the latent
  `model.latent(s_BSD)`). `batch` is the dict the caller passes (targets, mask, ...), as placed.
- `steps(model, s_BSD, e_BSD, ctx, n, read, batch, at=...)`: pure (call it inside your own jit).
  n iterations from s_BSD; returns `Steps(state_BSD, reads, layers_nkBSD, attention_nkBHSS)` with
  every leaf of `reads` stacked over the n iterations ([n, ...]). `at` ([n] booleans, static):
  read only where True (zeros elsewhere; a decode costs as much as an iteration or more).
- `trace(model, tokens_BS, n, read, batch, key=..., at=..., state0=...)`: pure, from the tokens:
  encode, the model's initial state (`key`, or `state0` [B, S, D]), then `steps`.
- `Stepper(graphdef, read, ...)`: the jitted form over a pure-dict parameter tree, `chunk`
  iterations per device call (the device holds O(chunk) states, never all R), batches placed on
  `mesh`, results brought back whole to every process: `run(batch, R, ...)` yields one `Steps` of
  numpy arrays per chunk. With `stacked` the parameters, keys and batches carry a leading axis of G
  models of one shape, run under `jax.vmap`.
  Reads are stacked over every iteration of a chunk (zeros where `at` skips them), so a large read
  (logits [B, S, V]) wants a small chunk. A converter's logits and latents at iteration counts Rs:
    st = Stepper(graphdef, params, lambda m, s, ctx, b: {"logits": m.decode(s, ctx),
                                                         "latent": m.latent(s)}, chunk=1)
    out = st.reads({"inputs": tokens_BS}, max(Rs), at=Rs, start=lambda s0, e: state0)
  then out["logits"][i] is the i-th of sorted(set(Rs)) (`start`: another initial state).

The forward pass is deterministic: reading at r from one pass of max(r) iterations gives what r
separate passes give.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from looped_models.sharding import place, to_host

Read = Callable[[Any, jax.Array, Any, dict], Any]


class Steps(NamedTuple):
  state_BSD: Any                     # the state after the last iteration run
  reads: Any                         # the read's pytree, each leaf [n, ...]
  layers_nkBSD: Any = None           # per-iteration, per-block-layer outputs (with layers=True)
  attention_nkBHSS: Any = None       # per-iteration, per-block-layer attention (with attention=True)


def read_mask(n: int, at: Sequence[int] | None) -> np.ndarray | None:
  """[n] booleans, True at the 1-based iteration counts `at` (None: every iteration)."""
  if at is None:
    return None
  mask = np.zeros(n, bool)
  mask[[r - 1 for r in at if 1 <= r <= n]] = True
  return mask


def steps(model: Any, s_BSD: jax.Array, e_BSD: jax.Array, ctx: Any, n: int, read: Read, batch: dict,
          *, at: np.ndarray | None = None, layers: bool = False, attention: bool = False,
          attention_rows: int | None = None) -> Steps:
  """n block iterations from s_BSD, reading each (or each where `at`, see the module docstring).
  Attention maps keep at most `attention_rows` evenly spaced query rows ([.., rows, S])."""
  S = s_BSD.shape[1]
  rows = (np.linspace(0, S - 1, attention_rows).round().astype(int)
          if attention and attention_rows is not None and S > attention_rows else None)
  do_read = lambda s: read(model, s, ctx, batch)

  def one(s_BSD, read_now):
    s_BSD, st_kBSD, att_kBHSS = model.block_step(s_BSD, e_BSD, ctx, attention=attention)
    if read_now is None:
      r = do_read(s_BSD)
    else:
      zeros = lambda s: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(do_read, s))
      r = jax.lax.cond(read_now, do_read, zeros, s_BSD)
    if rows is not None:
      att_kBHSS = att_kBHSS[..., rows, :]
    return s_BSD, (r, st_kBSD if layers else None, att_kBHSS)

  xs = None if at is None else jnp.asarray(at)
  s_BSD, (reads, st, att) = jax.lax.scan(one, s_BSD, xs, length=n)
  return Steps(s_BSD, reads, st, att)


def trace(model: Any, tokens_BS: jax.Array, n: int, read: Read, batch: dict, *,
          key: jax.Array | None = None, at: np.ndarray | None = None,
          state0: jax.Array | None = None, **options) -> Steps:
  """`steps` from the tokens: encode, the model's initial state (or `state0`), n iterations."""
  ctx = model.context(tokens_BS.shape[1])
  e_BSD = model.encode(tokens_BS, ctx)
  s_BSD = model.initial_state(e_BSD, key) if state0 is None else state0.astype(e_BSD.dtype)
  return steps(model, s_BSD, e_BSD, ctx, n, read, batch, at=at, **options)


class Stepper:
  """The jitted stepper of one model (or, `stacked`, of G models of one shape); see the module
  docstring. `params` is the pure-dict parameter tree; `seed` an int (a list of G with `stacked`)."""

  def __init__(self, graphdef: nnx.GraphDef, params: dict, read: Read, *, seed: int | list[int] = 0,
               chunk: int = 4, mesh: Mesh | None = None, attention_rows: int | None = None):
    self.chunk, self.mesh = chunk, mesh
    self.stacked = isinstance(seed, (list, tuple))
    self.load(params, seed)

    def begin(params, key, tokens_BS):
      model = nnx.merge(graphdef, params)
      e_BSD = model.encode(tokens_BS, model.context(tokens_BS.shape[1]))
      return model.initial_state(e_BSD, key), e_BSD

    def advance(params, s_BSD, e_BSD, batch, *, n, at, layers, attention):
      model = nnx.merge(graphdef, params)
      return steps(model, s_BSD, e_BSD, model.context(s_BSD.shape[1]), n, read, batch,
                   at=None if at is None else np.array(at), layers=layers, attention=attention,
                   attention_rows=attention_rows)

    if self.stacked:
      one_begin, one_advance = begin, advance
      begin = jax.vmap(one_begin)

      def advance(params, s_BSD, e_BSD, batch, **static):
        return jax.vmap(lambda *a: one_advance(*a, **static))(params, s_BSD, e_BSD, batch)
    self._begin = jax.jit(begin)
    self._advance = jax.jit(advance, static_argnames=("n", "at", "layers", "attention"))

  def load(self, params: dict, seed: int | list[int]) -> None:
    """Other parameters (and seeds) of the same shapes: the compiled programs are reused."""
    self.params = params
    self.keys = (jnp.stack([jax.random.key(s) for s in seed]) if isinstance(seed, (list, tuple))
                 else jax.random.key(seed))

  def place(self, batch: dict) -> dict:
    """The batch on the mesh (rows over its data axes where they divide), or on the device."""
    return place(batch, self.mesh) if self.mesh is not None else jax.device_put(batch)

  def run(self, batch: dict, R: int, *, at: Sequence[int] | None = None, layers: bool = False,
          attention: bool = False, start: Callable[[jax.Array, jax.Array], jax.Array] | None = None
          ) -> Iterator[Steps]:
    """Per chunk of consecutive iterations of R, a `Steps` as numpy (state_BSD left on the device):
    reads [n, ...] (None for a chunk `at` reads nothing of: it stays on the device), layers [n, k, B, S, D] or None, attention [n, k, B, H, rows, S] or None (with
    `stacked`, every array with the leading G). `batch` holds "inputs" [B, S] and what the read
    uses; `start(s0_BSD, e_BSD)` (on the device) replaces the model's own initial state."""
    batch = self.place(batch)
    s_BSD, e_BSD = self._begin(self.params, self.keys, batch["inputs"])
    if start is not None:
      s_BSD = start(s_BSD, e_BSD)
    mask = read_mask(R, at)
    done = 0
    while done < R:
      n = min(self.chunk, R - done)
      part = None if mask is None else tuple(bool(x) for x in mask[done:done + n])
      out = self._advance(self.params, s_BSD, e_BSD, batch, n=n, at=part, layers=layers,
                          attention=attention)
      s_BSD, done = out.state_BSD, done + n
      unread = part is not None and not any(part)  # nothing of this chunk's reads is wanted
      yield Steps(s_BSD, None if unread else jax.tree.map(to_host, out.reads),
                  to_host(out.layers_nkBSD) if layers else None,
                  to_host(out.attention_nkBHSS) if attention else None)

  def reads(self, batch: dict, R: int, *, at: Sequence[int] | None = None, **options) -> Any:
    """The reads of `run`, concatenated over the R iterations ([R, ...] numpy; with `stacked`,
    [G, R, ...]); with `at`, only the iterations read, in increasing order ([len(set(at)), ...])."""
    axis = 1 if self.stacked else 0
    mask, done, parts = read_mask(R, at), 0, []
    for out in self.run(batch, R, at=at, **options):
      n = min(self.chunk, R - done)
      if out.reads is not None:
        keep = (lambda x: x) if mask is None else (
            lambda x: np.compress(mask[done:done + n], x, axis=axis))  # unread iterations dropped
        parts.append(jax.tree.map(keep, out.reads))
      done += n
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *parts)
