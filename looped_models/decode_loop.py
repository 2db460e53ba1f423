"""The compiled programs of generation (DESIGN §8): `admit` prefills prompts into free slots, `run`
steps every slot one block iteration at a time until a sequence finishes.

The decoding state (the carry) is a dict of device arrays: the KV cache of P slots, each slot's
position, iteration, state and sequence, the criterion's memory, and the per-sequence outputs. A slot
whose token exits (the criterion of `looped_models.halting`, or R reached) decodes it through the
coda, samples the next token, embeds it and starts it at iteration 1 in the same step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_models.halting import criterion_step, initial_prev
from looped_models.kv_cache import (Cache, block_iteration, cached_layers, decode, empty_cache,
                                    encode)
from looped_models.layers import make_cached_context, make_prefill_context
from looped_models.sampling import keys, sample


class Options(NamedTuple):
  """What fixes the compiled programs (static)."""
  iterations: int              # R, the cap
  cache: str                   # exact | latest
  criterion: str | None        # None: fixed R
  top_k: int
  length: int                  # T, the ring buffer: a query at position p sees the keys at (p - T, p]
  max_new: int
  stop_at_eos: bool
  track_oracle: bool
  return_logits: bool


def _state0(model: Any, e_BLD: jax.Array, key_B: jax.Array) -> jax.Array:
  """The initial state of each row's tokens (state_init normal|like_init: drawn per row's key)."""
  return jax.vmap(lambda e, k: model.initial_state(e[None], k)[0])(e_BLD, key_B)


def _prefill(graphdef, params, tokens_AL, lengths_A, seq_A, root, opts: Options):
  """Prefill A prompts (padded to L) at R iterations into a fresh cache of A rows: every token attends
  to its prompt's keys at (p - T, p], and the ring keeps each prompt's last T positions. Returns the
  cache and each prompt's last token's prelude output (its block iterations run in the decode loop)."""
  model = nnx.merge(graphdef, params)
  m, (A, L) = model.spec, tokens_AL.shape
  cache = empty_cache(m, A, opts.length, opts.iterations, opts.cache, jnp.dtype(m.dtype))
  zero_A = jnp.zeros(A, jnp.int32)
  ctx = make_prefill_context(m, lengths_A, L, opts.length)
  e_ALD, prelude = encode(model, tokens_AL, ctx, cache.prelude)
  key_A = keys(jax.random.fold_in(root, 1), seq_A, zero_A)
  s_ALD = _state0(model, e_ALD, key_A)

  def body(t, carry):
    s, block = carry
    slot = t if opts.cache == "exact" else None
    s, _, block = block_iteration(model, s, e_ALD, ctx, block, slot)
    return s, block

  s_ALD, block = jax.lax.fori_loop(0, opts.iterations, body, (s_ALD, cache.block))
  _, coda = cached_layers(model.coda, model.latent(s_ALD), ctx, cache.coda)
  last_A = lengths_A - 1
  return Cache(prelude, block, coda), e_ALD[jnp.arange(A), last_A][:, None]


def initial_carry(m: Any, slots: int, n_seqs: int, opts: Options, cache: Cache) -> dict:
  """The decoding state of `slots` idle slots and `n_seqs` sequences, around `cache`."""
  P, D = slots, m.d_model
  state_dtype = jnp.dtype(getattr(m, "state_dtype", "float32"))
  s = jnp.zeros((P, 1, D), state_dtype)
  c = {"cache": cache, "pos_P": jnp.zeros(P, jnp.int32),
       "it_P": jnp.zeros(P, jnp.int32), "s_P1D": s, "e_P1D": s, "seq_P": jnp.full(P, -1, jnp.int32),
       "gen_P": jnp.zeros(P, jnp.int32), "changed_P": jnp.zeros(P, jnp.int32),
       "pred_P": jnp.zeros(P, jnp.int32),
       "prev": initial_prev_of(m, opts.criterion, s),
       "out_tok": jnp.zeros((n_seqs, opts.max_new), jnp.int32),
       "out_it": jnp.zeros((n_seqs, opts.max_new), jnp.int32),
       "out_oracle": jnp.zeros((n_seqs, opts.max_new), jnp.int32),
       "out_len": jnp.zeros(n_seqs, jnp.int32),
       "forced": jnp.full((n_seqs, opts.max_new), -1, jnp.int32),
       "last_BT": jnp.full((P, opts.length), opts.iterations - 1, jnp.int32),
       "steps": jnp.int32(0), "finishes": jnp.int32(0), "busy": jnp.int32(0)}
  if opts.return_logits:
    c["out_logits"] = jnp.zeros((n_seqs, opts.max_new, m.vocab_size), jnp.float32)
  return c


def initial_prev_of(m: Any, criterion: str | None, s_P1D: jax.Array) -> dict:
  """What the criterion keeps of a slot's previous iteration, reset (nothing for fixed R)."""
  return {} if criterion is None else initial_prev(m, criterion, s_P1D)


