"""Fixed-point analysis of a looped block's trajectory (DESIGN §5), streamed over iterations.

Input: X_{l,t} = states[t, l] ([B, S, D]) for iterations t = 0..R-1 (R >= 3) and block layers
l = 0..k-1, optionally attention[t, l] ([B, H, S, S]). `analyze_stream` reads the trajectory twice
from a replayable chunk source and never holds more than O(k*B*S*D) states (plus a ring of the last
`max_lag` last-layer states); `analyze_trajectory` feeds it slices of in-memory arrays. Each call
of `chunks()` must replay the same trajectory; statistics are computed in float64. Bad shapes, R < 3
raise TrajectoryError, bad thresholds ConfigError (one line each); non-finite states give `divergent`.

Series (numpy, [R, k]; entry t = 0 of the successive series is NaN, there being no X_{-1}):
- successive_change: mean over tokens of ||X_t - X_{t-1}|| / ||X_t|| (norms over D); _max: the max;
- successive_cos: mean of 1 - cos(X_t, X_{t-1});
- distance_to_fixed / distance_cos: the same against X*_l := X_{l,R-1};
- norm_growth: mean of (||X_t|| - ||X_{t-1}||) / ||X_t|| (the radial, outward part of the change);
- residual_norm: mean token norm; with attention the metrics of `eval.attention_metrics`.
Per layer: contraction_rate = exp(slope) of a least-squares line of log(successive_change) vs t over
t = rate_skip.. up to the first change <= rate_floor (or non-finite); None with fewer than 3 points.
A layer is converged at t when, for every t' >= t, its series pass the fixed-point test of
`looped_models.fixed_point` (the one halting uses per token): successive_cos < eps_cos and either
successive_change < eps_rel or the norm grows at most ~linearly while the direction settles, as in a
pre-norm block: successive_change * (t'+1) < linear_slack (the test's linear-growth residual over a
tail) with at least half of it outward growth (norm_growth >= successive_change / 2).
converged_at = the first such t, and only if at least `min_stable` iterations satisfy it. degeneracy_min_cosine = min_l mean cos(X*_0, X*_l) (1 for k=1).
Token classes at the last block layer over the tail t >= R - L, L = max(3, ceil(tail_frac*R)):
- fixed_point: 1 - cos(X_t, X_{R-1}) <= tau for a share >= rho of the tail;
- orbit: not fixed; at some lag 2 <= p <= max_lag, 1 - cos(X_t, X_{t-p}) <= tau for a share >= rho
  of the tail t with t >= p, and 1 - cos(X_t, X_{t-1}) > tau for more than half of them (a slow
  drift is not a return);
- slider: neither; cos(X_t - X_{t-1}, X_{t-1} - X_{t-2}) > 0 for a share >= rho of the tail;
- unknown: the rest (also tokens with non-finite values).
Regime, first match: divergent (non-finite states, or the final mean norm > diverge_ratio x the first
while the norm over the second half grows more than twice as fast as linear growth from zero would
allow); cyclic (every layer converged, degeneracy < degenerate_cos); degenerate (every layer
converged); orbit (orbit fraction >= regime_frac); slider (slider fraction >= regime_frac);
unconverged (the rest, including mostly-fixed tokens with a layer short of the per-layer criterion).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from configs.errors import ConfigError
from eval.attention_metrics import AttentionAccumulator
from looped_models.fixed_point import settled

TOKEN_CLASSES = ("fixed_point", "orbit", "slider", "unknown")
REGIMES = ("cyclic", "degenerate", "orbit", "slider", "divergent", "unconverged")
DEFAULT_THRESHOLDS: dict[str, Any] = dict(
    tau=0.05, rho=0.9, eps_cos=1e-4, eps_rel=1e-3, linear_slack=1.5, min_stable=3, tail_frac=0.25,
    max_lag=8, degenerate_cos=0.99, diverge_ratio=1e3, regime_frac=0.5, rate_floor=1e-6,
    rate_skip=2, sink_threshold=0.3, map_batch=2, map_iterations=16, map_columns=128)
_TINY = 1e-30
Chunks = Callable[[], Iterable[tuple[Any, Any]]]


class TrajectoryError(ValueError):
  """A trajectory that cannot be analysed; `str(err)` is one line."""


@dataclasses.dataclass
class LayerReport:
  layer: int
  converged: bool
  converged_at: int | None
  final_change: float
  final_cos_change: float
  contraction_rate: float | None


@dataclasses.dataclass
class FixedPointReport:
  regime: str
  token_classes: dict[str, float]
  layers: list[LayerReport]
  degeneracy_min_cosine: float
  thresholds: dict[str, Any]
  num_iterations: int
  block_size: int
  divergent_reason: str | None
  successive_change: np.ndarray
  successive_change_max: np.ndarray
  successive_cos: np.ndarray
  norm_growth: np.ndarray
  distance_to_fixed: np.ndarray
  distance_cos: np.ndarray
  residual_norm: np.ndarray
  attention_change: np.ndarray | None = None
  colsum_concentration: np.ndarray | None = None
  sink_rate: np.ndarray | None = None
  mixing: np.ndarray | None = None
  attention_similarity: np.ndarray | None = None

  SERIES = ("successive_change", "successive_change_max", "successive_cos", "norm_growth",
            "distance_to_fixed",
            "distance_cos", "residual_norm", "attention_change", "colsum_concentration",
            "sink_rate", "mixing", "attention_similarity")

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable (also with allow_nan=False): series as nested lists, NaN/inf as None."""
    return _clean({
        "regime": self.regime, "divergent_reason": self.divergent_reason,
        "token_classes": self.token_classes, "degeneracy_min_cosine": self.degeneracy_min_cosine,
        "num_iterations": self.num_iterations, "block_size": self.block_size,
        "thresholds": self.thresholds, "layers": [dataclasses.asdict(l) for l in self.layers],
        "series": {name: getattr(self, name) for name in self.SERIES}})


