"""Autoregressive generation with a KV cache and per-token adaptive depth (DESIGN §8).

  out = generate(model, [prompt_ids, ...], max_new=64, iterations=16,
                 exit=("fixed_point", 1e-3), cache="latest", temperature=0.8, top_k=40, seed=0)
  out.tokens[i], out.iterations[i]   # the generated ids of prompt i and the block iterations of each

The cache holds keys and values in fixed-size buffers of T = longest prompt + max_new - 1 slots per
sequence: prelude and coda layers one entry per token, the block's layers either one per
(iteration, layer) (`exact`: a token at iteration j reads earlier tokens' iteration-j entries, as the
full-sequence forward does) or one per layer holding each token's latest iteration (`latest`: memory
independent of R; a token at iteration j reads earlier tokens at their final iteration). With adaptive
exit a token that stopped at iteration e is read at e by later tokens at every j > e (`exact` reads
each position at slot min(j, its last iteration)).

Prompts are prefilled at R iterations (the whole prompt but its last token's block and coda, which the
decode loop runs). Decoding runs P slots (`slots`, default min(8, prompts)) with iteration-level
scheduling: one compiled step runs one block iteration for every slot, each slot at its own iteration
of its own current token; a slot whose token exits (criterion of `looped_models.halting`, the same
detector as the evaluator's, or R reached) decodes it through the coda, samples the next token, embeds
it and starts it at iteration 1 in the same step. So an exited token costs no further block FLOPs, at
batch 1 as in a batch; a finished sequence leaves its slot to the next waiting prompt (continuous
batching). Every function is compiled once per shape (prompt bucket, slots), not per token.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs.errors import ConfigError
from looped_models.halting import DECODING_CRITERIA, LOOP_CRITERIA, criterion_step, initial_prev, validate
from looped_models.layers import KV, make_cached_context
from looped_models.flops import pass_flops
from looped_models.sharding import BATCH_AXES, put, to_host

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


class GenerateOutput(NamedTuple):
  tokens: list[np.ndarray]       # per prompt: the generated ids
  iterations: list[np.ndarray]   # per prompt: the block iterations each generated token used
  oracle: list[np.ndarray] | None  # per prompt (track_oracle): the first iteration after which the
                                   # token's prediction no longer changed (within its iterations)
  logits: list[np.ndarray] | None  # per prompt (return_logits): each generated token's logits [V]
  stats: dict[str, Any]          # timing, FLOPs executed and needed, steps


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


def _layer(layer: Any, x_BLD: jax.Array, ctx: Any, group: Buffers, l: int, slot_B: jax.Array | None,
           last_BT: jax.Array | None = None) -> tuple[jax.Array, Buffers]:
  """Run `layer` (index l of its group) on L new tokens per row: write their keys and values into
  row b's buffers at slot slot_B[b] (None: the group's only slot) and positions pos_B[b] + 0..L-1,
  then attend over the row's buffer at that slot. With `last_BT` (the exact cache) position t is read
  at slot min(slot_B[b], last_BT[b, t]): a token that exited is read at its last iteration. A row
  whose position is past the buffer (a slot that is idle, or not finishing a token) writes nothing.
  The writes are in place: a dynamic update per row (with a scatter, or a read of the buffer before
  the write, XLA copies the whole buffer every step)."""
  B, L = x_BLD.shape[:2]
  T = group.k_SLBHKT.shape[-1]
  start_B = jnp.minimum(ctx.pos_B, T - L)
  inside_B = ctx.pos_B + L <= T  # a row whose position points past the buffer writes nothing
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


def _layers(layers: Any, x_BLD: jax.Array, ctx: Any, group: Buffers) -> tuple[jax.Array, Buffers]:
  """A prelude or coda stack (one slot per layer)."""
  for l, layer in enumerate(layers):
    x_BLD, group = _layer(layer, x_BLD, ctx, group, l, None)
  return x_BLD, group


def _block_iteration(model: Any, s_BLD: jax.Array, e_BLD: jax.Array, ctx: Any, group: Buffers,
                     slot_B: jax.Array, last_BT: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, Buffers]:
  """`LoopedTransformer.block_step` against the cache: (next state, layer outputs [k, B, L, D], cache)."""
  x_BLD = model.inject(s_BLD, e_BLD)
  outs = []
  for l, layer in enumerate(model.block):
    x_BLD, group = _layer(layer, x_BLD, ctx, group, l, slot_B, last_BT)
    outs.append(x_BLD)
  x_BLD = outs[-1] = model.close_iteration(x_BLD)
  return x_BLD, jnp.stack(outs), group


def _encode(model: Any, tokens_BL: jax.Array, ctx: Any, group: Buffers) -> tuple[jax.Array, Buffers]:
  pos_BL = ctx.pos_B[:, None] + jnp.arange(tokens_BL.shape[1])[None]
  return _layers(model.prelude, model.embed_tokens(tokens_BL, pos_BL), ctx, group)


def _decode(model: Any, s_BLD: jax.Array, ctx: Any, group: Buffers) -> tuple[jax.Array, Buffers]:
  """`LoopedTransformer.decode` against the cache: logits [B, L, V] float32."""
  x_BLD, group = _layers(model.coda, model.latent(s_BLD), ctx, group)
  x_BLD = model.final_norm(x_BLD)
  logits = model.embed.attend(x_BLD) if model.unembed is None else model.unembed(x_BLD)
  return logits.astype(jnp.float32), group


def _state0(model: Any, e_BLD: jax.Array, key_B: jax.Array) -> jax.Array:
  """The initial state of each row's tokens (state_init normal|like_init: drawn per row's key)."""
  return jax.vmap(lambda e, k: model.initial_state(e[None], k)[0])(e_BLD, key_B)


def _keys(root: jax.Array, seq_B: jax.Array, pos_B: jax.Array) -> jax.Array:
  """One key per (sequence, position): sampling and initial states do not depend on the slots."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(root, s), p))(seq_B, pos_B)


