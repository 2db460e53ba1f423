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


def state_dtype(m: ModelSpec):
  """The dtype of the residual stream and the recurrent state (float32 unless asked otherwise)."""
  return jnp.dtype(getattr(m, "state_dtype", "float32"))


def make_norm(m: ModelSpec, rngs: nnx.Rngs, dtype=None) -> nnx.Module:
  """A norm computing (and returning) `dtype`, by default the compute dtype; parameters float32."""
  cls = nnx.RMSNorm if m.norm_type == "rms" else nnx.LayerNorm
  return cls(m.d_model, epsilon=1e-6, dtype=dtype or compute_dtype(m), rngs=rngs)


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
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_SH = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freq[None, :]
    rope = (jnp.sin(angle_SH), jnp.cos(angle_SH))
  return Context(mask, rope)


def apply_rope(x_BSHD: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  sin, cos = (r[None, :, None, :].astype(x_BSHD.dtype) for r in rope)
  x1, x2 = jnp.split(x_BSHD, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  """Multi-head causal self-attention; returns the attention probabilities on request."""

  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    d, init, dt = m.d_model, dense_init(m), compute_dtype(m)
    self.n_heads = m.n_heads
    proj = lambda: nnx.Linear(d, d, use_bias=False, kernel_init=init, dtype=dt, rngs=rngs)
    self.query, self.key, self.value, self.out = proj(), proj(), proj(), proj()

  def __call__(self, x_BSD: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
    B, S, D = x_BSD.shape
    split = lambda y: y.reshape(B, S, self.n_heads, D // self.n_heads)
    q_BSHK, k_BSHK, v_BSHK = split(self.query(x_BSD)), split(self.key(x_BSD)), split(self.value(x_BSD))
    if ctx.rope is not None:
      q_BSHK, k_BSHK = apply_rope(q_BSHK, ctx.rope), apply_rope(k_BSHK, ctx.rope)
    logits_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BSHK).astype(jnp.float32)
    logits_BHST = logits_BHST / jnp.sqrt(q_BSHK.shape[-1]).astype(jnp.float32)
    logits_BHST = jnp.where(ctx.mask_SS, logits_BHST, jnp.finfo(jnp.float32).min)
    att_BHST = jax.nn.softmax(logits_BHST, axis=-1)
    y_BSHK = jnp.einsum("bhst,bthk->bshk", att_BHST.astype(v_BSHK.dtype), v_BSHK)
    return self.out(y_BSHK.reshape(B, S, D)), att_BHST


class MLP(nnx.Module):
  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    d, f, init, dt = m.d_model, m.d_ff, dense_init(m), compute_dtype(m)
    lin = lambda a, b: nnx.Linear(a, b, use_bias=False, kernel_init=init, dtype=dt, rngs=rngs)
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

  def __call__(self, x_BSD: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array]:
    att = []

    def attend(h):
      y, a = self.attn(h, ctx)
      att.append(a)
      return y

    x_BSD = self._sublayer(x_BSD, attend, self.attn_norms).astype(self.stream_dtype)
    x_BSD = self._sublayer(x_BSD, self.mlp, self.mlp_norms).astype(self.stream_dtype)
    return x_BSD, att[0]
