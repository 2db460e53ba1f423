"""The fixed-point test: one rule for the evaluator's convergence verdict and for halting.

A stream X_t (one block layer; per token, or a mean over tokens) has settled at iteration t, from
statistics of the step X_{t-1} -> X_t, when its direction has stopped turning and either it has
stopped moving or it grows linearly along that direction, as a pre-norm block without injection does
(it keeps adding to its residual stream, so the relative change falls only like 1/t):

  cos_change < eps_cos  and  (rel < eps_rel  or  (linear < eps_linear  and  growth >= rel / 2))

- rel = ||X_t - X_{t-1}|| / ||X_t||, the relative change;
- cos_change = 1 - cos(X_t, X_{t-1}), the turn of the direction;
- growth = (||X_t|| - ||X_{t-1}||) / ||X_t||, the radial part of the change (at least half of it
  outward for linear growth);
- linear, the linear-growth residual: the one quantity the two users measure differently.
  Over a tail (`eval.fixed_points`, which sees the whole trajectory and asks the test to hold at
  every later iteration): rel * t with t the 1-based iteration, against `linear_slack`.
  At one iteration (`looped_models.halting`, which cannot see the future, and where rel * t would
  pass any outward jump early on): the increments agree, ||D_t - D_{t-1}|| / ||X_t|| with
  D_t = X_t - X_{t-1}, against the halting threshold. None leaves the linear case out.

Comparisons are strict, so a zero threshold never passes; NaN statistics (no predecessor) fail.
The rule uses only array operators, so the same function runs on numpy float64 statistics and on
jax arrays inside `jax.jit`.
"""

from __future__ import annotations

from typing import Any


def settled(rel: Any, cos_change: Any, growth: Any, linear: Any = None, *, eps_rel: Any,
            eps_cos: Any, eps_linear: Any = None) -> Any:
  """Elementwise bool array: the fixed-point test above (inputs of one shape, or broadcastable)."""
  still = rel < eps_rel
  if linear is not None:
    still = still | ((linear < eps_linear) & (growth >= rel / 2))
  return (cos_change < eps_cos) & still


def one_threshold(eps: Any) -> dict[str, Any]:
  """The thresholds of `settled` from one number, as halting uses it: eps bounds the relative change,
  the linear-growth residual and the turn ||X_t/||X_t|| - X_{t-1}/||X_{t-1}|| || = sqrt(2 cos_change),
  so eps_cos = eps^2 / 2."""
  return {"eps_rel": eps, "eps_cos": eps * eps / 2, "eps_linear": eps}
