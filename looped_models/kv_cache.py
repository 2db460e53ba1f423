"""The KV cache of generation (DESIGN §8) and the model's layers run against it.

Keys and values live in fixed-size ring buffers of T slots per sequence, position p at slot p mod T
(keys rotated by their absolute positions), so a query at p sees the keys at (p - T, p] and the
buffers never grow however long generation runs: prelude and coda layers one entry per token, the
block's layers either one per (iteration, layer) (`exact`) or one per layer holding each token's
latest iteration (`latest`). `cached_layer` writes a row's new keys and values in place and attends
over its buffer (a prefill keeps each prompt's last T positions); `encode`, `block_iteration` and
`decode` are the model's pieces on top of it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from looped_models.layers import KV

CACHES = ("exact", "latest")


class Buffers(NamedTuple):
  """One layer group's keys and values, each [slots, layers, B, H, Dh, T]: per head the layout that
  both of the attention's dots read as they are (stored [.., T, H, Dh], every layer's buffer was
  copied into it at every step: decoding 1.6-2.5x slower on a CPU, bench/RESULTS.md)."""
  k_SLBHKT: jax.Array
  v_SLBHKT: jax.Array


class Cache(NamedTuple):
  """`Buffers` per layer group: prelude and coda one slot, the block R slots (`exact`) or one
  (`latest`)."""
  prelude: Buffers
  block: Buffers
  coda: Buffers


def empty_cache(m: Any, batch: int, length: int, iterations: int, cache: str, dtype) -> Cache:
  heads, head_dim = m.n_heads, m.d_model // m.n_heads
  zeros = lambda slots, layers: Buffers(*(
      jnp.zeros((slots, layers, batch, heads, head_dim, length), dtype) for _ in range(2)))
  return Cache(zeros(1, m.n_prelude), zeros(iterations if cache == "exact" else 1, m.block_size),
               zeros(1, m.n_coda))


def cache_bytes(m: Any, batch: int, length: int, iterations: int, cache: str, dtype) -> int:
  """The bytes of the KV buffers of `batch` sequences of `length` tokens."""
  slots = m.n_prelude + m.n_coda + m.block_size * (iterations if cache == "exact" else 1)
  return 2 * slots * batch * length * m.d_model * jnp.dtype(dtype).itemsize


# -- layers against the cache ---------------------------------------------------------------------


def cached_layer(layer: Any, x_BLD: jax.Array, ctx: Any, group: Buffers, l: int,
                 slot_B: jax.Array | None, last_BT: jax.Array | None = None
                 ) -> tuple[jax.Array, Buffers]:
  """Run `layer` (index l of its group) on one new token per row (a `make_cached_context`): write its
  key and value into row b's ring buffer at slot slot_B[b] (None: the group's only slot) and position
  pos_B[b] mod T, then attend over the row's buffer at that slot. With `last_BT` (the exact cache)
  buffer position t is read at slot min(slot_B[b], last_BT[b, t]): a token that exited is read at its
  last iteration. A row outside ctx.write_B (a slot not finishing a token) writes nothing. The writes
  are in place: a dynamic update per row (with a scatter, or a read of the buffer before the write,
  XLA copies the whole buffer every step). A prefill (`make_prefill_context`) goes to `_prefill_layer`."""
  if ctx.keep_BT is not None:
    return _prefill_layer(layer, x_BLD, ctx, group, l, slot_B)
  B = x_BLD.shape[0]
  T = group.k_SLBHKT.shape[-1]
  start_B = ctx.pos_B % T
  inside_B = jnp.ones(B, bool) if ctx.write_B is None else ctx.write_B
  slots_B = jnp.zeros(B, jnp.int32) if slot_B is None else slot_B

  def write(buf, new_BLHK):
    for b in range(B):
      at = (slots_B[b], l, b, 0, 0, start_B[b])
      new_HKL = new_BLHK[b].transpose(1, 2, 0)
      old = jax.lax.dynamic_slice(buf, at, (1, 1, 1, *new_HKL.shape))
      new = jnp.where(inside_B[b], new_HKL[None, None, None].astype(buf.dtype), old)
      buf = jax.lax.dynamic_update_slice(buf, new, at)
    return buf

  def read(buf):  # [B, T, H, Dh] for the attention: a transpose the dots absorb, no copy
    if slot_B is None:
      return buf[0, l].transpose(0, 3, 1, 2)
    rows = jnp.arange(B)
    if last_BT is None:
      return buf[slot_B, l, rows].transpose(0, 3, 1, 2)
    read_BT = jnp.minimum(slot_B[:, None], last_BT)
    return buf[read_BT, l, rows[:, None], :, :, jnp.arange(last_BT.shape[1])[None]]

  def cache(k_BLHK, v_BLHK):
    new = Buffers(write(group.k_SLBHKT, k_BLHK), write(group.v_SLBHKT, v_BLHK))
    return KV(read(new.k_SLBHKT), read(new.v_SLBHKT)), new

  return layer(x_BLD, ctx, kv=cache)


def _prefill_layer(layer: Any, x_BLD: jax.Array, ctx: Any, group: Buffers, l: int,
                   slot: jax.Array | None) -> tuple[jax.Array, Buffers]:
  """A prefill of whole prompts: the layer attends over the rows' own keys (the mask of
  `make_prefill_context`), and the ring buffer at `slot` (a scalar, the same for every row; None:
  the group's only slot) keeps the keys and values of the positions ctx.keep_BT."""
  rows_B1 = jnp.arange(x_BLD.shape[0])[:, None]

  def store(buf, new_BLHK):
    kept_BHKT = new_BLHK[rows_B1, ctx.keep_BT].transpose(0, 2, 3, 1).astype(buf.dtype)
    at = (0 if slot is None else slot, l, 0, 0, 0, 0)
    return jax.lax.dynamic_update_slice(buf, kept_BHKT[None, None], at)

  def cache(k_BLHK, v_BLHK):
    return KV(k_BLHK, v_BLHK), Buffers(store(group.k_SLBHKT, k_BLHK), store(group.v_SLBHKT, v_BLHK))

  return layer(x_BLD, ctx, kv=cache)


def cached_layers(layers: Any, x_BLD: jax.Array, ctx: Any, group: Buffers
                  ) -> tuple[jax.Array, Buffers]:
  """A prelude or coda stack (one slot per layer)."""
  for l, layer in enumerate(layers):
    x_BLD, group = cached_layer(layer, x_BLD, ctx, group, l, None)
  return x_BLD, group


def block_iteration(model: Any, s_BLD: jax.Array, e_BLD: jax.Array, ctx: Any, group: Buffers,
                    slot_B: jax.Array | None, last_BT: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, Buffers]:
  """`LoopedTransformer.block_step` against the cache: (next state, layer outputs [k, B, L, D], cache)."""
  x_BLD = model.inject(s_BLD, e_BLD)
  outs = []
  for l, layer in enumerate(model.block):
    x_BLD, group = cached_layer(layer, x_BLD, ctx, group, l, slot_B, last_BT)
    outs.append(x_BLD)
  x_BLD = outs[-1] = model.close_iteration(x_BLD)
  return x_BLD, jnp.stack(outs), group


def encode(model: Any, tokens_BL: jax.Array, ctx: Any, group: Buffers) -> tuple[jax.Array, Buffers]:
  """`LoopedTransformer.encode` against the cache: the prelude's output [B, L, D]."""
  positions = jnp.arange(tokens_BL.shape[1])[None]  # a prefill: from 0; a decode: one token at pos_B
  pos_BL = positions if ctx.pos_B is None else ctx.pos_B[:, None] + positions
  return cached_layers(model.prelude, model.embed_tokens(tokens_BL, pos_BL), ctx, group)


def decode(model: Any, s_BLD: jax.Array, ctx: Any, group: Buffers) -> tuple[jax.Array, Buffers]:
  """`LoopedTransformer.decode` against the cache: logits [B, L, V] float32."""
  x_BLD, group = cached_layers(model.coda, model.latent(s_BLD), ctx, group)
  x_BLD = model.final_norm(x_BLD)
  logits = model.embed.attend(x_BLD) if model.unembed is None else model.unembed(x_BLD)
  return logits.astype(jnp.float32), group
