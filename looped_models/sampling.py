"""Sampling the next token, and the random keys generation draws from (DESIGN §8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keys(root: jax.Array, seq_B: jax.Array, pos_B: jax.Array) -> jax.Array:
  """One key per (sequence, position): sampling and initial states do not depend on the slots."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(root, s), p))(seq_B, pos_B)


def sample(logits_BV: jax.Array, key_B: jax.Array, temperature: jax.Array, top_k: int,
           top_p: jax.Array) -> jax.Array:
  """Next token ids [B]: argmax at temperature 0, else drawn from softmax(logits / T) restricted to
  the k most likely tokens (top_k > 0) and the smallest set whose probability reaches top_p."""
  greedy = logits_BV.argmax(-1).astype(jnp.int32)
  logits = logits_BV / jnp.maximum(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_BV, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p      # always keeps the most likely token
  floor = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < floor, -jnp.inf, logits)
  drawn = jax.vmap(jax.random.categorical)(key_B, logits).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)
