"""How the prelude output e enters each iteration of the recurrent block (state s)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from looped_models.config import ModelSpec
from looped_models.layers import compute_dtype, dense, dense_init, param_dtype


class Injection(nnx.Module):
  """none: s; add: s + e; concat: W[s; e] (W: 2D -> D); gate: g*s + (1-g)*e, g = sigmoid(W_g[s; e])."""

  def __init__(self, m: ModelSpec, rngs: nnx.Rngs):
    self.mode = m.injection
    self.proj = (nnx.Linear(2 * m.d_model, m.d_model, use_bias=self.mode == "gate",
                            kernel_init=dense_init(m), dtype=compute_dtype(m),
                            param_dtype=param_dtype(m), rngs=rngs)
                 if self.mode in ("concat", "gate") else None)

  def __call__(self, s_BSD: jax.Array, e_BSD: jax.Array) -> jax.Array:
    if self.mode == "none":
      return s_BSD
    if self.mode == "add":
      return s_BSD + e_BSD
    se_BS2D = jnp.concatenate([s_BSD, e_BSD], axis=-1)
    if self.mode == "concat":
      return dense(self.proj, se_BS2D)
    g_BSD = jax.nn.sigmoid(dense(self.proj, se_BS2D))
    return g_BSD * s_BSD + (1 - g_BSD) * e_BSD