# -- sampling -------------------------------------------------------------------------------------


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


# -- the compiled pieces --------------------------------------------------------------------------


class Options(NamedTuple):
  """What fixes the compiled programs (static)."""
  iterations: int              # R, the cap
  cache: str                   # exact | latest
  criterion: str | None        # None: fixed R
  top_k: int
  length: int                  # T, the buffer
  max_new: int
  stop_at_eos: bool
  track_oracle: bool
  return_logits: bool


def _prefill(graphdef, params, tokens_AL, lengths_A, seq_A, root, opts: Options):
  """Prefill A prompts (padded to L) at R iterations into a fresh cache of A rows; returns the cache
  and each prompt's last token's prelude output (its block iterations run in the decode loop)."""
  model = nnx.merge(graphdef, params)
  m, (A, L) = model.spec, tokens_AL.shape
  cache = empty_cache(m, A, opts.length, opts.iterations, opts.cache, jnp.dtype(m.dtype))
  zero_A = jnp.zeros(A, jnp.int32)
  ctx = make_cached_context(m, zero_A, L, opts.length)
  e_ALD, prelude = _encode(model, tokens_AL, ctx, cache.prelude)
  key_A = _keys(jax.random.fold_in(root, 1), seq_A, zero_A)
  s_ALD = _state0(model, e_ALD, key_A)

  def body(t, carry):
    s, block = carry
    slot_A = zero_A + t if opts.cache == "exact" else None
    s, _, block = _block_iteration(model, s, e_ALD, ctx, block, slot_A)
    return s, block

  s_ALD, block = jax.lax.fori_loop(0, opts.iterations, body, (s_ALD, cache.block))
  _, coda = _layers(model.coda, model.latent(s_ALD), ctx, cache.coda)
  last_A = lengths_A - 1
  return Cache(prelude, block, coda), e_ALD[jnp.arange(A), last_A][:, None]


