"""Adaptive halting at inference: per-token exit once the block stops changing that token.

`halt(model, tokens_BS, criterion=..., threshold=..., max_iters=R)` runs the block in a
`jax.lax.while_loop` that stops as soon as every token has exited (or after R iterations), so the
iterations after the last exit are really not computed. Criteria, per token, after iteration t >= 2
(the first iteration has no predecessor, so no token can exit at t = 1):

- `fixed_point` (eps = threshold): every block layer passes the fixed-point test of
  `looped_models.fixed_point` (the one the evaluator's convergence verdict uses), per token at
  iteration t, with eps for all its bounds: its direction turns by less than eps,
  ||X_t/||X_t|| - X_{t-1}/||X_{t-1}|| || < eps (1 - cos < eps^2 / 2), and its relative change
  ||X_t - X_{t-1}|| / ||X_t|| < eps, or it is a pre-norm stream growing linearly along a fixed
  direction (relative change falling only like 1/t): successive increments D_t = X_t - X_{t-1} agree,
  ||D_t - D_{t-1}|| / ||X_t|| < eps, and the change is mostly outward (norm growth >= rel / 2).
  This is the test's one-iteration form of linear growth; the evaluator, which sees the whole tail,
  bounds rel * t instead, which at one iteration would pass any outward jump early on
  (`linear_growth=False`: the plain relative change);
- `kl`: KL(p_{t-1} || p_t) < threshold between successive next-token distributions (Huginn's rule,
  KL taken as in its code; its paper uses 5e-4);
- `cosine`: 1 - cos(s_t, s_{t-1}) < threshold between successive block outputs;
- `argmax_stable`: the argmax prediction unchanged for n = threshold consecutive iterations
  (pred_t = pred_{t-1} = ... = pred_{t-n}); n = 0 disables halting, like a zero threshold;
- `entropy`: |H(p_t) - H(p_{t-1})| < threshold, the change of the next-token distribution's entropy
  (nats) between successive iterations;
- `oracle`: evaluation only (it needs the future), see `eval.halting`.

Comparisons are strict (`<`), so a zero threshold never halts: the result then equals
`model(tokens, max_iters)`. An exited token's state is frozen (s = where(done, s_old, s_new)) while the
others go on; later tokens still attend to it. Exit iteration = the iteration whose output was kept;
tokens that never meet the criterion get exit = max_iters. Only `kl`, `argmax_stable` and `entropy` decode
inside the loop; `fixed_point` and `cosine` decode once, at the end.

Causal order (`causal=True`, the default): a token exits only when it meets the criterion and every
earlier position has exited. A token still waiting for information from the left looks settled (it is
on the fixed point of the context it sees so far); freezing it would cut the path that information
takes through it. Once its whole causal context is frozen, its own map is fixed and a small change
really means a fixed point — as in KV-cached generation, where earlier tokens are final.

Batching (`slots`): None runs all B sequences in one loop until the slowest token of the batch is done
(the others stay frozen meanwhile). An integer P runs per-sequence exit with continuous batching: P
sequences are in flight, and a sequence whose tokens have all exited leaves its slot to the next one,
so each sequence costs only its own iterations (same outputs; `iterations` counts loop steps of P
slots).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from configs.errors import ConfigError
from looped_models.fixed_point import one_threshold, settled

CRITERIA = ("fixed_point", "kl", "cosine", "argmax_stable", "entropy", "oracle")
LOOP_CRITERIA = CRITERIA[:-1]         # the ones `halt` and generation run; `oracle` is evaluation-only
DECODING_CRITERIA = ("kl", "argmax_stable", "entropy")  # decode (coda + unembedding) every iteration
_TINY = 1e-30


class HaltOutput(NamedTuple):
  logits_BSV: jax.Array    # decode of the final (frozen) state, float32
  exit_BS: jax.Array       # int32, the iteration (1..max_iters) each token's state was kept from
  iterations: jax.Array    # int32 scalar, block iterations the loop actually ran
  state_BSD: jax.Array     # the final recurrent state (exited tokens frozen at their exit)


def validate(criterion: Any, threshold: Any, max_iters: Any) -> float | int:
  """Check the arguments of `halt` (one-line ConfigError); returns the threshold as float (or int n)."""
  if criterion == "oracle":
    raise ConfigError("halting.criterion", criterion, reason="oracle is evaluation-only (it needs the "
                      "predictions of later iterations); use eval.halting.evaluate_halting")
  if criterion not in LOOP_CRITERIA:
    raise ConfigError("halting.criterion", criterion, CRITERIA)
  if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
    raise ConfigError("halting.max_iters", max_iters, allowed="an integer >= 1")
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
    raise ConfigError("halting.threshold", threshold, reason="must be a number")
  if criterion == "argmax_stable":
    if not (math.isfinite(threshold) and float(threshold).is_integer()) or threshold < 0:
      raise ConfigError("halting.threshold", threshold, allowed="an integer n >= 0 (argmax_stable: "
                        "iterations the prediction must stay unchanged)")
    return int(threshold)
  if not threshold >= 0 or math.isinf(threshold):  # also NaN
    raise ConfigError("halting.threshold", threshold, allowed="a finite number >= 0")
  return float(threshold)


def check_exit(exit: tuple[Any, Any], max_iters: int, key: str = "exit") -> tuple[str, float | int]:
  """A per-token exit setting (criterion, threshold) of a loop (generation, scoring) checked: one
  of LOOP_CRITERIA and a threshold > 0 (one-line ConfigError naming `key`); the threshold as
  `validate` returns it."""
  criterion, threshold = exit
  if criterion not in LOOP_CRITERIA:
    raise ConfigError(key, criterion, LOOP_CRITERIA)
  threshold = validate(criterion, threshold, max_iters)
  if not threshold > 0:
    raise ConfigError(key, threshold, allowed="a threshold > 0 (omit --exit for fixed R)")
  return criterion, threshold


def halt(model: Any, tokens_BS: jax.Array, *, criterion: str, threshold: float | int, max_iters: int,
         key: jax.Array | None = None, slots: int | None = None, causal: bool = True,
         linear_growth: bool = True) -> HaltOutput:
  """Adaptive-depth inference of a `LoopedTransformer` (see the module docstring); `key` seeds
  state_init=normal. Validates the arguments first; jit `halt_loop` (traced threshold) for speed."""
  threshold = validate(criterion, threshold, max_iters)
  if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
    raise ConfigError("halting.slots", slots, allowed="None or an integer >= 1")
  return halt_loop(model, tokens_BS, criterion=criterion, threshold=threshold, max_iters=max_iters,
                   key=key, slots=slots, causal=causal, linear_growth=linear_growth)


def fixed_point_meets(new_kBSD: jax.Array, old_kBSD: jax.Array, delta_kBSD: jax.Array,
                      eps: jax.Array, linear_growth: bool = True) -> tuple[jax.Array, jax.Array]:
  """([B, S] bool: every block layer passes the fixed-point test between iterations t-1 and t,
  this increment); `delta_kBSD` is the previous increment (NaN at t = 2: no linear growth yet)."""
  new, old = new_kBSD.astype(jnp.float32), old_kBSD.astype(jnp.float32)
  n_new = jnp.maximum(jnp.linalg.norm(new, axis=-1), _TINY)
  n_old = jnp.maximum(jnp.linalg.norm(old, axis=-1), _TINY)
  step = new - old
  rel = jnp.linalg.norm(step, axis=-1) / n_new
  turn = jnp.linalg.norm(new / n_new[..., None] - old / n_old[..., None], axis=-1)
  linear = jnp.linalg.norm(step - delta_kBSD, axis=-1) / n_new if linear_growth else None
  # 1 - cos as half the squared turn: float32 would round 1 - dot / norms to 0 at small angles
  ok_kBS = settled(rel, 0.5 * turn * turn, (n_new - n_old) / n_new, linear, **one_threshold(eps))
  return ok_kBS.all(0), step


def _one_minus_cos_BS(a_BSD: jax.Array, b_BSD: jax.Array) -> jax.Array:
  a, b = a_BSD.astype(jnp.float32), b_BSD.astype(jnp.float32)
  dot = (a * b).sum(-1)
  cos = dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), _TINY)
  return jnp.maximum(1.0 - cos, 0.0)  # rounding can make it negative: a zero threshold never halts


def initial_prev(m: Any, criterion: str, s_PSD: jax.Array) -> dict[str, jax.Array]:
  """Placeholders for what the criterion keeps of the previous iteration (unused at t = 1)."""
  P, S, D = s_PSD.shape
  if criterion == "fixed_point":
    shape = (m.block_size, P, S, D)
    return {"outs_kPSD": jnp.zeros(shape, s_PSD.dtype), "delta_kPSD": jnp.zeros(shape, jnp.float32)}
  if criterion == "kl":
    return {"logp_PSV": jnp.zeros((P, S, m.vocab_size), jnp.float32)}
  if criterion == "entropy":
    return {"entropy_PS": jnp.zeros((P, S), jnp.float32)}
  if criterion == "argmax_stable":
    return {"pred_PS": jnp.zeros((P, S), jnp.int32), "stable_PS": jnp.zeros((P, S), jnp.int32)}
  return {}


def criterion_step(criterion: str, decode: Any, s_old: jax.Array, s_new: jax.Array,
                   outs_kPSD: jax.Array, prev: dict, first_P: jax.Array, thr: jax.Array,
                   linear_growth: bool = True) -> tuple[jax.Array, dict]:
  """One iteration of a halting criterion over P rows of S tokens: (meets [P, S], what to keep for the
  next iteration; start from `initial_prev`). `decode(s)` gives the logits [P, S, V] of a state (the
  coda; generation passes the cached one). No token meets it at its first iteration (first_P)."""
  first_PS, nxt = first_P[:, None], {}
  if criterion == "fixed_point":
    meets, step = fixed_point_meets(outs_kPSD, prev["outs_kPSD"], prev["delta_kPSD"], thr, linear_growth)
    nxt["outs_kPSD"] = outs_kPSD
    nxt["delta_kPSD"] = jnp.where(first_P[None, :, None, None], jnp.nan, step)
  elif criterion == "cosine":
    meets = _one_minus_cos_BS(s_new, s_old) < thr
  else:
    logits_PSV = decode(s_new)
    if criterion == "entropy":
      logp_PSV = jax.nn.log_softmax(logits_PSV, axis=-1)
      h_PS = -(jnp.exp(logp_PSV) * logp_PSV).sum(-1)
      meets, nxt["entropy_PS"] = jnp.abs(h_PS - prev["entropy_PS"]) < thr, h_PS
    elif criterion == "kl":
      logp_PSV = jax.nn.log_softmax(logits_PSV, axis=-1)
      kl_PS = jnp.maximum((jnp.exp(prev["logp_PSV"]) * (prev["logp_PSV"] - logp_PSV)).sum(-1), 0.0)
      meets, nxt["logp_PSV"] = kl_PS < thr, logp_PSV
    else:
      pred_PS = logits_PSV.argmax(-1).astype(jnp.int32)
      same = (pred_PS == prev["pred_PS"]) & ~first_PS
      nxt["pred_PS"], nxt["stable_PS"] = pred_PS, jnp.where(same, prev["stable_PS"] + 1, 0)
      meets = (nxt["stable_PS"] >= thr) & (thr > 0)
  return meets & ~first_PS, nxt


def halt_loop(model: Any, tokens_BS: jax.Array, *, criterion: str, threshold: Any, max_iters: int,
              key: jax.Array | None = None, slots: int | None = None, causal: bool = True,
              linear_growth: bool = True) -> HaltOutput:
  """`halt` without validation: `threshold` may be a traced scalar (one compile for every value).
  Slot p holds sequence seq[p] (N: none left) at its own iteration t[p]; a sequence whose tokens have
  all exited (or reached max_iters) is written out and its slot refilled from the queue."""
  N, S = tokens_BS.shape
  P = N if slots is None else min(slots, N)
  ctx = model.context(S)
  e_NSD = model.encode(tokens_BS, ctx)
  s0_NSD = model.initial_state(e_NSD, key)
  thr = jnp.asarray(threshold, jnp.float32)
  carry = {"n": jnp.int32(0), "queue": jnp.int32(P), "seq_P": jnp.arange(P), "t_P": jnp.zeros(P, jnp.int32),
           "s_PSD": s0_NSD[:P], "e_PSD": e_NSD[:P], "done_PS": jnp.zeros((P, S), bool),
           "exit_PS": jnp.full((P, S), max_iters, jnp.int32),
           "prev": initial_prev(model.spec, criterion, s0_NSD[:P]),
           "out_s_NSD": jnp.zeros_like(s0_NSD), "out_exit_NS": jnp.full((N, S), max_iters, jnp.int32)}

  def body(c):
    s_new, outs_kPSD, _ = model.block_step(c["s_PSD"], c["e_PSD"], ctx, attention=False)
    t_P, done = c["t_P"] + 1, c["done_PS"]
    meets, prev = criterion_step(criterion, lambda s: model.decode(s, ctx), c["s_PSD"], s_new,
                                 outs_kPSD, c["prev"], t_P == 1, thr, linear_growth)
    if causal:  # a token exits only once every earlier position has exited (or exits now)
      meets = jnp.cumsum(~(meets | done), axis=1) == 0
    newly = meets & ~done
    c = {**c, "n": c["n"] + 1, "t_P": t_P, "prev": prev,
         "s_PSD": jnp.where(done[..., None], c["s_PSD"], s_new), "done_PS": done | newly,
         "exit_PS": jnp.where(newly, t_P[:, None], c["exit_PS"])}
    finished_P = (c["done_PS"].all(1) | (t_P >= max_iters)) & (c["seq_P"] < N)
    return jax.lax.cond(finished_P.any(), _swap, lambda c, f: c, c, finished_P)

  def _swap(c, finished_P):
    """Write the finished sequences out; load the next ones from the queue into their slots."""
    where_P = jnp.where(finished_P, c["seq_P"], N)
    c = {**c, "out_s_NSD": c["out_s_NSD"].at[where_P].set(c["s_PSD"], mode="drop"),
         "out_exit_NS": c["out_exit_NS"].at[where_P].set(c["exit_PS"], mode="drop")}
    seq_P = jnp.where(finished_P, c["queue"] + jnp.cumsum(finished_P) - 1, c["seq_P"])
    seq_P = jnp.minimum(seq_P, N)
    take_P = jnp.minimum(seq_P, N - 1)
    load_P, load_PS = finished_P[:, None, None], finished_P[:, None]
    return {**c, "seq_P": seq_P, "queue": c["queue"] + finished_P.sum(),
            "t_P": jnp.where(finished_P, 0, c["t_P"]),
            "s_PSD": jnp.where(load_P, s0_NSD[take_P], c["s_PSD"]),
            "e_PSD": jnp.where(load_P, e_NSD[take_P], c["e_PSD"]),
            "done_PS": jnp.where(load_PS, (seq_P >= N)[:, None], c["done_PS"]),
            "exit_PS": jnp.where(load_PS, max_iters, c["exit_PS"])}

  c = jax.lax.while_loop(lambda c: (c["seq_P"] < N).any(), body, carry)
  return HaltOutput(model.decode(c["out_s_NSD"], ctx), c["out_exit_NS"], c["n"], c["out_s_NSD"])