def _where_rows(mask_P: jax.Array, new: dict, old: dict) -> dict:
  """Per slot, `new` where mask_P else `old`, over a criterion's memory (slots: axis 1 of the
  per-layer [k, P, 1, D] arrays, else axis 0)."""
  def pick(name, a, b):
    axis = 1 if name.endswith("kPSD") else 0
    shape = [1] * b.ndim
    shape[axis] = mask_P.shape[0]
    return jnp.where(mask_P.reshape(shape), a, b)
  return {name: pick(name, new[name], old[name]) for name in old}


def admit(graphdef, params, c, tokens_AL, lengths_A, seq_A, slot_A, root_data, opts: Options):
  """Prefill prompts seq_A into the free slots slot_A (slot P: padding, dropped)."""
  model, root = nnx.merge(graphdef, params), jax.random.wrap_key_data(root_data)
  new, e_A1D = _prefill(graphdef, params, tokens_AL, lengths_A, seq_A, root, opts)
  into_slots = lambda buf, rows: buf.at[:, :, slot_A].set(rows, mode="drop")
  cache = jax.tree.map(into_slots, c["cache"], new)
  last_A = lengths_A - 1
  key_A = keys(jax.random.fold_in(root, 1), seq_A, last_A)
  s_A1D = _state0(model, e_A1D, key_A)
  set_ = lambda x, v: x.at[slot_A].set(v.astype(x.dtype), mode="drop")
  admitted_P = jnp.zeros(c["seq_P"].shape[0], bool).at[slot_A].set(True, mode="drop")
  prev = _where_rows(admitted_P, initial_prev_of(model.spec, opts.criterion, c["s_P1D"]), c["prev"])
  return {**c, "cache": cache, "last_BT": c["last_BT"].at[slot_A].set(opts.iterations - 1, mode="drop"),
          "pos_P": set_(c["pos_P"], last_A), "it_P": set_(c["it_P"], jnp.zeros_like(last_A)),
          "s_P1D": set_(c["s_P1D"], s_A1D), "e_P1D": set_(c["e_P1D"], e_A1D),
          "seq_P": set_(c["seq_P"], seq_A), "gen_P": set_(c["gen_P"], jnp.zeros_like(last_A)),
          "changed_P": set_(c["changed_P"], jnp.zeros_like(last_A)), "prev": prev}


def _iterate(model, c: dict, thr, opts: Options) -> tuple[dict, Any, jax.Array]:
  """One block iteration of every slot's current token: (the carry with the prelude and coda
  buffers apart from the cache, the block's buffers, exit_P: the slots whose token exits)."""
  m, R = model.spec, opts.iterations
  P = c["seq_P"].shape[0]
  rows = jnp.arange(P)
  ctx = make_cached_context(m, c["pos_P"], opts.length)
  exact = opts.cache == "exact"
  # with fixed R every token's last iteration is R: the slot read is the current one (a slice, not a
  # gather per position)
  track_last = exact and opts.criterion is not None
  slot_P = c["it_P"] if exact else None
  s_new, outs_kP1D, block = block_iteration(model, c["s_P1D"], c["e_P1D"], ctx, c["cache"].block,
                                            slot_P, c["last_BT"] if track_last else None)
  it_P, active_P = c["it_P"] + 1, c["seq_P"] >= 0
  peek = lambda s: decode(model, s, ctx, c["cache"].coda)[0]   # the coda's writes are redone on exit
  meets_P = jnp.zeros(P, bool)
  prev = c["prev"]
  if opts.criterion is not None:
    meets, prev = criterion_step(opts.criterion, peek, c["s_P1D"], s_new, outs_kP1D, prev, it_P == 1, thr)
    meets_P = meets[:, 0]
  changed_P, pred_P = c["changed_P"], c["pred_P"]
  if opts.track_oracle:  # the last iteration at which the argmax prediction changed
    pred_P = peek(s_new)[:, 0].argmax(-1).astype(jnp.int32)
    changed_P = jnp.where((it_P == 1) | (pred_P != c["pred_P"]), it_P, changed_P)
  exit_P = active_P & (meets_P | (it_P >= R))
  # an exiting token is read at its last iteration from now on (exact); the others at the newest slot
  # (R - 1) until they exit. A token's ring position holds the last iteration of the token T before it
  # until its own first iteration has run, which reads slot min(0, ...) = 0 whatever that is.
  at_P = c["pos_P"] % opts.length
  last_BT = (c["last_BT"].at[rows, at_P].set(jnp.where(exit_P, it_P - 1, R - 1), mode="drop")
             if track_last else c["last_BT"])
  cache = c["cache"]
  c = {k: v for k, v in c.items() if k != "cache"}
  c = {**c, "last_BT": last_BT, "prelude": cache.prelude, "coda": cache.coda, "s_P1D": s_new, "it_P": it_P,
       "prev": prev, "changed_P": changed_P, "pred_P": pred_P, "steps": c["steps"] + 1,
       "busy": c["busy"] + active_P.sum()}
  return c, block, exit_P


