"""Transformer layers: norms, causal (optionally local) attention with RoPE, MLP, and the layer
that wraps both sublayers in one of the norm schemes of DESIGN §3."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_models.config import ModelSpec


def dense_init(m: ModelSpec) -> Callable:
  if m.init_std > 0:
    return nnx.initializers.normal(m.init_std)
  return nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def compute_dtype(m: ModelSpec):
  return jnp.dtype(m.dtype)


def state_dtype(m: ModelSpec):
  """The dtype of the residual stream and the recurrent state (float32 unless asked otherwise)."""
  return jnp.dtype(getattr(m, "state_dtype", "float32"))


def param_dtype(m: ModelSpec):
  return jnp.dtype(m.param_dtype)


def make_norm(m: ModelSpec, rngs: nnx.Rngs, dtype=None) -> nnx.Module:
  """A norm computing (and returning) `dtype`, by default the compute dtype."""
  cls = nnx.RMSNorm if m.norm_type == "rms" else nnx.LayerNorm
  return cls(m.d_model, epsilon=m.norm_eps, dtype=dtype or compute_dtype(m),
             param_dtype=param_dtype(m), rngs=rngs)


class Context(NamedTuple):
  """Per-sequence-length constants shared by every layer of one forward pass."""
  mask_SS: jax.Array                 # bool, True where query i may attend to key j ([B, 1, L, T] cached)
  rope: tuple[jax.Array, jax.Array] | None  # (sin, cos), each [S, Dh/2]
  window: int | None = None          # local attention width w (None: full causal)
  impl: str = "xla"                  # blocked | xla | cudnn (`attention_impl`)
  pos_B: jax.Array | None = None     # cached decode: each row's new token's absolute position
  query_block: int = 0               # impl=blocked: queries per block (0: the whole sequence)
  write_B: jax.Array | None = None   # cached decode: the rows that store their keys (None: every row)
  keep_BT: jax.Array | None = None   # cached prefill: per row, the position each cache slot keeps


def attention_impl(m: ModelSpec) -> str:
  """`model.attention_impl` resolved for this backend. auto: cuDNN flash attention on a GPU in
  bfloat16; on a CPU the blocked einsums of `blocked_attention` (at the reference configuration on 2
  cores the train step 1.24x and the forward pass 1.27x faster than XLA's, bench/RESULTS.md);
  elsewhere jax.nn.dot_product_attention's XLA implementation."""
  impl = getattr(m, "attention_impl", "auto")
  if impl == "auto":
    head_dim = m.d_model // m.n_heads
    backend = jax.default_backend()
    if backend == "gpu" and m.dtype == "bfloat16" and head_dim % 8 == 0 and head_dim <= 128:
      return "cudnn"
    return "blocked" if backend == "cpu" else "xla"
  return impl


QUERY_BLOCKS = 4     # blocked attention splits a sequence into at most this many query blocks
MIN_QUERY_BLOCK = 64  # of at least this many queries each


def make_context(m: ModelSpec, seq_len: int) -> Context:
  i = jnp.arange(seq_len)[:, None]
  j = jnp.arange(seq_len)[None, :]
  mask = j <= i
  if m.attention == "local":
    mask &= (i - j) < m.window
  rope = rope_angles(m, jnp.arange(seq_len))
  window = m.window if m.attention == "local" else None
  blocks = max(1, min(QUERY_BLOCKS, seq_len // MIN_QUERY_BLOCK))
  return Context(mask, rope, window, attention_impl(m), query_block=-(-seq_len // blocks))


def rope_angles(m: ModelSpec, positions: jax.Array) -> tuple[jax.Array, jax.Array] | None:
  """(sin, cos) of RoPE at `positions` (any shape; the angles gain a last axis Dh/2)."""
  if m.positions != "rope":
    return None
  half = m.d_model // m.n_heads // 2
  freq = m.rope_base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None] * freq
  return jnp.sin(angle), jnp.cos(angle)


def make_cached_context(m: ModelSpec, pos_B: jax.Array, buffer: int,
                        write_B: jax.Array | None = None) -> Context:
  """The context of one new token per row, at absolute position pos_B[b], that attends to a ring
  buffer of T = `buffer` slots: position p lives at slot p mod T, so slot j holds the newest position
  at distance d = (p - j) mod T. The mask [B, 1, 1, T] admits the slots with d <= p (written) and,
  with local attention, d < window: the keys at positions (p - T, p], causal local attention of width
  T over the whole sequence. Queries are rotated by their absolute positions (RoPE), as the keys in
  the buffer were. `write_B`: the rows that store their new keys and values (None: all)."""
  d_BT = (pos_B[:, None] - jnp.arange(buffer)[None, :]) % buffer
  mask = d_BT <= pos_B[:, None]
  if m.attention == "local":
    mask &= d_BT < m.window
  return Context(mask[:, None, None], rope_angles(m, pos_B[:, None]), None, "xla", pos_B,
                 write_B=write_B)


def make_prefill_context(m: ModelSpec, lengths_B: jax.Array, length: int, buffer: int) -> Context:
  """The context of B prompts of lengths_B[b] tokens (padded to L = `length`, at positions 0..L-1)
  run at once, each token attending to its own row's keys at positions (p - T, p] (T = `buffer`;
  the local window too): the causal local attention of the ring of `make_cached_context` over the
  whole prompt. `keep_BT` [B, T]: the position each slot of the ring keeps, p mod T = slot for the
  last T positions of each prompt (a slot no prompt position reaches keeps a padding position, which
  is written again before anything reads it)."""
  d_LL = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  mask = (d_LL >= 0) & (d_LL < buffer)
  if m.attention == "local":
    mask &= d_LL < m.window
  slot_1T, last_B1 = jnp.arange(buffer)[None, :], lengths_B[:, None] - 1
  keep_BT = slot_1T + buffer * ((last_B1 - slot_1T) // buffer)
  keep_BT = jnp.where(keep_BT < 0, jnp.minimum(slot_1T, length - 1), keep_BT)
  return Context(mask[None, None], rope_angles(m, jnp.arange(length)), None, "xla", keep_BT=keep_BT)


def apply_rope(x_BSHD: jax.Array, rope: tuple[jax.Array, jax.Array], style: str = "half") -> jax.Array:
  """Rotate feature pairs by the angles of `rope`: (i, i + Dh/2) with style `half` (Llama in Hugging
  Face), adjacent (2i, 2i+1) with style `pairs` (the complex layout of Huginn). The angles are
  [S, Dh/2], or [B, S, Dh/2] per row."""
  sin, cos = ((r[None] if r.ndim == 2 else r)[:, :, None, :].astype(x_BSHD.dtype) for r in rope)
  if style == "pairs":
    x1, x2 = x_BSHD[..., 0::2], x_BSHD[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x_BSHD.shape)
  x1, x2 = jnp.split(x_BSHD, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def dense(lin: nnx.Linear, x: jax.Array) -> jax.Array:
  """`lin(x)` over x's rows flattened to a 2-D [tokens, features] matrix: XLA's CPU backend runs a 2-D
  matmul and its weight gradient faster than the same contraction over [B, S, D] (a swiglu MLP's
  forward and backward 1.4x, bench/RESULTS.md); on other backends the reshape is free."""
  return lin(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def attention_weights(q_BSHK: jax.Array, k_BSHK: jax.Array, mask_SS: jax.Array) -> jax.Array:
  """The attention probabilities [B, H, S, T] in float32, written out (the evaluator's path)."""
  logits_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BSHK).astype(jnp.float32)
  logits_BHST = logits_BHST / jnp.sqrt(q_BSHK.shape[-1]).astype(jnp.float32)
  logits_BHST = jnp.where(mask_SS, logits_BHST, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BHST, axis=-1)


def blocked_attention(q_BSHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, *, window: int | None,
                      query_block: int) -> jax.Array:
  """Causal (or local, width `window`) attention [B, S, H, Dh], computed per block of `query_block`
  queries against only the keys the block can see (up to its last query; with a window, from its first
  query's window on), in heads-first layout [B, H, S, Dh] with a float32 softmax. Four blocks skip
  3/8 of the full S x S score matrix; the heads-first batched matmuls are what XLA's CPU backend runs
  fastest. The result equals `jax.nn.dot_product_attention(..., is_causal=True)`."""
  S = q_BSHK.shape[1]
  block = query_block if 0 < query_block < S else S
  q_BHSK, k_BHSK, v_BHSK = (x.transpose(0, 2, 1, 3) for x in (q_BSHK, k_BSHK, v_BSHK))
  scale = jnp.asarray(q_BSHK.shape[-1] ** -0.5, q_BSHK.dtype)
  outs = []
  for start in range(0, S, block):
    stop = min(start + block, S)
    first = 0 if window is None else max(0, start - window + 1)  # the first key any query here sees
    logits_BHQT = jnp.einsum("bhqk,bhtk->bhqt", q_BHSK[:, :, start:stop] * scale,
                             k_BHSK[:, :, first:stop]).astype(jnp.float32)
    i = jnp.arange(start, stop)[:, None]
    j = jnp.arange(first, stop)[None, :]
    mask_QT = (j <= i) if window is None else (j <= i) & (i - j < window)
    probs_BHQT = jax.nn.softmax(jnp.where(mask_QT, logits_BHQT, jnp.finfo(jnp.float32).min), axis=-1)
    outs.append(jnp.einsum("bhqt,bhtk->bhqk", probs_BHQT.astype(v_BSHK.dtype),
                           v_BHSK[:, :, first:stop]))
  return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


class KV(NamedTuple):
  """One attention layer's key and value buffers [B, T, H, Dh] (T: the cache's length)."""
  k_BTHK: jax.Array
  v_BTHK: jax.Array


class Attention(nnx.Module):
  """Multi-head causal (or local) self-attention: `jax.nn.dot_product_attention` (cuDNN flash
  attention on GPU in bfloat16, XLA's implementation on other accelerators) or, on CPU, the blocked
  einsums of `blocked_attention` (`attention_impl`); `weights=True` takes the explicit path that also
  returns the probabilities [B, H, S, S]."""

  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    d, init, dt, pdt = m.d_model, dense_init(m), compute_dtype(m), param_dtype(m)
    self.n_heads, self.rope_style = m.n_heads, m.rope_style
    proj = lambda: nnx.Linear(d, d, use_bias=False, kernel_init=init, dtype=dt, param_dtype=pdt,
                              rngs=rngs)
    self.query, self.key, self.value, self.out = proj(), proj(), proj(), proj()
    # additive q/k bias [2, H, Dh] (q, k), added before RoPE
    self.qk_bias = nnx.Param(jnp.zeros((2, m.n_heads, d // m.n_heads), pdt)) if m.qk_bias else None

  def position(self, q_BSHK: jax.Array, k_BSHK: jax.Array, ctx: Context
               ) -> tuple[jax.Array, jax.Array]:
    """The q/k bias, then RoPE (when the model uses it)."""
    if self.qk_bias is not None:
      bias = self.qk_bias[...].astype(q_BSHK.dtype)
      q_BSHK, k_BSHK = q_BSHK + bias[0], k_BSHK + bias[1]
    if ctx.rope is not None:
      q_BSHK = apply_rope(q_BSHK, ctx.rope, self.rope_style)
      k_BSHK = apply_rope(k_BSHK, ctx.rope, self.rope_style)
    return q_BSHK, k_BSHK

  def __call__(self, x_BSD: jax.Array, ctx: Context, *, weights: bool = False,
               kv: Callable | None = None) -> tuple[jax.Array, Any]:
    """The attention output and, with `weights`, the probabilities [B, H, S, S]. With `kv`, a cache
    (`looped_models.generate`): kv(k_BSHK, v_BSHK) stores the new keys and values and returns (the
    `KV` buffers [B, T, H, Dh] to attend over, its new state); the queries attend to the buffers with
    the mask of a `make_cached_context` (or `make_prefill_context`), and the second output is the
    cache's new state."""
    B, S, D = x_BSD.shape
    split = lambda y: y.reshape(B, S, self.n_heads, D // self.n_heads)
    q_BSHK, k_BSHK, v_BSHK = (split(dense(lin, x_BSD)) for lin in (self.query, self.key, self.value))
    q_BSHK, k_BSHK = self.position(q_BSHK, k_BSHK, ctx)
    if kv is not None:
      buffers, state = kv(k_BSHK, v_BSHK)
      y_BSHK = jax.nn.dot_product_attention(q_BSHK, buffers.k_BTHK.astype(q_BSHK.dtype),
                                            buffers.v_BTHK.astype(q_BSHK.dtype), mask=ctx.mask_SS)
      return dense(self.out, y_BSHK.reshape(B, S, D)), state
    att_BHST = None
    if weights:
      att_BHST = attention_weights(q_BSHK, k_BSHK, ctx.mask_SS)
      y_BSHK = jnp.einsum("bhst,bthk->bshk", att_BHST.astype(v_BSHK.dtype), v_BSHK)
    elif ctx.impl == "blocked":
      y_BSHK = blocked_attention(q_BSHK, k_BSHK, v_BSHK, window=ctx.window,
                                 query_block=ctx.query_block)
    else:
      window = None if ctx.window is None else (ctx.window - 1, 0)
      y_BSHK = jax.nn.dot_product_attention(q_BSHK, k_BSHK, v_BSHK, is_causal=True,
                                            local_window_size=window, implementation=ctx.impl)
    return dense(self.out, y_BSHK.reshape(B, S, D)), att_BHST


class MLP(nnx.Module):
  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    d, f, init, dt, pdt = m.d_model, m.d_ff, dense_init(m), compute_dtype(m), param_dtype(m)
    lin = lambda a, b: nnx.Linear(a, b, use_bias=False, kernel_init=init, dtype=dt, param_dtype=pdt,
                                  rngs=rngs)
    self.gated = m.mlp == "swiglu"
    self.up = lin(d, f)
    self.gate = lin(d, f) if self.gated else None
    self.down = lin(f, d)

  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    h_BSF = dense(self.up, x_BSD)
    h_BSF = jax.nn.silu(dense(self.gate, x_BSD)) * h_BSF if self.gated else jax.nn.gelu(h_BSF)
    return dense(self.down, h_BSF)


class Layer(nnx.Module):
  """Attention then MLP, each wrapped by the norm scheme:
  pre x+f(n(x)); post n(x+f(x)); sandwich n2(x+f(n1(x))); peri x+n2(f(n1(x))); none x+f(x).
  The residual stream x stays in `model.state_dtype` (the norm that writes it, too); f computes in
  `model.dtype`."""

  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    self.scheme, self.stream_dtype = m.norm, state_dtype(m)
    self.attn, self.mlp = Attention(m, rngs), MLP(m, rngs)
    n_norms = {"pre": 1, "post": 1, "sandwich": 2, "peri": 2, "none": 0}[m.norm]
    writes_stream = {"post": 0, "sandwich": 1}.get(m.norm)  # the norm whose output is the stream
    norms = lambda: nnx.List([make_norm(m, rngs, self.stream_dtype if i == writes_stream else None)
                              for i in range(n_norms)])
    self.attn_norms, self.mlp_norms = norms(), norms()

  def _sublayer(self, x, f, norms):
    s = self.scheme
    if s == "pre":
      return x + f(norms[0](x))
    if s == "post":
      return norms[0](x + f(x))
    if s == "sandwich":
      return norms[1](x + f(norms[0](x)))
    if s == "peri":
      return x + norms[1](f(norms[0](x)))
    return x + f(x)

  def __call__(self, x_BSD: jax.Array, ctx: Context, *, weights: bool = False,
               kv: Callable | None = None) -> tuple[jax.Array, Any]:
    """The layer's output and, with `weights`, its attention probabilities [B, H, S, S]; with `kv`,
    the cache's new state (`Attention`); else None."""
    att = []

    def attend(h):
      y, a = self.attn(h, ctx, weights=weights, kv=kv)
      att.append(a)
      return y

    x_BSD = self._sublayer(x_BSD, attend, self.attn_norms).astype(self.stream_dtype)
    x_BSD = self._sublayer(x_BSD, self.mlp, self.mlp_norms).astype(self.stream_dtype)
    return x_BSD, att[0]
