"""Transformer layers: norms, causal (optionally local) attention with RoPE, MLP, and the layer
that wraps both sublayers in one of the norm schemes of DESIGN §3."""

from __future__ import annotations

from typing import Callable, NamedTuple

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


def make_norm(m: ModelSpec, rngs: nnx.Rngs) -> nnx.Module:
  cls = nnx.RMSNorm if m.norm_type == "rms" else nnx.LayerNorm
  return cls(m.d_model, epsilon=1e-6, dtype=compute_dtype(m), rngs=rngs)


class Context(NamedTuple):
  """Per-sequence-length constants shared by every layer of one forward pass."""
  mask_SS: jax.Array                 # bool, True where query i may attend to key j
  rope: tuple[jax.Array, jax.Array] | None  # (sin, cos), each [S, Dh/2]
  window: int | None = None          # local attention width w (None: full causal)
  impl: str = "xla"                  # jax.nn.dot_product_attention implementation: xla | cudnn


def attention_impl(m: ModelSpec) -> str:
  """`model.attention_impl` resolved for this backend: auto is cuDNN on a GPU in bfloat16, else XLA."""
  impl = getattr(m, "attention_impl", "auto")
  if impl == "auto":
    head_dim = m.d_model // m.n_heads
    cudnn = (jax.default_backend() == "gpu" and m.dtype == "bfloat16" and head_dim % 8 == 0
             and head_dim <= 128)
    return "cudnn" if cudnn else "xla"
  return impl


def make_context(m: ModelSpec, seq_len: int) -> Context:
  i = jnp.arange(seq_len)[:, None]
  j = jnp.arange(seq_len)[None, :]
  mask = j <= i
  if m.attention == "local":
    mask &= (i - j) < m.window
  rope = None
  if m.positions == "rope":
    half = m.d_model // m.n_heads // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_SH = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freq[None, :]
    rope = (jnp.sin(angle_SH), jnp.cos(angle_SH))
  window = m.window if m.attention == "local" else None
  return Context(mask, rope, window, attention_impl(m))


def apply_rope(x_BSHD: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  sin, cos = (r[None, :, None, :].astype(x_BSHD.dtype) for r in rope)
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


class Attention(nnx.Module):
  """Multi-head causal (or local) self-attention through `jax.nn.dot_product_attention` (cuDNN
  flash attention on GPU in bfloat16, XLA elsewhere); `weights=True` takes the explicit path that
  also returns the probabilities [B, H, S, S]."""

  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    d, init, dt = m.d_model, dense_init(m), compute_dtype(m)
    self.n_heads = m.n_heads
    proj = lambda: nnx.Linear(d, d, use_bias=False, kernel_init=init, dtype=dt, rngs=rngs)
    self.query, self.key, self.value, self.out = proj(), proj(), proj(), proj()

  def __call__(self, x_BSD: jax.Array, ctx: Context, *, weights: bool = False
               ) -> tuple[jax.Array, jax.Array | None]:
    B, S, D = x_BSD.shape
    split = lambda y: y.reshape(B, S, self.n_heads, D // self.n_heads)
    q_BSHK, k_BSHK, v_BSHK = (split(dense(lin, x_BSD)) for lin in (self.query, self.key, self.value))
    if ctx.rope is not None:
      q_BSHK, k_BSHK = apply_rope(q_BSHK, ctx.rope), apply_rope(k_BSHK, ctx.rope)
    att_BHST = None
    if weights:
      att_BHST = attention_weights(q_BSHK, k_BSHK, ctx.mask_SS)
      y_BSHK = jnp.einsum("bhst,bthk->bshk", att_BHST.astype(v_BSHK.dtype), v_BSHK)
    else:
      window = None if ctx.window is None else (ctx.window - 1, 0)
      y_BSHK = jax.nn.dot_product_attention(q_BSHK, k_BSHK, v_BSHK, is_causal=True,
                                            local_window_size=window, implementation=ctx.impl)
    return dense(self.out, y_BSHK.reshape(B, S, D)), att_BHST


class MLP(nnx.Module):
  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    d, f, init, dt = m.d_model, m.d_ff, dense_init(m), compute_dtype(m)
    lin = lambda a, b: nnx.Linear(a, b, use_bias=False, kernel_init=init, dtype=dt, rngs=rngs)
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
  pre x+f(n(x)); post n(x+f(x)); sandwich n2(x+f(n1(x))); peri x+n2(f(n1(x))); none x+f(x)."""

  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    self.scheme = m.norm
    self.attn, self.mlp = Attention(m, rngs), MLP(m, rngs)
    n_norms = {"pre": 1, "post": 1, "sandwich": 2, "peri": 2, "none": 0}[m.norm]
    self.attn_norms = nnx.List([make_norm(m, rngs) for _ in range(n_norms)])
    self.mlp_norms = nnx.List([make_norm(m, rngs) for _ in range(n_norms)])

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

  def __call__(self, x_BSD: jax.Array, ctx: Context, *, weights: bool = False
               ) -> tuple[jax.Array, jax.Array | None]:
    """The layer's output and, with `weights`, its attention probabilities [B, H, S, S] (else None)."""
    att = []

    def attend(h):
      y, a = self.attn(h, ctx, weights=weights)
      att.append(a)
      return y

    x_BSD = self._sublayer(x_BSD, attend, self.attn_norms)
    x_BSD = self._sublayer(x_BSD, self.mlp, self.mlp_norms)
    return x_BSD, att[0]