def _finish(model, c: dict, exit_P: jax.Array, temperature, top_p, root, eos_id, opts: Options
            ) -> dict:
  """The exiting slots' tokens through the coda: sample and record the next token, embed it at the
  next position and start its iterations (a slot whose sequence is done becomes free)."""
  m = model.spec
  # only the exiting slots write
  fctx = make_cached_context(m, c["pos_P"], opts.length, write_B=exit_P)
  logits_P1V, coda = decode(model, c["s_P1D"], fctx, c["coda"])
  seq_P, gen_P = c["seq_P"], c["gen_P"]
  tok_P = sample(logits_P1V[:, 0], keys(root, seq_P, gen_P), temperature, opts.top_k, top_p)
  forced_P = c["forced"][jnp.maximum(seq_P, 0), jnp.minimum(gen_P, opts.max_new - 1)]
  tok_P = jnp.where(forced_P >= 0, forced_P, tok_P)
  at_seq = jnp.where(exit_P, seq_P, c["out_tok"].shape[0])                  # not exiting: dropped
  record = lambda out, v: out.at[at_seq, gen_P].set(v, mode="drop")
  out = {"out_tok": record(c["out_tok"], tok_P), "out_it": record(c["out_it"], c["it_P"]),
         "out_oracle": record(c["out_oracle"], c["changed_P"]),
         "out_len": c["out_len"].at[at_seq].set(gen_P + 1, mode="drop")}
  if opts.return_logits:
    out["out_logits"] = record(c["out_logits"], logits_P1V[:, 0])
  gen_P = gen_P + exit_P
  done_P = exit_P & ((gen_P >= opts.max_new) | (opts.stop_at_eos & (tok_P == eos_id)))
  # the next token of every exiting slot: embed it at the next position and start its iterations
  pos_P = c["pos_P"] + exit_P
  nctx = make_cached_context(m, pos_P, opts.length, write_B=exit_P)
  e_P1D, prelude = encode(model, tok_P[:, None], nctx, c["prelude"])
  s0_P1D = _state0(model, e_P1D, keys(jax.random.fold_in(root, 1), seq_P, pos_P))
  ex = exit_P[:, None, None]
  prev = _where_rows(exit_P, initial_prev_of(m, opts.criterion, s0_P1D), c["prev"])
  return {**c, **out, "prelude": prelude, "coda": coda, "prev": prev,
          "pos_P": pos_P,
          "it_P": jnp.where(exit_P, 0, c["it_P"]), "gen_P": gen_P,
          "s_P1D": jnp.where(ex, s0_P1D, c["s_P1D"]), "e_P1D": jnp.where(ex, e_P1D, c["e_P1D"]),
          "seq_P": jnp.where(done_P, -1, seq_P), "finishes": c["finishes"] + 1}


def _step(model, c, thr, temperature, top_p, root, eos_id, opts: Options) -> dict:
  """One block iteration for every slot; slots whose token exits finish it (see the module doc)."""
  c, block, exit_P = _iterate(model, c, thr, opts)
  finish = lambda c: _finish(model, c, exit_P, temperature, top_p, root, eos_id, opts)
  c = jax.lax.cond(exit_P.any(), finish, lambda c: c, c)  # without the block's buffers
  rest = {k: v for k, v in c.items() if k not in ("prelude", "coda")}
  return {**rest, "cache": Cache(c["prelude"], block, c["coda"])}


def run(graphdef, params, c, thr, temperature, top_p, root_data, eos_id, opts: Options):
  """Steps until a sequence finishes (its slot is then free) or no slot is busy."""
  model, root = nnx.merge(graphdef, params), jax.random.wrap_key_data(root_data)

  def body(state):
    c, _ = state
    c = _step(model, c, thr, temperature, top_p, root, eos_id, opts)
    return c, (c["seq_P"] < 0).sum()

  free0 = (c["seq_P"] < 0).sum()
  c, _ = jax.lax.while_loop(lambda st: (st[1] == free0) & (st[0]["seq_P"] >= 0).any(), body, (c, free0))
  return c