def _clean(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return _clean(x.tolist())
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def _check_thresholds(th: dict[str, Any]) -> None:
  def need(name: str, ok: bool, what: str) -> None:
    if not ok:
      raise ConfigError(name, th[name], reason=f"must be {what}")
  for name in ("tau", "eps_cos", "eps_rel", "linear_slack", "rate_floor", "diverge_ratio"):
    need(name, th[name] > 0, "> 0")
  for name in ("rho", "tail_frac", "regime_frac", "sink_threshold"):
    need(name, 0 < th[name] <= 1, "in (0, 1]")
  need("degenerate_cos", -1 <= th["degenerate_cos"] <= 1, "in [-1, 1]")
  for name, lo in (("max_lag", 2), ("min_stable", 1), ("rate_skip", 1), ("map_batch", 0),
                   ("map_iterations", 1), ("map_columns", 1)):
    need(name, isinstance(th[name], (int, np.integer)) and th[name] >= lo, f"an int >= {lo}")


# ---------------------------------------------------------------------------------------- helpers
def _norm(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.sum(x * x, axis=-1))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.sum(a * b, axis=-1) / np.maximum(_norm(a) * _norm(b), _TINY)


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(n) for n in np.shape(x))


def _bad_attention(shp: tuple[int, ...], ashp: tuple[int, ...]) -> bool:
  return len(ashp) != 6 or ashp[:3] != shp[:3] or ashp[4:] != (shp[3], shp[3])


def _attention_message(shp: tuple[int, ...], ashp: tuple[int, ...]) -> str:
  r, k, b, s = shp[:4]
  return (f"attention must have shape [R, k, B, H, S, S] = [{r}, {k}, {b}, H, {s}, {s}] to match the "
          f"states, got shape {ashp}")


