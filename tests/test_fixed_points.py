"""Tests for eval/fixed_points.py on synthetic trajectories with known dynamics, and for the fixed-point
test it shares with halting (looped_models/fixed_point.py)."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.errors import ConfigError
from eval.fixed_points import (DEFAULT_THRESHOLDS, TOKEN_CLASSES, FixedPointReport, TrajectoryError,
                               analyze_stream, analyze_trajectory)
from looped_models.halting import criterion_step, initial_prev

R, K, B, S, D = 48, 3, 2, 4, 16


def _rng(seed=0):
  return np.random.default_rng(seed)


def contracting(points_kBSD, c, r=R, noise=1.0, seed=1):
  """X_{l,t} = P_l + c^t * n_l."""
  n_kBSD = noise * _rng(seed).normal(size=points_kBSD.shape)
  return np.stack([points_kBSD + c ** t * n_kBSD for t in range(r)])


def rotation(r, omega, shape_BS=(B, S), d=D, seed=2):
  """Each token turns in its own random plane by `omega` radians per iteration: [r, B, S, D]."""
  q = np.linalg.qr(_rng(seed).normal(size=(*shape_BS, d, 2)))[0]
  e1, e2 = q[..., 0], q[..., 1]
  ang = omega * np.arange(r)[:, None, None, None]
  return 3.0 * (np.cos(ang) * e1 + np.sin(ang) * e2)


def periodic(r, period=3, shape_BS=(B, S), d=D, seed=3):
  """Each token visits `period` distinct random points in turn: [r, B, S, D]."""
  pts = _rng(seed).normal(size=(period, *shape_BS, d))
  return np.stack([pts[t % period] for t in range(r)])


def per_layer(x_RBSD, k=K):
  return np.repeat(x_RBSD[:, None], k, axis=1)


def test_cyclic_distinct_points():
  points = 3.0 * _rng().normal(size=(K, B, S, D))
  rep = analyze_trajectory(contracting(points, 0.7))
  assert rep.regime == "cyclic"
  assert all(l.converged and l.converged_at is not None for l in rep.layers)
  assert rep.degeneracy_min_cosine < 0.99
  for l in rep.layers:
    assert l.contraction_rate == pytest.approx(0.7, rel=0.1)
  assert rep.token_classes == {"fixed_point": 1.0, "orbit": 0.0, "slider": 0.0, "unknown": 0.0}
  assert rep.successive_change.shape == (R, K) and np.isnan(rep.successive_change[0]).all()
  assert rep.distance_to_fixed[-1] == pytest.approx(np.zeros(K))
  assert np.all(np.diff(rep.distance_to_fixed[:, 0]) < 0)
  assert rep.thresholds == DEFAULT_THRESHOLDS
  assert rep.attention_similarity is None
  json.dumps(rep.to_dict(), allow_nan=False)


def test_degenerate_shared_point():
  point = 3.0 * _rng().normal(size=(1, B, S, D))
  rep = analyze_trajectory(contracting(np.repeat(point, K, axis=0), 0.6))
  assert rep.regime == "degenerate"
  assert rep.degeneracy_min_cosine > 0.999
  assert all(l.converged for l in rep.layers)


def test_pre_norm_linear_growth_is_converged_in_direction():
  u_kBSD = _rng().normal(size=(K, B, S, D))
  n_kBSD = _rng(5).normal(size=(K, B, S, D))
  x = np.stack([(t + 1) * u_kBSD + 0.1 * 0.7 ** t * n_kBSD for t in range(64)])
  rep = analyze_trajectory(x)
  assert rep.layers[0].final_change > 1e-3  # relative norm change only falls like 1/t
  assert all(l.converged for l in rep.layers)
  assert rep.regime == "cyclic"
  # The same direction for every layer is the degenerate case.
  rep1 = analyze_trajectory(np.stack([(t + 1) * np.repeat(u_kBSD[:1], K, 0) for t in range(64)]))
  assert rep1.regime == "degenerate"


def test_linear_growth_from_tiny_start_is_not_divergent():
  u_kBSD = _rng().normal(size=(K, B, S, D))
  x = np.stack([(t + 1e-3) * u_kBSD for t in range(64)])
  rep = analyze_trajectory(x)
  assert rep.residual_norm[-1, 0] / rep.residual_norm[0, 0] > 1e3
  assert rep.regime == "cyclic" and rep.divergent_reason is None


def test_orbit_period_three():
  rep = analyze_trajectory(per_layer(periodic(R)))
  assert rep.token_classes["orbit"] == 1.0
  assert rep.regime == "orbit"
  assert not any(l.converged for l in rep.layers)


@pytest.mark.parametrize("omega", [0.1, 0.4])
def test_slider_drift_without_return(omega):
  rep = analyze_trajectory(per_layer(rotation(64, omega)))
  assert rep.token_classes["slider"] == 1.0, rep.token_classes
  assert rep.regime == "slider"


def test_divergent_exploding_norms():
  n = _rng().normal(size=(K, B, S, D))
  rep = analyze_trajectory(np.stack([2.0 ** t * n for t in range(40)]))
  assert rep.regime == "divergent"
  assert "geometric" in rep.divergent_reason


def test_divergent_non_finite_does_not_crash():
  x = contracting(3.0 * _rng().normal(size=(K, B, S, D)), 0.7)
  x[10, 0, 0, 0, 0] = np.nan
  x[20, 1, 1, 2, 3] = np.inf
  rep = analyze_trajectory(x)
  assert rep.regime == "divergent"
  assert "non-finite" in rep.divergent_reason
  d = rep.to_dict()
  text = json.dumps(d, allow_nan=False)
  assert d["series"]["successive_change"][10][0] is None
  assert "NaN" not in text and "Infinity" not in text
  assert np.isfinite(rep.residual_norm[5]).all()
  assert sum(rep.token_classes.values()) == pytest.approx(1.0)


def test_mixed_batch_token_fractions():
  r = 64
  x = rotation(r, 0.1, shape_BS=(B, S)).copy()           # default: slider
  orbit = periodic(r, shape_BS=(B, S))
  fixed = contracting(3.0 * _rng(7).normal(size=(B, S, D)), 0.5, r=r)
  x[:, 0, :] = fixed[:, 0, :]                             # 4 of 8 tokens fixed
  x[:, 1, :2] = orbit[:, 1, :2]                           # 2 of 8 orbit
  rep = analyze_trajectory(per_layer(x, 2))
  assert rep.token_classes == pytest.approx(
      {"fixed_point": 0.5, "orbit": 0.25, "slider": 0.25, "unknown": 0.0})
  assert set(rep.token_classes) == set(TOKEN_CLASSES)
  assert rep.regime == "unconverged"


def test_iid_noise_is_unknown():
  rep = analyze_trajectory(per_layer(_rng(9).normal(size=(64, B, S, D)), 2))
  assert rep.token_classes["unknown"] == 1.0
  assert rep.regime == "unconverged"


def test_slow_contraction_converges_later():
  points = 3.0 * _rng().normal(size=(K, B, S, D))
  fast = analyze_trajectory(contracting(points, 0.5, r=64))
  slow = analyze_trajectory(contracting(points, 0.9, r=64))
  for f, s in zip(fast.layers, slow.layers):
    assert f.converged_at is not None and s.converged_at is not None
    assert f.converged_at < s.converged_at
    assert f.contraction_rate < s.contraction_rate


def _close(a, b, path=""):
  if isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for key in a:
      _close(a[key], b[key], f"{path}.{key}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{path}[{i}]")
  elif isinstance(a, float) and isinstance(b, float):
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6), path
  else:
    assert a == b, path


def _trajectory_with_attention(r=40, k=2, h=2):
  x = contracting(3.0 * _rng().normal(size=(k, B, S, D)), 0.8, r=r)
  logits = _rng(4).normal(size=(k, B, h, S, S))
  drift = _rng(6).normal(size=(k, B, h, S, S))
  mask = np.tril(np.ones((S, S), bool))
  att = []
  for t in range(r):
    z = np.where(mask, logits + 0.9 ** t * drift, -np.inf)
    e = np.exp(z - z.max(-1, keepdims=True))
    att.append(e / e.sum(-1, keepdims=True))
  return x, np.stack(att)


def test_streaming_matches_across_chunk_sizes():
  x, att = _trajectory_with_attention()
  r = x.shape[0]
  reports = []
  for size in (1, 7, r):
    def chunks(size=size):
      for i in range(0, r, size):
        yield x[i:i + size], att[i:i + size]
    reports.append(analyze_stream(chunks).to_dict())
  reports.append(analyze_trajectory(x, att, chunk_size=5).to_dict())
  for other in reports[1:]:
    _close(reports[0], other)
  assert reports[0]["regime"] == "cyclic"


def test_attention_series_in_report():
  x, att = _trajectory_with_attention(r=20, k=2, h=3)
  rep = analyze_trajectory(x, att, map_batch=1)
  assert rep.attention_change.shape == (20, 2, 3) and np.isnan(rep.attention_change[0]).all()
  assert np.all(np.diff(rep.attention_change[1:, 0, 0]) < 0)
  for name in ("colsum_concentration", "sink_rate", "mixing"):
    assert getattr(rep, name).shape == (20, 2)
  sim = rep.attention_similarity  # the first map_iterations=16 iterations x 2 layers
  assert sim.shape == (32, 32) and np.allclose(np.diag(sim), 1.0) and np.allclose(sim, sim.T)
  assert rep.thresholds["map_batch"] == 1
  whole = analyze_trajectory(x, att, map_batch=1, map_iterations=20).attention_similarity
  assert whole.shape == (40, 40) and np.allclose(whole[:32, :32], sim)
  # fewer key columns: the map's memory does not grow with S; identical maps stay identical
  few = analyze_trajectory(x, att, map_batch=1, map_columns=2).attention_similarity
  assert few.shape == (32, 32) and np.allclose(np.diag(few), 1.0)
  json.dumps(rep.to_dict(), allow_nan=False)


def test_jax_input_matches_numpy():
  x = contracting(3.0 * _rng().normal(size=(2, B, S, D)), 0.6, r=24).astype(np.float32)
  a = analyze_trajectory(jnp.asarray(x)).to_dict()
  b = analyze_trajectory(x).to_dict()
  _close(a, b)
  assert a["regime"] == "cyclic"


def test_thresholds_are_parameters():
  points = 3.0 * _rng().normal(size=(K, B, S, D))
  x = contracting(points, 0.7)
  assert analyze_trajectory(x, degenerate_cos=-1.0).regime == "degenerate"
  rep = analyze_trajectory(x, tau=0.1, rho=0.8, max_lag=4)
  assert (rep.thresholds["tau"], rep.thresholds["rho"], rep.thresholds["max_lag"]) == (0.1, 0.8, 4)
  with pytest.raises(ConfigError):
    analyze_trajectory(x, rho=1.5)
  with pytest.raises(TypeError):
    analyze_trajectory(x, not_a_threshold=1)


@pytest.mark.parametrize("states, attention, match", [
    (np.zeros((5, 2, 3, 4)), None, r"\[R, k, B, S, D\]"),
    (np.ones((2, 1, 1, 2, 3)), None, "R >= 3"),
    (np.ones((5, 2, 1, 4, 3)), np.ones((5, 2, 1, 2, 4, 3)), r"\[R, k, B, H, S, S\]"),
    (np.ones((5, 2, 1, 4, 3)), np.ones((5, 1, 1, 2, 4, 4)), r"\[R, k, B, H, S, S\]"),
])
def test_bad_input_one_line_error(states, attention, match):
  with pytest.raises(TrajectoryError, match=match) as err:
    analyze_trajectory(states, attention)
  assert "\n" not in str(err.value)


def test_bad_stream_one_line_error():
  x = np.ones((6, 2, 1, 4, 3))

  def ragged():
    yield x[:3], None
    yield np.ones((3, 2, 1, 5, 3)), None
  with pytest.raises(TrajectoryError, match="expected") as err:
    analyze_stream(ragged)
  assert "\n" not in str(err.value)
  calls = []

  def shrinking():
    calls.append(1)
    yield (x if len(calls) == 1 else x[:4]), None
  with pytest.raises(TrajectoryError, match="second pass"):
    analyze_stream(shrinking)
  with pytest.raises(TrajectoryError, match="R >= 3"):
    analyze_stream(lambda: iter([(x[:1], None), (x[1:2], None)]))
  with pytest.raises(TrajectoryError, match="pairs"):
    analyze_stream(lambda: iter([x]))


def test_report_fields():
  rep = analyze_trajectory(contracting(3.0 * _rng().normal(size=(1, B, S, D)), 0.5, r=12))
  assert isinstance(rep, FixedPointReport)
  assert rep.degeneracy_min_cosine == 1.0 and rep.block_size == 1 and rep.num_iterations == 12
  d = rep.to_dict()
  assert set(d) >= {"regime", "token_classes", "layers", "degeneracy_min_cosine", "thresholds", "series"}
  assert set(d["layers"][0]) >= {"converged", "converged_at", "final_change", "contraction_rate"}


def _one_token(kind, r=48, k=2, d=D, seed=11):
  """[r, k, 1, 1, d]: a contraction onto P_l from outside, the norm shrinking (X_{l,t} = P_l + c_l^t n_l
  with n_l mostly along P_l), or pre-norm linear growth whose direction settles
  (X_{l,t} = (t+1) u_l + c_l^t n_l, n_l ⟂ u_l)."""
  q = np.linalg.qr(_rng(seed).normal(size=(k, d, 2)))[0]
  c_k1 = np.array([[0.6], [0.75]])[:k]
  t = np.arange(r)[:, None, None]
  if kind == "linear_growth":
    x = (t + 1) * 3.0 * q[..., 0] + c_k1 ** t * q[..., 1]
  else:
    x = 3.0 * q[..., 0] + c_k1 ** t * (0.8 * q[..., 0] + 0.6 * q[..., 1])
  return x[:, :, None, None, :]


@pytest.mark.parametrize("kind", ["contracting", "linear_growth"])
def test_evaluator_and_halting_agree_on_one_trajectory(kind):
  """The evaluator's per-layer verdict and halting's per-token exit are one test: on one token, with
  halting's threshold eps (eps_rel = eps, eps_cos = eps^2 / 2), layer l is converged from index t_l
  (states[t] is iteration t + 1) and halting exits at iteration max_l t_l + 1, where the bound that
  binds says it should."""
  eps, x = 1e-3, _one_token(kind)
  r, k = x.shape[:2]
  # Independently: the turn of the direction, and for the contraction also the relative change,
  # falls below eps for good at index first_l (linear growth: rel ~ 1/t never does, its increments do).
  u = x / np.linalg.norm(x, axis=-1, keepdims=True)
  turn_Rk = np.linalg.norm(np.diff(u, axis=0), axis=-1)[..., 0, 0]
  rel_Rk = (np.linalg.norm(np.diff(x, axis=0), axis=-1) / np.linalg.norm(x[1:], axis=-1))[..., 0, 0]
  def first(ok_Rk):  # index from which ok holds for good, per layer
    return [1 + int(np.nonzero(~ok_Rk[:, l])[0].max()) + 1 for l in range(k)]
  first_k = first((turn_Rk < eps) & ((rel_Rk < eps) if kind == "contracting" else True))
  assert 5 <= max(first_k) <= r - 10 and first_k[0] != first_k[1]
  if kind == "linear_growth":
    assert (rel_Rk[-1] > 10 * eps).all()
  else:  # the relative change is the bound that binds
    assert first(turn_Rk < eps) < first_k

  rep = analyze_trajectory(x, eps_rel=eps, eps_cos=eps ** 2 / 2)
  assert [l.converged_at for l in rep.layers] == first_k

  m = SimpleNamespace(block_size=k)
  prev = initial_prev(m, "fixed_point", jnp.zeros((1, 1, x.shape[-1])))
  step = jax.jit(lambda outs, prev, first: criterion_step("fixed_point", None, None, None, outs, prev,
                                                          first, jnp.float32(eps)))
  exit_t = None
  for t in range(1, r + 1):
    meets, prev = step(jnp.asarray(x[t - 1], jnp.float32), prev, jnp.array([t == 1]))
    if exit_t is None and bool(meets[0, 0]):
      exit_t = t
  assert exit_t == max(first_k) + 1
