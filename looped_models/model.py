"""The looped transformer: prelude (p layers) -> a k-layer block iterated r times -> coda (c layers).

One implementation of the block serves training, evaluation and trajectory capture: `iterate` scans
`block_step` over iterations with `jax.lax.scan`, so compile time does not depend on r, and can emit the
per-iteration, per-layer states [R, k, B, S, D] and attention maps [R, k, B, H, S, S] on request.
Truncated backprop runs the iterations before the last b in a scan that keeps nothing for the
backward pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_models.config import ModelSpec
from looped_models.halting import HaltOutput, halt
from looped_models.injection import Injection
from looped_models.layers import (Context, Layer, compute_dtype, make_context, make_norm,
                                  param_dtype, state_dtype)


def embed_scale(m: ModelSpec) -> float:
  """The factor on the token embeddings: model.embed_scale, `sqrt_d` for sqrt(d_model); 0: none."""
  return m.d_model ** 0.5 if m.embed_scale == "sqrt_d" else float(m.embed_scale)


class LoopOutput(NamedTuple):
  logits_BSV: jax.Array
  states_RkBSD: jax.Array | None = None      # per-iteration, per-block-layer outputs
  attention_RkBHSS: jax.Array | None = None  # per-iteration, per-block-layer attention probabilities


class BlockTrace(NamedTuple):
  state_BSD: jax.Array                        # the recurrent state after the last iteration run
  states_RkBSD: jax.Array | None
  attention_RkBHSS: jax.Array | None


def _splice(free_M: jax.Array, grad_b: jax.Array, n_free: int | jax.Array, n: int | jax.Array,
            fill: jax.Array | float) -> jax.Array:
  """One trace of the two-scan loop: the first `n_free` entries of the no-gradient scan, then the
  gradient scan's, then `fill` for the iterations past n (leading axis: iteration)."""
  both = jnp.concatenate([free_M, grad_b])
  both = jax.lax.dynamic_update_slice_in_dim(both, grad_b, n_free, axis=0)
  t = jnp.arange(both.shape[0]).reshape(-1, *([1] * (both.ndim - 1)))
  return jnp.where(t < n, both, fill).astype(both.dtype)