def _carry(m: Any, slots: int, n_seqs: int, opts: Options, cache: Cache) -> dict:
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


def _admit(graphdef, params, c, tokens_AL, lengths_A, seq_A, slot_A, root_data, opts: Options):
  """Prefill prompts seq_A into the free slots slot_A (slot P: padding, dropped)."""
  model, root = nnx.merge(graphdef, params), jax.random.wrap_key_data(root_data)
  new, e_A1D = _prefill(graphdef, params, tokens_AL, lengths_A, seq_A, root, opts)
  into_slots = lambda buf, rows: buf.at[:, :, slot_A].set(rows, mode="drop")
  cache = jax.tree.map(into_slots, c["cache"], new)
  last_A = lengths_A - 1
  key_A = _keys(jax.random.fold_in(root, 1), seq_A, last_A)
  s_A1D = _state0(model, e_A1D, key_A)
  set_ = lambda x, v: x.at[slot_A].set(v.astype(x.dtype), mode="drop")
  admitted_P = jnp.zeros(c["seq_P"].shape[0], bool).at[slot_A].set(True, mode="drop")
  prev = _where_rows(admitted_P, initial_prev_of(model.spec, opts.criterion, c["s_P1D"]), c["prev"])
  return {**c, "cache": cache, "last_BT": c["last_BT"].at[slot_A].set(opts.iterations - 1, mode="drop"),
          "pos_P": set_(c["pos_P"], last_A), "it_P": set_(c["it_P"], jnp.zeros_like(last_A)),
          "s_P1D": set_(c["s_P1D"], s_A1D), "e_P1D": set_(c["e_P1D"], e_A1D),
          "seq_P": set_(c["seq_P"], seq_A), "gen_P": set_(c["gen_P"], jnp.zeros_like(last_A)),
          "changed_P": set_(c["changed_P"], jnp.zeros_like(last_A)), "prev": prev}


