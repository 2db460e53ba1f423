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


def param_dtype(m: ModelSpec):
  return jnp.dtype(m.param_dtype)


def make_norm(m: ModelSpec, rngs: nnx.Rngs) -> nnx.Module:
  cls = nnx.RMSNorm if m.norm_type == "rms" else nnx.LayerNorm
  return cls(m.d_model, epsilon=m.norm_eps, dtype=compute_dtype(m), param_dtype=param_dtype(m),
             rngs=rngs)


class Context(NamedTuple):
  """Per-sequence-length constants shared by every layer of one forward pass."""
  mask_SS: jax.Array                 # bool, True where query i may attend to key j
  rope: tuple[jax.Array, jax.Array] | None  # (sin, cos), each [S, Dh/2]


def make_context(m: ModelSpec, seq_len: int) -> Context:
  i = jnp.arange(seq_len)[:, None]
  j = jnp.arange(seq_len)[None, :]
  mask = j <= i
  if m.attention == "local":
    mask &= (i - j) < m.window
  rope = None
  if m.positions == "rope":
    half = m.d_model // m.n_heads // 2
    freq = m.rope_base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_SH = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freq[None, :]
    rope = (jnp.sin(angle_SH), jnp.cos(angle_SH))
  return Context(mask, rope)


def apply_rope(x_BSHD: jax.Array, rope: tuple[jax.Array, jax.Array], style: str = "half") -> jax.Array:
  """Rotate feature pairs by the angles of `rope`: (i, i + Dh/2) with style `half` (Llama in Hugging
  Face), adjacent (2i, 2i+1) with style `pairs` (the complex layout of Huginn)."""
  sin, cos = (r[None, :, None, :].astype(x_BSHD.dtype) for r in rope)
  if style == "pairs":
    x1, x2 = x_BSHD[..., 0::2], x_BSHD[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x_BSHD.shape)
  x1, x2 = jnp.split(x_BSHD, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  """Multi-head causal self-attention; returns the attention probabilities on request."""

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

  def __call__(self, x_BSD: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
    B, S, D = x_BSD.shape
    split = lambda y: y.reshape(B, S, self.n_heads, D // self.n_heads)
    q_BSHK, k_BSHK, v_BSHK = split(self.query(x_BSD)), split(self.key(x_BSD)), split(self.value(x_BSD))
    q_BSHK, k_BSHK = self.position(q_BSHK, k_BSHK, ctx)
    logits_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BSHK).astype(jnp.float32)
    logits_BHST = logits_BHST / jnp.sqrt(q_BSHK.shape[-1]).astype(jnp.float32)
    logits_BHST = jnp.where(ctx.mask_SS, logits_BHST, jnp.finfo(jnp.float32).min)
    att_BHST = jax.nn.softmax(logits_BHST, axis=-1)
    y_BSHK = jnp.einsum("bhst,bthk->bshk", att_BHST.astype(v_BSHK.dtype), v_BSHK)
    return self.out(y_BSHK.reshape(B, S, D)), att_BHST


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
    h_BSF = self.up(x_BSD)
    h_BSF = jax.nn.silu(self.gate(x_BSD)) * h_BSF if self.gated else jax.nn.gelu(h_BSF)
    return self.down(h_BSF)


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

  def __call__(self, x_BSD: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
    att = []

    def attend(h):
      y, a = self.attn(h, ctx)
      att.append(a)
      return y

    x_BSD = self._sublayer(x_BSD, attend, self.attn_norms)
    x_BSD = self._sublayer(x_BSD, self.mlp, self.mlp_norms)
    return x_BSD, att[0]