def _iterations(chunks: Chunks, want: dict[str, Any]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
  """Yields (X_kBSD float64, A_kBHSS float64 or None) per iteration, checking every chunk's shape."""
  for pair in chunks():
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise TrajectoryError("chunks() must yield pairs (states [t, k, B, S, D], attention or None)")
    states, att = pair
    shp = _shape(states)
    if len(shp) != 5:
      raise TrajectoryError(f"states must have shape [R, k, B, S, D], got shape {shp}")
    if want.get("kBSD", shp[1:]) != shp[1:]:
      expected = ", ".join(map(str, want["kBSD"]))
      raise TrajectoryError(f"states chunk has shape {shp}, expected [t, {expected}]")
    want["kBSD"] = shp[1:]
    if want.setdefault("att", att is not None) != (att is not None):
      raise TrajectoryError("attention must be given for every chunk or for none")
    if att is not None:
      ashp = _shape(att)
      if _bad_attention(shp, ashp) or want.setdefault("H", ashp[3]) != ashp[3]:
        raise TrajectoryError(_attention_message(shp, ashp))
    x_tkBSD = np.asarray(states, dtype=np.float64)
    a_tkBHSS = None if att is None else np.asarray(att, dtype=np.float64)
    for i in range(shp[0]):
      yield x_tkBSD[i], None if a_tkBHSS is None else a_tkBHSS[i]


def _contraction_rate(change_R: np.ndarray, floor: float, skip: int) -> float | None:
  ts = []
  for t in range(max(1, skip), len(change_R)):
    if not (np.isfinite(change_R[t]) and change_R[t] > floor):
      break
    ts.append(t)
  if len(ts) < 3:
    return None
  slope = np.polyfit(np.asarray(ts, float), np.log(change_R[ts]), 1)[0]
  return float(np.exp(slope))


def _converged_at(rel_R: np.ndarray, cos_R: np.ndarray, growth_R: np.ndarray,
                  th: dict[str, Any]) -> int | None:
  t_R = np.arange(len(rel_R))
  with np.errstate(invalid="ignore"):
    ok = settled(rel_R, cos_R, growth_R, rel_R * (t_R + 1), eps_rel=th["eps_rel"],
                 eps_cos=th["eps_cos"], eps_linear=th["linear_slack"])
  ok[0] = False
  start = int(np.nonzero(~ok)[0].max()) + 1
  return start if len(ok) - start >= th["min_stable"] else None


def _divergence(finite: bool, norm_R: np.ndarray, ratio: float) -> str | None:
  if not finite:
    return "non-finite values in the states"
  r, m = len(norm_R), len(norm_R) // 2
  with np.errstate(divide="ignore", invalid="ignore"):
    growth = norm_R[-1] / norm_R[0]
    half = norm_R[-1] / norm_R[m]
  if growth > ratio and half > 2.0 * r / (m + 1):
    return f"norms grow geometrically (x{growth:.3g} over {r} iterations)"
  return None


class _TailCounter:
  """Per-token counts over the tail at the last block layer (pass 2), from a ring of past states."""

  def __init__(self, tail_start: int, th: dict[str, Any]):
    self.tail_start, self.th = tail_start, th
    self.ring: collections.deque[np.ndarray] = collections.deque(maxlen=max(th["max_lag"], 2))
    self.n_tail, self.fixed, self.move, self.slide = 0, 0, 0, 0
    self.n_move, self.n_slide = 0, 0
    self.ret = {p: 0 for p in range(2, th["max_lag"] + 1)}
    self.n_ret = dict.fromkeys(self.ret, 0)

  def add(self, t: int, x_BSD: np.ndarray, final_BSD: np.ndarray) -> None:
    tau = self.th["tau"]
    if t >= self.tail_start:
      with np.errstate(invalid="ignore"):
        self.n_tail += 1
        self.fixed = self.fixed + (1 - _cos(x_BSD, final_BSD) <= tau)
        if len(self.ring) >= 1:
          self.n_move += 1
          self.move = self.move + (1 - _cos(x_BSD, self.ring[-1]) > tau)
        if len(self.ring) >= 2:
          self.n_slide += 1
          self.slide = self.slide + (_cos(x_BSD - self.ring[-1], self.ring[-1] - self.ring[-2]) > 0)
        for p in self.ret:
          if len(self.ring) >= p:
            self.n_ret[p] += 1
            self.ret[p] = self.ret[p] + (1 - _cos(x_BSD, self.ring[-p]) <= tau)
    if t >= self.tail_start - self.ring.maxlen:
      self.ring.append(x_BSD.copy())  # a copy: a view would keep its whole chunk alive

  def classes(self, shape_BS: tuple[int, ...]) -> dict[str, float]:
    rho, eps = self.th["rho"], 1e-9
    share = lambda count, n: np.asarray(count, float) / n if n else np.zeros(shape_BS)
    fixed = share(self.fixed, self.n_tail) >= rho - eps
    returns = np.zeros(shape_BS, bool)
    for p in self.ret:
      returns |= share(self.ret[p], self.n_ret[p]) >= rho - eps
    orbit = ~fixed & returns & (share(self.move, self.n_move) > 0.5)
    slider = ~fixed & ~orbit & (share(self.slide, self.n_slide) >= rho - eps)
    unknown = ~(fixed | orbit | slider)
    n = float(np.prod(shape_BS))
    return {name: float(mask.sum() / n) for name, mask in zip(TOKEN_CLASSES, (fixed, orbit, slider, unknown))}


def _first_pass(chunks: Chunks, want: dict[str, Any], th: dict[str, Any]
                ) -> tuple[dict[str, list], bool, np.ndarray, dict[str, Any]]:
  """Pass 1: successive changes and norms per (iteration, layer), whether all states are finite,
  the final states [k, B, S, D] and the attention metrics ({} without attention)."""
  series: dict[str, list] = {n: [] for n in ("rel", "rel_max", "cos_change", "growth", "norms")}
  rel, rel_max, cos_change, growth, norms = series.values()
  acc = AttentionAccumulator(th["sink_threshold"], th["map_batch"], th["map_iterations"],
                             th["map_columns"])
  prev_kBSD, prev_nrm_kBS, finite, has_att = None, None, True, False
  with np.errstate(all="ignore"):
    for x_kBSD, a_kBHSS in _iterations(chunks, want):
      nrm_kBS = _norm(x_kBSD)
      norms.append(nrm_kBS.mean(axis=(1, 2)))
      finite = finite and bool(np.isfinite(x_kBSD).all())
      if prev_kBSD is None:
        nan_k = np.full(x_kBSD.shape[0], np.nan)
        rel.append(nan_k), rel_max.append(nan_k), cos_change.append(nan_k), growth.append(nan_k)
      else:
        d_kBS = _norm(x_kBSD - prev_kBSD) / np.maximum(nrm_kBS, _TINY)
        rel.append(d_kBS.mean(axis=(1, 2))), rel_max.append(d_kBS.max(axis=(1, 2)))
        cos_change.append((1 - _cos(x_kBSD, prev_kBSD)).mean(axis=(1, 2)))
        growth.append(((nrm_kBS - prev_nrm_kBS) / np.maximum(nrm_kBS, _TINY)).mean(axis=(1, 2)))
      if a_kBHSS is not None:
        has_att = True
        acc.add(a_kBHSS)
      prev_kBSD, prev_nrm_kBS = x_kBSD, nrm_kBS
  if len(norms) < 3:
    raise TrajectoryError(f"a trajectory needs R >= 3 iterations, got R={len(norms)}")
  return series, finite, prev_kBSD.copy(), acc.result() if has_att else {}


def _regime(reason: str | None, layers: list[LayerReport], degeneracy: float,
            classes: dict[str, float], th: dict[str, Any]) -> str:
  if reason:
    return "divergent"
  if all(l.converged for l in layers):
    return "cyclic" if degeneracy < th["degenerate_cos"] else "degenerate"
  for name in ("orbit", "slider"):
    if classes[name] >= th["regime_frac"]:
      return name
  return "unconverged"


# --------------------------------------------------------------------------------------- analysis
def analyze_stream(chunks: Chunks, *, tau: float = 0.05, rho: float = 0.9, eps_cos: float = 1e-4,
                   eps_rel: float = 1e-3, linear_slack: float = 1.5, min_stable: int = 3,
                   tail_frac: float = 0.25, max_lag: int = 8, degenerate_cos: float = 0.99,
                   diverge_ratio: float = 1e3, regime_frac: float = 0.5, rate_floor: float = 1e-6,
                   rate_skip: int = 2, sink_threshold: float = 0.3, map_batch: int = 2,
                   map_iterations: int = 16, map_columns: int = 128) -> FixedPointReport:
  """Analyses a trajectory read (twice) from `chunks()`, which yields, in iteration order, pairs
  (states [t, k, B, S, D], attention [t, k, B, H, S, S] or None) of consecutive iterations; the
  attention may hold a subsample of the query rows ([t, k, B, H, s, S], as the evaluator's capture
  sends for long sequences). The (layer, iteration)^2 attention similarity map covers the first
  `map_iterations` iterations of `map_batch` sequences, on at most `map_columns` key columns, so its
  memory depends on neither R nor S^2."""
  th = dict(tau=tau, rho=rho, eps_cos=eps_cos, eps_rel=eps_rel, linear_slack=linear_slack,
            min_stable=min_stable, tail_frac=tail_frac, max_lag=max_lag,
            degenerate_cos=degenerate_cos, diverge_ratio=diverge_ratio, regime_frac=regime_frac,
            rate_floor=rate_floor, rate_skip=rate_skip, sink_threshold=sink_threshold,
            map_batch=map_batch, map_iterations=map_iterations, map_columns=map_columns)
  _check_thresholds(th)
  want: dict[str, Any] = {}
  series, finite, final_kBSD, att = _first_pass(chunks, want, th)
  r = len(series["norms"])
  k, b, s = final_kBSD.shape[:3]
  # Pass 2: distances to X* and the tail classification of the last block layer.
  tail_len = min(r, max(3, math.ceil(tail_frac * r)))
  tail = _TailCounter(r - tail_len, th)
  dist, dist_cos = [], []
  t = -1
  with np.errstate(all="ignore"):
    fin_norm_kBS = np.maximum(_norm(final_kBSD), _TINY)
    for t, (x_kBSD, _) in enumerate(_iterations(chunks, want)):
      if t >= r:
        break
      dist.append((_norm(x_kBSD - final_kBSD) / fin_norm_kBS).mean(axis=(1, 2)))
      dist_cos.append((1 - _cos(x_kBSD, final_kBSD)).mean(axis=(1, 2)))
      tail.add(t, x_kBSD[-1], final_kBSD[-1])
  if t + 1 != r:
    raise TrajectoryError(f"chunks() replayed a different trajectory on the second pass (R={r} first)")

  rel_Rk, rel_max_Rk, cos_Rk, growth_Rk, norm_Rk = (np.stack(v) for v in series.values())
  layers = []
  for l in range(k):
    at = _converged_at(rel_Rk[:, l], cos_Rk[:, l], growth_Rk[:, l], th)
    layers.append(LayerReport(layer=l, converged=at is not None, converged_at=at,
                              final_change=float(rel_Rk[-1, l]), final_cos_change=float(cos_Rk[-1, l]),
                              contraction_rate=_contraction_rate(rel_Rk[:, l], rate_floor, rate_skip)))
  with np.errstate(all="ignore"):
    degeneracy = min(float(_cos(final_kBSD[0], final_kBSD[l]).mean()) for l in range(k)) if k > 1 else 1.0
  classes = tail.classes((b, s))
  reason = _divergence(finite, norm_Rk.mean(axis=1), diverge_ratio)
  regime = _regime(reason, layers, degeneracy, classes, th)
  return FixedPointReport(
      regime=regime, token_classes=classes, layers=layers, degeneracy_min_cosine=degeneracy,
      thresholds=th, num_iterations=r, block_size=k, divergent_reason=reason,
      successive_change=rel_Rk, successive_change_max=rel_max_Rk, successive_cos=cos_Rk,
      norm_growth=growth_Rk, distance_to_fixed=np.stack(dist), distance_cos=np.stack(dist_cos),
      residual_norm=norm_Rk,
      **{name: att.get(name) for name in ("attention_change", "colsum_concentration", "sink_rate",
                                          "mixing", "attention_similarity")})


def analyze_trajectory(states: Any, attention: Any = None, *, tau: float = 0.05, rho: float = 0.9,
                       chunk_size: int = 16, **thresholds: Any) -> FixedPointReport:
  """Analyses in-memory states [R, k, B, S, D] (numpy or jax) and optional attention
  [R, k, B, H, S, S] by streaming slices of `chunk_size` iterations through `analyze_stream`."""
  if not hasattr(states, "shape"):
    states = np.asarray(states)
  if attention is not None and not hasattr(attention, "shape"):
    attention = np.asarray(attention)
  shp = _shape(states)
  if len(shp) != 5:
    raise TrajectoryError(f"states must have shape [R, k, B, S, D], got shape {shp}")
  if shp[0] < 3:
    raise TrajectoryError(f"a trajectory needs R >= 3 iterations, got R={shp[0]}")
  if attention is not None:
    ashp = _shape(attention)
    if _bad_attention(shp, ashp):
      raise TrajectoryError(_attention_message(shp, ashp))
  step = max(1, int(chunk_size))

  def chunks() -> Iterator[tuple[Any, Any]]:
    for i in range(0, shp[0], step):
      yield states[i:i + step], None if attention is None else attention[i:i + step]

  return analyze_stream(chunks, tau=tau, rho=rho, **thresholds)