def _step(model, c, thr, temperature, top_p, root, eos_id, opts: Options):
  """One block iteration for every slot; slots whose token exits finish it (see the module doc)."""
  m, R = model.spec, opts.iterations
  P = c["seq_P"].shape[0]
  rows = jnp.arange(P)
  ctx = make_cached_context(m, c["pos_P"], 1, opts.length)
  exact = opts.cache == "exact"
  # with fixed R every token's last iteration is R: the slot read is the current one (a slice, not a
  # gather per position)
  track_last = exact and opts.criterion is not None
  slot_P = c["it_P"] if exact else None
  s_new, outs_kP1D, block = _block_iteration(model, c["s_P1D"], c["e_P1D"], ctx, c["cache"].block,
                                             slot_P, c["last_BT"] if track_last else None)
  it_P, active_P = c["it_P"] + 1, c["seq_P"] >= 0
  peek = lambda s: _decode(model, s, ctx, c["cache"].coda)[0]   # the coda's writes are redone on exit
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
  # an exiting token is read at its last iteration from now on (exact); the others, and every position
  # not yet decoded, at the newest slot (R - 1) until they exit
  last_BT = (c["last_BT"].at[rows, c["pos_P"]].set(jnp.where(exit_P, it_P - 1, R - 1), mode="drop")
             if track_last else c["last_BT"])
  cache = c.pop("cache")
  c = {**c, "last_BT": last_BT, "prelude": cache.prelude, "coda": cache.coda, "s_P1D": s_new, "it_P": it_P,
       "prev": prev, "changed_P": changed_P, "pred_P": pred_P, "steps": c["steps"] + 1,
       "busy": c["busy"] + active_P.sum()}

  def finish(c):
    # only the exiting slots write (the others' positions point past the buffer: dropped)
    fctx = make_cached_context(m, jnp.where(exit_P, c["pos_P"], opts.length), 1, opts.length)
    logits_P1V, coda = _decode(model, c["s_P1D"], fctx, c["coda"])
    seq_P, gen_P = c["seq_P"], c["gen_P"]
    tok_P = sample(logits_P1V[:, 0], _keys(root, seq_P, gen_P), temperature, opts.top_k, top_p)
    forced_P = c["forced"][jnp.maximum(seq_P, 0), jnp.minimum(gen_P, opts.max_new - 1)]
    tok_P = jnp.where(forced_P >= 0, forced_P, tok_P)
    at_seq = jnp.where(exit_P, seq_P, c["out_tok"].shape[0])                  # not exiting: dropped
    record = lambda out, v: out.at[at_seq, gen_P].set(v, mode="drop")
    out = {"out_tok": record(c["out_tok"], tok_P), "out_it": record(c["out_it"], it_P),
           "out_oracle": record(c["out_oracle"], changed_P),
           "out_len": c["out_len"].at[at_seq].set(gen_P + 1, mode="drop")}
    if opts.return_logits:
      out["out_logits"] = record(c["out_logits"], logits_P1V[:, 0])
    gen_P = gen_P + exit_P
    done_P = exit_P & ((gen_P >= opts.max_new) | (opts.stop_at_eos & (tok_P == eos_id)))
    # the next token of every exiting slot: embed it at the next position and start its iterations
    pos_P = c["pos_P"] + exit_P
    nctx = make_cached_context(m, jnp.where(exit_P, pos_P, opts.length), 1, opts.length)
    e_P1D, prelude = _encode(model, tok_P[:, None], nctx, c["prelude"])
    s0_P1D = _state0(model, e_P1D, _keys(jax.random.fold_in(root, 1), seq_P, pos_P))
    ex = exit_P[:, None, None]
    prev = _where_rows(exit_P, initial_prev_of(m, opts.criterion, s0_P1D), c["prev"])
    return {**c, **out, "prelude": prelude, "coda": coda, "prev": prev,
            "pos_P": pos_P,
            "it_P": jnp.where(exit_P, 0, c["it_P"]), "gen_P": gen_P,
            "s_P1D": jnp.where(ex, s0_P1D, c["s_P1D"]), "e_P1D": jnp.where(ex, e_P1D, c["e_P1D"]),
            "seq_P": jnp.where(done_P, -1, seq_P), "finishes": c["finishes"] + 1}

  c = jax.lax.cond(exit_P.any(), finish, lambda c: c, c)  # without the block's buffers
  cache = Cache(c.pop("prelude"), block, c.pop("coda"))
  return {**c, "cache": cache}


def _run(graphdef, params, c, thr, temperature, top_p, root_data, eos_id, opts: Options):
  """Steps until a sequence finishes (its slot is then free) or no slot is busy."""
  model, root = nnx.merge(graphdef, params), jax.random.wrap_key_data(root_data)

  def body(state):
    c, _ = state
    c = _step(model, c, thr, temperature, top_p, root, eos_id, opts)
    return c, (c["seq_P"] < 0).sum()

  free0 = (c["seq_P"] < 0).sum()
  c, _ = jax.lax.while_loop(lambda st: (st[1] == free0) & (st[0]["seq_P"] >= 0).any(), body, (c, free0))
  return c


# -- the public API -------------------------------------------------------------------------------