class LoopedTransformer(nnx.Module):
  """Looped transformer with tied block weights across iterations (DESIGN §3)."""

  def __init__(self, m: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = m
    dt, pdt = compute_dtype(m), param_dtype(m)
    emb_init = nnx.initializers.normal(m.embed_std)
    self.embed = nnx.Embed(m.vocab_size, m.d_model, embedding_init=emb_init, dtype=dt,
                           param_dtype=pdt, rngs=rngs)
    self.pos_embed = (nnx.Embed(m.max_len, m.d_model, embedding_init=emb_init, dtype=dt,
                                param_dtype=pdt, rngs=rngs)
                      if m.positions == "learned" else None)
    self.prelude = nnx.List([Layer(m, rngs) for _ in range(m.n_prelude)])
    self.injection = Injection(m, rngs)
    self.block = nnx.List([Layer(m, rngs) for _ in range(m.block_size)])
    self.iter_norm = make_norm(m, rngs, state_dtype(m)) if m.norm == "peri" else None
    self.coda = nnx.List([Layer(m, rngs) for _ in range(m.n_coda)])
    self.final_norm = make_norm(m, rngs)
    self.unembed = (None if m.tie_embeddings else
                    nnx.Linear(m.d_model, m.vocab_size, use_bias=False,
                               kernel_init=nnx.initializers.normal(m.d_model ** -0.5), dtype=dt,
                               param_dtype=pdt, rngs=rngs))

  # -- the pieces of one forward pass ---------------------------------------------------------------

  def context(self, seq_len: int) -> Context:
    return make_context(self.spec, seq_len)

  def encode(self, tokens_BS: jax.Array, ctx: Context) -> jax.Array:
    """Embedding and prelude: the input e that is injected into every iteration."""
    if tokens_BS.shape[1] > self.spec.max_len:
      raise ValueError(f"sequence of {tokens_BS.shape[1]} tokens is longer than model.max_len="
                       f"{self.spec.max_len}")
    x_BSD = self.embed_tokens(tokens_BS, jnp.arange(tokens_BS.shape[1])[None])
    for layer in self.prelude:
      x_BSD, _ = layer(x_BSD, ctx)
    return x_BSD

  def embed_tokens(self, tokens_BS: jax.Array, positions_BS: jax.Array) -> jax.Array:
    """Token embeddings (scaled, plus learned position embeddings at `positions`) in the state dtype."""
    x_BSD = self.embed(tokens_BS)
    scale = embed_scale(self.spec)
    if scale:
      x_BSD = x_BSD * jnp.asarray(scale, x_BSD.dtype)
    if self.pos_embed is not None:
      x_BSD = x_BSD + self.pos_embed(positions_BS)
    return x_BSD.astype(state_dtype(self.spec))

  def initial_state(self, e_BSD: jax.Array, key: jax.Array | None = None) -> jax.Array:
    m = self.spec
    if m.state_init == "embed":
      return e_BSD
    if m.state_init == "zeros":
      return jnp.zeros_like(e_BSD)
    key = jax.random.key(0) if key is None else key
    cut, std = 2.0, m.state_std
    if m.state_init == "like_init":  # Huginn: std * sqrt(d), cut at 3 of that std
      cut, std = 3.0, m.state_std * m.d_model ** 0.5
    noise = jax.random.truncated_normal(key, -cut, cut, e_BSD.shape, jnp.float32)
    return (std * noise).astype(e_BSD.dtype)

  def block_step(self, s_BSD: jax.Array, e_BSD: jax.Array, ctx: Context, *, attention: bool = True
                 ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One iteration: inject, run the k block layers. Returns (next state, layer outputs [k, B, S, D],
    attention [k, B, H, S, S], or None with `attention=False`, which takes the fused attention path).
    With norm=peri the state is normalised once per iteration: after the block (`model.peri_norm`
    state, the default), or the injected input before it (input)."""
    x_BSD = self.inject(s_BSD, e_BSD)
    outs, atts = [], []
    for layer in self.block:
      x_BSD, att_BHSS = layer(x_BSD, ctx, weights=attention)
      outs.append(x_BSD)
      atts.append(att_BHSS)
    x_BSD = outs[-1] = self.close_iteration(x_BSD)
    return x_BSD, jnp.stack(outs), jnp.stack(atts) if attention else None

  def inject(self, s_BSD: jax.Array, e_BSD: jax.Array) -> jax.Array:
    """The block's input: the injection of e into the state (normed with norm=peri, peri_norm=input)."""
    x_BSD = self.injection(s_BSD, e_BSD).astype(s_BSD.dtype)
    if self.iter_norm is not None and getattr(self.spec, "peri_norm", "state") == "input":
      x_BSD = self.iter_norm(x_BSD)
    return x_BSD

  def close_iteration(self, x_BSD: jax.Array) -> jax.Array:
    """The state an iteration leaves: the block's output (normed with norm=peri, peri_norm=state)."""
    if self.iter_norm is not None and getattr(self.spec, "peri_norm", "state") == "state":
      return self.iter_norm(x_BSD)
    return x_BSD

  def iterate(self, s_BSD: jax.Array, e_BSD: jax.Array, ctx: Context, n_iters: int | jax.Array,
              max_iters: int, *, backprop_depth: int = 0, differentiated: bool = False,
              return_states: bool = False, return_attention: bool = False) -> BlockTrace:
    """Run the block `n_iters` times (a traced value <= the static `max_iters`).

    Iterations past `n_iters` are skipped with `lax.cond` (their trace entries repeat the state and
    hold zero attention). With `backprop_depth` b (0 < b < max_iters) the loop is two scans: the
    first max(n - b, 0) iterations run on stop-gradient inputs and parameters, so the backward pass
    keeps nothing of them, then the last min(n, b) iterations run with gradients (with n <= b the
    gradient reaches the initial state, as without truncation). Backward memory then grows with b,
    not with n; the iteration counts stay traced (one compile for every n). With per-iteration
    remat (`model.remat`) the gradient scan rematerialises each of its iterations. `differentiated`
    (the caller takes gradients of this pass) unrolls a gradient scan of at most `model.unroll`
    iterations (see `_scan`).
    """
    b = backprop_depth if 0 < backprop_depth < max_iters else 0
    trace = dict(states=return_states, attention=return_attention)
    if b == 0:
      s_BSD, (states, atts) = self._scan(s_BSD, e_BSD, ctx, n_iters, max_iters,
                                         unrolled=differentiated, **trace)
      return BlockTrace(s_BSD, states, atts)
    n_free = max(n_iters - b, 0) if isinstance(n_iters, int) else jnp.maximum(n_iters - b, 0)
    n_grad = min(n_iters, b) if isinstance(n_iters, int) else jnp.minimum(n_iters, b)
    graphdef, params = nnx.split(self)
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    s_free, free = frozen._scan(jax.lax.stop_gradient(s_BSD), jax.lax.stop_gradient(e_BSD), ctx,
                                n_free, max_iters - b, **trace)
    s_BSD = jnp.where(n_iters > b, s_free, s_BSD)  # n <= b: every iteration, and s0, get gradients
    s_BSD, grad = self._scan(s_BSD, e_BSD, ctx, n_grad, b, unrolled=differentiated, **trace)
    fills = (jnp.broadcast_to(s_BSD, (self.spec.block_size, *s_BSD.shape)), 0.0)
    states, atts = (None if f is None else _splice(f, g, n_free, n_iters, fill)
                    for f, g, fill in zip(free, grad, fills))
    return BlockTrace(s_BSD, states, atts)

  def _scan(self, s_BSD: jax.Array, e_BSD: jax.Array, ctx: Context, n: int | jax.Array, length: int,
            *, states: bool, attention: bool, unrolled: bool = False) -> tuple[jax.Array, tuple]:
    """A scan of `length` block iterations of which the first `n` run (the rest are skipped with
    `lax.cond` unless n is the static `length`). Returns (state, (states [length, k, B, S, D] or
    None, attention [length, k, B, H, S, S] or None)).

    With `unrolled` and length <= `model.unroll` the scan is unrolled in the compiled program: its
    backward pass then keeps each iteration's residuals where they were computed instead of copying
    them into and out of per-iteration stacks (the train step at the reference configuration, r = 8,
    1.22x faster on 2 CPU cores, bench/RESULTS.md); compile time grows with the unrolled length. A
    pass without gradients has no residuals to keep and ran slower unrolled, so only differentiated
    passes ask for it."""
    k = self.spec.block_size

    def run(s):
      s, states_kBSD, att_kBHSS = self.block_step(s, e_BSD, ctx, attention=attention)
      return s, (states_kBSD if states else None, att_kBHSS if attention else None)

    def skip(s):
      att_shape = (k, s.shape[0], self.spec.n_heads, s.shape[1], s.shape[1])
      return s, (jnp.broadcast_to(s, (k, *s.shape)) if states else None,
                 jnp.zeros(att_shape, jnp.float32) if attention else None)

    if self.spec.remat:
      run = jax.checkpoint(run)
    unroll = length if unrolled and length <= getattr(self.spec, "unroll", 0) else 1
    if isinstance(n, int) and n == length:
      return jax.lax.scan(lambda s, _: run(s), s_BSD, None, length=length, unroll=unroll)
    n = jnp.asarray(n, jnp.int32)
    return jax.lax.scan(lambda s, t: jax.lax.cond(t < n, run, skip, s), s_BSD, jnp.arange(length),
                        unroll=unroll)

  def latent(self, s_BSD: jax.Array) -> jax.Array:
    """The state as the coda reads it: normed by the final norm with model.latent_norm, else as is."""
    return self.final_norm(s_BSD) if self.spec.latent_norm else s_BSD

  def decode(self, s_BSD: jax.Array, ctx: Context) -> jax.Array:
    """(Latent norm,) coda, final norm and unembedding: logits [B, S, V] in float32."""
    s_BSD = self.latent(s_BSD)
    for layer in self.coda:
      s_BSD, _ = layer(s_BSD, ctx)
    s_BSD = self.final_norm(s_BSD)
    if self.unembed is None:
      return self.embed.attend(s_BSD).astype(jnp.float32)
    return self.unembed(s_BSD).astype(jnp.float32)

  # -- the whole forward pass -----------------------------------------------------------------------

  def __call__(self, tokens_BS: jax.Array, n_iters: int | jax.Array | None = None, *,
               max_iters: int | None = None, backprop_depth: int = 0, differentiated: bool = False,
               key: jax.Array | None = None,
               return_states: bool = False, return_attention: bool = False,
               state0: jax.Array | None = None) -> LoopOutput:
    """Logits after `n_iters` iterations of the block (default and upper bound: `max_iters`),
    starting from `state0` [B, S, D] when given (else from `model.state_init`). `differentiated`:
    the caller takes gradients of this pass (a short loop is then unrolled, `model.unroll`)."""
    if max_iters is None:
      if not isinstance(n_iters, int):
        raise ValueError("max_iters is required when n_iters is traced or None")
      max_iters = n_iters
    n_iters = max_iters if n_iters is None else n_iters
    ctx = self.context(tokens_BS.shape[1])
    e_BSD = self.encode(tokens_BS, ctx)
    s0_BSD = self.initial_state(e_BSD, key) if state0 is None else state0.astype(e_BSD.dtype)
    trace = self.iterate(s0_BSD, e_BSD, ctx, n_iters, max_iters,
                         backprop_depth=backprop_depth, differentiated=differentiated,
                         return_states=return_states, return_attention=return_attention)
    return LoopOutput(self.decode(trace.state_BSD, ctx), trace.states_RkBSD, trace.attention_RkBHSS)

  def halt(self, tokens_BS: jax.Array, *, criterion: str, threshold: float | int, max_iters: int,
           **options) -> HaltOutput:
    """Adaptive-depth inference: each token exits once `criterion` holds below `threshold`, the loop
    stops when all have (or at `max_iters`). `looped_models.halting.halt`; options: key, slots,
    causal, linear_growth."""
    return halt(self, tokens_BS, criterion=criterion, threshold=threshold, max_iters=max_iters, **options)



def init_model(m: Any, seed: int) -> tuple[nnx.GraphDef, dict]:
  """The model's static graph and its parameters as a pure dict."""
  graphdef, state = nnx.split(LoopedTransformer(m, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def abstract_model(m: Any, seed: int) -> tuple[nnx.GraphDef, dict]:
  """The graph and the parameter shapes (jax.ShapeDtypeStruct), without computing any values."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LoopedTransformer(m, rngs=nnx.Rngs(seed))))
  return graphdef, nnx.to_pure_dict(state)
