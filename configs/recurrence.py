"""How many iterations of the block each training step runs (sampled on the host, same on every host)."""

from __future__ import annotations

from typing import Any

import numpy as np

from configs.errors import ConfigError, check_choice, check_int

RECURRENCES = ("fixed", "uniform", "poisson_lognormal")
_STREAM = 2  # data streams 0 and 1 are the task's training and evaluation batches


def validate(t: Any) -> None:
  check_choice("train.recurrence", t.recurrence, RECURRENCES)
  check_int("train.mean_recurrence", t.mean_recurrence, minimum=1)
  check_int("train.backprop_depth", t.backprop_depth, minimum=0)
  if t.recurrence != "fixed":
    check_int("train.max_recurrence", t.max_recurrence, minimum=1)
  if t.recurrence == "uniform":
    check_int("train.min_recurrence", t.min_recurrence, minimum=1)
    if t.min_recurrence > t.max_recurrence:
      raise ConfigError("train.min_recurrence", t.min_recurrence,
                        reason=f"must be <= train.max_recurrence={t.max_recurrence}")
  if t.recurrence == "poisson_lognormal" and not t.recurrence_sigma >= 0:
    raise ConfigError("train.recurrence_sigma", t.recurrence_sigma, allowed=">= 0")
  if t.backprop_depth > max_recurrence(t):
    cap = "train.mean_recurrence" if t.recurrence == "fixed" else "train.max_recurrence"
    raise ConfigError("train.backprop_depth", t.backprop_depth,
                      reason=f"must be <= the recurrence cap {cap}={max_recurrence(t)} (0: all)")


def max_recurrence(t: Any) -> int:
  """The static scan length of the train step: every sampled count is at most this."""
  return t.mean_recurrence if t.recurrence == "fixed" else t.max_recurrence


def sample(t: Any, step: int) -> int:
  """The iteration count for `step`: fixed r; uniform in [min, max]; or Huginn's
  tau ~ N(log r - sigma^2/2, sigma), r ~ Poisson(e^tau) + 1, capped at max_recurrence."""
  if t.recurrence == "fixed":
    return int(t.mean_recurrence)
  rng = np.random.default_rng([_STREAM, t.seed, step])
  if t.recurrence == "uniform":
    return int(rng.integers(t.min_recurrence, t.max_recurrence + 1))
  tau = rng.normal(np.log(t.mean_recurrence) - t.recurrence_sigma ** 2 / 2, t.recurrence_sigma)
  return int(min(rng.poisson(np.exp(tau)) + 1, t.max_recurrence))