def check(m: Any, prompts: Sequence[Sequence[int]], *, max_new: int, iterations: int,
          exit: tuple[str, float] | None, cache: str, temperature: float, top_k: int, top_p: float,
          slots: int | None, max_len: int | None = None) -> int:
  """One-line ConfigError for arguments that cannot work, before anything is compiled; returns the
  buffer length T (every prompt token and every new token but the last is fed to the model)."""
  if not len(prompts):
    raise ConfigError("generate.prompts", "[]", reason="give at least one prompt")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ConfigError("generate.prompt", repr(""), reason=f"prompt {i} is empty")
    bad = [int(t) for t in p if not 0 <= int(t) < m.vocab_size]
    if bad:
      raise ConfigError("generate.prompt", bad[0], reason=f"prompt {i} holds a token outside the "
                        f"model's vocabulary of {m.vocab_size}: the tokenizer does not match the run")
  if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
    raise ConfigError("generate.max_new", max_new, allowed="an integer >= 1")
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ConfigError("generate.iterations", iterations, allowed="an integer R >= 1")
  if cache not in CACHES:
    raise ConfigError("generate.cache", cache, CACHES)
  if exit is not None:
    criterion, threshold = exit
    if criterion not in LOOP_CRITERIA:
      raise ConfigError("generate.exit", criterion, LOOP_CRITERIA)
    threshold = validate(criterion, threshold, iterations)
    if not threshold > 0:
      raise ConfigError("generate.exit", threshold, allowed="a threshold > 0 (omit --exit for fixed R)")
  if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
    raise ConfigError("generate.temperature", temperature, allowed="a number >= 0 (0: greedy)")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= m.vocab_size:
    raise ConfigError("generate.top_k", top_k, allowed=f"an integer in 0..{m.vocab_size} (0: all)")
  if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ConfigError("generate.top_p", top_p, allowed="a number in (0, 1]")
  if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
    raise ConfigError("generate.slots", slots, allowed="an integer >= 1")
  longest = max(len(p) for p in prompts)
  context = m.max_len if max_len is None else max_len
  if longest > context:
    raise ConfigError("generate.prompt", f"{longest} tokens", reason=f"longer than the model's "
                      f"context of {context} tokens (model.max_len)")
  if longest + max_new - 1 > context:  # the last new token is sampled, never fed back
    raise ConfigError("generate.max_new", max_new, reason=f"a prompt of {longest} tokens leaves room "
                      f"for {context - longest + 1} new tokens in the model's context of {context}")
  return longest + max_new - 1


