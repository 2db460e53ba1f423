"""Adaptive halting at inference: per-token exit once the block stops changing that token.

`halt(model, tokens_BS, criterion=..., threshold=..., max_iters=R)` runs the block in a
`jax.lax.while_loop` that stops as soon as every token has exited (or after R iterations), so the
iterations after the last exit are really not computed. Criteria, per token, after iteration t >= 2
(the first iteration has no predecessor, so no token can exit at t = 1):

- `fixed_point` (eps = threshold): every block layer l has settled, by the evaluator's per-layer
  criterion (`eval.fixed_points`) applied per token at iteration t: its direction turns by less than
  eps, ||X_t/||X_t|| - X_{t-1}/||X_{t-1}|| || < eps, and its relative change
  ||X_t - X_{t-1}|| / ||X_t|| < eps, or, as for a pre-norm stream whose norm grows linearly while its
  direction is fixed, rel * t <= linear_slack (1.5) with at least half of the change outward
  (norm growth >= rel / 2); `linear_slack=0` keeps the plain relative change;
- `kl`: KL(p_{t-1} || p_t) < threshold between successive next-token distributions (Huginn's rule,
  KL taken as in its code; its paper uses 5e-4);
- `cosine`: 1 - cos(s_t, s_{t-1}) < threshold between successive block outputs;
- `argmax_stable`: the argmax prediction unchanged for n = threshold consecutive iterations
  (pred_t = pred_{t-1} = ... = pred_{t-n}); n = 0 disables halting, like a zero threshold;
- `oracle`: evaluation only (it needs the future), see `eval.halting`.

Comparisons are strict (`<`), so a zero threshold never halts: the result then equals
`model(tokens, max_iters)`. An exited token's state is frozen (s = where(done, s_old, s_new)) while the
others go on; later tokens still attend to it. Exit iteration = the iteration whose output was kept;
tokens that never meet the criterion get exit = max_iters. Only `kl` and `argmax_stable` decode inside
the loop; `fixed_point` and `cosine` decode once, at the end.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from configs.errors import ConfigError

CRITERIA = ("fixed_point", "kl", "cosine", "argmax_stable", "oracle")
LOOP_CRITERIA = CRITERIA[:4]          # the ones `halt` runs; `oracle` is evaluation-only
DECODING_CRITERIA = ("kl", "argmax_stable")  # decode (coda + unembedding) every iteration
LINEAR_SLACK = 1.5  # the evaluator's default (eval.fixed_points.DEFAULT_THRESHOLDS)
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


def halt(model: Any, tokens_BS: jax.Array, *, criterion: str, threshold: float | int, max_iters: int,
         key: jax.Array | None = None, linear_slack: float = LINEAR_SLACK) -> HaltOutput:
  """Adaptive-depth inference of a `LoopedTransformer` (see the module docstring); `key` seeds
  state_init=normal. Validates the arguments first; jit `halt_loop` (traced threshold) for speed."""
  threshold = validate(criterion, threshold, max_iters)
  if isinstance(linear_slack, bool) or not isinstance(linear_slack, (int, float)) or not (
      0 <= linear_slack < math.inf):
    raise ConfigError("halting.linear_slack", linear_slack, allowed="a finite number >= 0")
  return halt_loop(model, tokens_BS, criterion=criterion, threshold=threshold, max_iters=max_iters,
                   key=key, linear_slack=linear_slack)


def fixed_point_meets(new_kBSD: jax.Array, old_kBSD: jax.Array, t: jax.Array, eps: jax.Array,
                      linear_slack: float) -> jax.Array:
  """[B, S] bool: every block layer l has settled between iterations t-1 and t (see module doc)."""
  new, old = new_kBSD.astype(jnp.float32), old_kBSD.astype(jnp.float32)
  n_new = jnp.maximum(jnp.linalg.norm(new, axis=-1), _TINY)
  n_old = jnp.maximum(jnp.linalg.norm(old, axis=-1), _TINY)
  rel = jnp.linalg.norm(new - old, axis=-1) / n_new
  turn = jnp.linalg.norm(new / n_new[..., None] - old / n_old[..., None], axis=-1)
  growth = (n_new - n_old) / n_new
  linear = (rel * t.astype(jnp.float32) <= linear_slack) & (growth >= rel / 2)
  return ((turn < eps) & ((rel < eps) | linear)).all(0)


def _one_minus_cos_BS(a_BSD: jax.Array, b_BSD: jax.Array) -> jax.Array:
  a, b = a_BSD.astype(jnp.float32), b_BSD.astype(jnp.float32)
  dot = (a * b).sum(-1)
  return 1.0 - dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), _TINY)


def halt_loop(model: Any, tokens_BS: jax.Array, *, criterion: str, threshold: Any, max_iters: int,
              key: jax.Array | None = None, linear_slack: float = LINEAR_SLACK) -> HaltOutput:
  """`halt` without validation: `threshold` may be a traced scalar (one compile for every value)."""
  ctx = model.context(tokens_BS.shape[1])
  e_BSD = model.encode(tokens_BS, ctx)
  s0_BSD = model.initial_state(e_BSD, key)
  decodes = criterion in DECODING_CRITERIA
  thr = jnp.asarray(threshold, jnp.float32)

  # Iteration 1 (peeled): no predecessor, so it only fills the "previous" slots of the carry.
  s_BSD, outs_kBSD, _ = model.block_step(s0_BSD, e_BSD, ctx)
  B, S = tokens_BS.shape
  prev: dict[str, jax.Array] = {}
  if criterion == "fixed_point":
    prev["outs_kBSD"] = outs_kBSD
  if decodes:
    logits_BSV = model.decode(s_BSD, ctx)
    if criterion == "kl":
      prev["logp_BSV"] = jax.nn.log_softmax(logits_BSV, axis=-1)
    else:
      prev["pred_BS"] = logits_BSV.argmax(-1).astype(jnp.int32)
      prev["stable_BS"] = jnp.zeros((B, S), jnp.int32)
  done_BS = jnp.zeros((B, S), bool)
  exit_BS = jnp.full((B, S), max_iters, jnp.int32)

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < max_iters) & ~done.all()

  def body(carry):
    t, s_old, prev, done, exit_ = carry
    t = t + 1
    s_new, outs_kBSD, _ = model.block_step(s_old, e_BSD, ctx)
    nxt = dict(prev)
    if criterion == "fixed_point":
      meets = fixed_point_meets(outs_kBSD, prev["outs_kBSD"], t, thr, linear_slack)
      nxt["outs_kBSD"] = outs_kBSD
    elif criterion == "cosine":
      meets = _one_minus_cos_BS(s_new, s_old) < thr
    else:
      logits_BSV = model.decode(s_new, ctx)
      if criterion == "kl":
        logp_BSV = jax.nn.log_softmax(logits_BSV, axis=-1)
        kl_BS = (jnp.exp(prev["logp_BSV"]) * (prev["logp_BSV"] - logp_BSV)).sum(-1)
        meets = kl_BS < thr
        nxt["logp_BSV"] = logp_BSV
      else:
        pred_BS = logits_BSV.argmax(-1).astype(jnp.int32)
        stable_BS = jnp.where(pred_BS == prev["pred_BS"], prev["stable_BS"] + 1, 0)
        meets = (stable_BS >= thr) & (thr > 0)
        nxt["pred_BS"], nxt["stable_BS"] = pred_BS, stable_BS
    newly = meets & ~done
    s_keep = jnp.where(done[..., None], s_old, s_new)
    return t, s_keep, nxt, done | newly, jnp.where(newly, t, exit_)

  carry = (jnp.int32(1), s_BSD, prev, done_BS, exit_BS)
  t, s_BSD, _, _, exit_BS = jax.lax.while_loop(cond, body, carry)
  return HaltOutput(model.decode(s_BSD, ctx), exit_BS, t, s_BSD)