class Generator:
  """A model's generation programs, compiled once per (options, shapes) and kept for later calls.

  With `mesh` (the mesh the parameters are sharded on, e.g. `open_run(...).mesh`), the decoding state
  lives on it too: the KV cache split by sequence slots over data x fsdp where they divide, the rest
  replicated. Under several processes (jax.distributed) every process makes the same call and gets
  the same result, each device computing its share."""

  def __init__(self, model: Any, mesh: Any = None):
    self.spec, self.mesh = model.spec, mesh
    self.graphdef, self.params = nnx.split(model)
    self._programs: dict[Options, _Programs] = {}

  def _put(self, x: Any, rows: bool = True) -> jax.Array:
    """A host value (the same on every process) on the mesh; a local array without one."""
    return jnp.asarray(x) if self.mesh is None else put(x, self.mesh, rows)

  def _init_carry(self, P: int, N: int, T: int, opts: Options) -> dict:
    """The decoding state of P slots and N sequences, made on the device(s) it lives on."""
    m = self.spec
    init = lambda: _carry(m, P, N, opts, empty_cache(m, P, T, opts.iterations, opts.cache,
                                                      jnp.dtype(m.dtype)))
    if self.mesh is None:
      return jax.jit(init)()
    ways = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
    cache_rows = PartitionSpec(None, None, BATCH_AXES) if P % ways == 0 else PartitionSpec()
    shapes = jax.eval_shape(init)
    shardings = {k: jax.tree.map(lambda _: NamedSharding(self.mesh, cache_rows if k == "cache"
                                                         else PartitionSpec()), v)
                 for k, v in shapes.items()}
    return jax.jit(init, out_shardings=shardings)()

  def __call__(self, prompts: Sequence[Sequence[int]], *, max_new: int, iterations: int,
               exit: tuple[str, float] | None = None, cache: str = "exact", temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, slots: int | None = None,
               eos_id: int | None = None, track_oracle: bool = False, return_logits: bool = False,
               forced: Sequence[Sequence[int]] | None = None, context: int | None = None
               ) -> GenerateOutput:
    """See `generate`."""
    m, params = self.spec, self.params
    if context is not None and context > m.max_len and m.positions != "rope":
      raise ConfigError("generate.context", context, allowed=f"<= model.max_len={m.max_len}",
                        reason="learned position embeddings end there (RoPE models may go further)")
    T = check(m, prompts, max_new=max_new, iterations=iterations, exit=exit, cache=cache,
              temperature=temperature, top_k=top_k, top_p=top_p, slots=slots, max_len=context)
    if forced is not None and (len(forced) != len(prompts) or any(len(f) > max_new for f in forced)):
      raise ConfigError("generate.forced", f"{len(forced)} sequences", reason=f"give one sequence of "
                        f"at most max_new={max_new} tokens per prompt")
    criterion, threshold = exit if exit is not None else (None, 0.0)
    opts = Options(iterations, cache, criterion, top_k, T, max_new, eos_id is not None, track_oracle,
                   return_logits)
    N, P = len(prompts), min(slots or 8, len(prompts))
    L = max(len(p) for p in prompts)
    root = self._put(jax.random.key_data(jax.random.key(seed)), rows=False)
    scalars = (*(self._put(np.float32(x)) for x in (threshold, temperature, top_p)), root,
               self._put(np.int32(-1 if eos_id is None else eos_id)))
    if opts not in self._programs:
      self._programs[opts] = _Programs(self.graphdef, opts)
    programs = self._programs[opts]

    def admit_args(c, items: list[tuple[int, int]]):
      """items: (sequence, slot); padded to the next power of two (at most P) with dropped rows."""
      A = min(P, 1 << (len(items) - 1).bit_length())
      tokens = np.zeros((A, L), np.int32)
      lengths, seqs, slot = np.ones(A, np.int32), np.zeros(A, np.int32), np.full(A, P, np.int32)
      for a, (i, s) in enumerate(items):
        tokens[a, :len(prompts[i])] = prompts[i]
        lengths[a], seqs[a], slot[a] = len(prompts[i]), i, s
      return (params, c, *(self._put(x) for x in (tokens, lengths, seqs, slot)), root)

    c = self._init_carry(P, N, T, opts)
    if forced is not None:
      table = np.full((N, max_new), -1, np.int32)
      for i, f in enumerate(forced):
        table[i, :len(f)] = f
      c["forced"] = self._put(table, rows=False)
    queue, free = list(range(N)), list(range(P))
    compile_s = decode_s = prefill_s = 0.0
    while True:
      if queue and free:
        items = [(queue.pop(0), free.pop(0)) for _ in range(min(len(queue), len(free)))]
        args = admit_args(c, items)
        admit, dt = programs.get(("admit", args[2].shape, P, N), args)
        compile_s += dt
        t0 = time.perf_counter()
        c = jax.block_until_ready(admit(*args))
        prefill_s += time.perf_counter() - t0
      args = (params, c, *scalars)
      run, dt = programs.get(("run", P, N), args)
      compile_s += dt
      t0 = time.perf_counter()
      c = jax.block_until_ready(run(*args))
      decode_s += time.perf_counter() - t0
      seq_P = to_host(c["seq_P"])
      free = [p for p in range(P) if seq_P[p] < 0]
      if not queue and len(free) == P:
        break

    host = {k: to_host(c[k]) for k in ("out_len", "out_tok", "out_it", "steps", "finishes", "busy")
            + ("out_oracle",) * track_oracle + ("out_logits",) * return_logits}
    lengths = host["out_len"]
    take = lambda key: [host[key][i, :lengths[i]] for i in range(N)]
    its = take("out_it")
    steps, finishes, busy = int(host["steps"]), int(host["finishes"]), int(host["busy"])
    flops = _flops(m, T, opts, P, steps, finishes, its, N, L)
    new_tokens = int(lengths.sum())
    stats = {"tokens": new_tokens, "prompts": N, "slots": P, "iterations_cap": iterations,
             "cache": cache, "exit": None if exit is None else f"{criterion}:{threshold}",
             "mean_iterations": float(np.concatenate(its).mean()), "steps": steps,
             "finish_steps": finishes, "slot_utilisation": busy / max(steps * P, 1),
             "decode_s": decode_s, "prefill_s": prefill_s, "compile_s": compile_s,
             "decode_tokens_per_s": new_tokens / decode_s if decode_s else None,
             "cache_bytes": cache_bytes(m, P, T, iterations, cache, m.dtype), **flops}
    return GenerateOutput(take("out_tok"), its, take("out_oracle") if track_oracle else None,
                          take("out_logits") if return_logits else None, stats)


def generate(model: Any, prompts: Sequence[Sequence[int]], mesh: Any = None, **options
             ) -> GenerateOutput:
  """Generate `max_new` tokens after each prompt (lists of token ids) with R = `iterations` block
  iterations per token, or fewer where `exit` = (criterion, threshold) fires first; `cache` exact |
  latest; sampling by `temperature` (0: greedy), `top_k`, `top_p`, `seed`; `slots` sequences in
  flight; a sequence stops early at `eos_id` when given. `track_oracle` records, per token, the first
  iteration after which its argmax prediction no longer changed; `return_logits` each token's logits.
  `forced` (teacher forcing): per prompt, tokens fed in place of the sampled ones, so that the logits
  score a given text as decoding computes it. `context`: the longest sequence, prompt and new tokens
  (default model.max_len; beyond it only with RoPE positions).
  `mesh`: the mesh the model's parameters are sharded on (see `Generator`).
  Compiles on every call: reuse a `Generator(model)` to generate more than once."""
  return Generator(model, mesh)(prompts, **options)


def _flops(m: Any, T: int, opts: Options, P: int, steps: int, finishes: int,
           its: list[np.ndarray], N: int, L: int) -> dict[str, float]:
  """Forward FLOPs of the decode loop as executed (every slot of every step, active or idle, and
  the finishing branch for every slot whenever one exits) and as needed (each token's own
  iterations); `flops_prefill` for the prompts."""
  f = pass_flops(m, T)
  peeks = (opts.criterion in DECODING_CRITERIA) + opts.track_oracle
  per_iter = f.iteration + peeks * f.decode
  needed_iters = float(sum(int(i.sum()) for i in its))
  executed = steps * P * per_iter + finishes * P * (f.prelude + f.decode)
  needed = needed_iters * per_iter + sum(len(i) for i in its) * (f.prelude + f.decode)
  return {"flops_executed": float(executed), "flops_needed": float(needed),
          "block_flops_executed": float(steps * P * f.iteration),
          "block_flops_needed": needed_iters * f.iteration,
          "flops_prefill": float(N * L * (f.prelude + f.decode + opts.iterations * f.iteration))}


class _Programs:
  """The compiled programs of one (graph, options), ahead of time so that timings exclude compiles."""

  def __init__(self, graphdef, opts: Options):
    self.compiled = {}
    self.fns = {"admit": functools.partial(_admit, graphdef, opts=opts),
                "run": functools.partial(_run, graphdef, opts=opts)}

  def get(self, key: tuple, args: tuple) -> tuple[Any, float]:
    """(the compiled program `key[0]` for `args`, seconds spent compiling it now). The decoding
    state it returns keeps the shardings it came with (args[1]), so the next call fits it."""
    if key in self.compiled:
      return self.compiled[key], 0.0
    t0 = time.perf_counter()
    shardings = jax.tree.map(lambda a: a.sharding, args[1])
    fn = jax.jit(self.fns[key[0]], donate_argnums=(1,), out_shardings=shardings)
    self.compiled[key] = fn.lower(*args).compile()
    return self.compiled[key], time.perf_counter() - t0
