"""Attention and stage metrics per (iteration, layer) (DESIGN §5).

Every metric takes attention maps `att_...BHSS` (rows sum to 1) with any leading dims and averages over
batch and heads, so one call serves one layer ([B,H,S,S]) or a whole block ([k,B,H,S,S]):
- `frobenius_change`: ||A_t - A_{t-1}||_F per head, mean over batch -> [..., H];
- `colsum_concentration`: C = 1 + (1/log S) sum_j c_j log c_j, c_j = (1/S) sum_i A_ij; 0 for uniform
  column mass, 1 for all mass in one column (S = 1 gives 1);
- `sink_rate`: share of (batch, head) maps with some column of mean attention c_j >= threshold;
- `mixing_score`: mean row entropy in nats (0 log 0 = 0).
`AttentionAccumulator` streams them one iteration at a time and keeps the maps of the first
`map_batch` sequences over the first `map_iterations` iterations (float32, unit-normalised, at most
`map_columns` evenly spaced key columns) for the (layer, iteration)^2 similarity map: at most
map_iterations*k*map_batch*H*rows*map_columns floats of host memory, whatever R and S
(`map_batch=0` turns it off). The maps may hold a subsample of the query rows (the evaluator sends
at most 128 for long sequences): column mass, sinks and mixing are then means over those rows.
"""

from __future__ import annotations

import numpy as np

_TINY = 1e-30


def _f64(att: np.ndarray) -> np.ndarray:
  return np.asarray(att, dtype=np.float64)


def frobenius_change(att_BHSS: np.ndarray, prev_BHSS: np.ndarray) -> np.ndarray:
  """||A - A_prev||_F per head, mean over batch: [..., B, H, S, S] -> [..., H]."""
  diff = _f64(att_BHSS) - _f64(prev_BHSS)
  return np.sqrt(np.sum(diff * diff, axis=(-2, -1))).mean(axis=-2)


def column_mass(att_BHSS: np.ndarray) -> np.ndarray:
  """c_j = (1/S) sum_i A_ij: [..., S, S] -> [..., S]."""
  return _f64(att_BHSS).mean(axis=-2)


def _xlogx(p: np.ndarray) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), np.where(np.isnan(p), np.nan, 0.0))


def colsum_concentration(att_BHSS: np.ndarray) -> np.ndarray | float:
  """ColSum concentration, mean over batch and heads: [..., B, H, S, S] -> [...]."""
  c_BHS = column_mass(att_BHSS)
  s = c_BHS.shape[-1]
  conc = np.ones(c_BHS.shape[:-1]) if s == 1 else 1.0 + _xlogx(c_BHS).sum(axis=-1) / np.log(s)
  return conc.mean(axis=(-2, -1))


def sink_rate(att_BHSS: np.ndarray, threshold: float = 0.3) -> np.ndarray | float:
  """Share of (batch, head) maps whose mean attention to a single column is >= threshold."""
  c_BHS = column_mass(att_BHSS)
  with np.errstate(invalid="ignore"):
    sink = (c_BHS.max(axis=-1) >= threshold).astype(np.float64)
  sink[np.isnan(c_BHS).any(axis=-1)] = np.nan
  return sink.mean(axis=(-2, -1))


def mixing_score(att_BHSS: np.ndarray) -> np.ndarray | float:
  """Mean row entropy (nats) over rows, heads and batch: [..., B, H, S, S] -> [...]."""
  entropy_BHS = -_xlogx(_f64(att_BHSS)).sum(axis=-1)
  return entropy_BHS.mean(axis=(-3, -2, -1))


def similarity_map(maps_NbF: np.ndarray) -> np.ndarray:
  """Cosine similarity between N flattened maps, mean over the b sequences: [N, b, F] -> [N, N]."""
  n, b, _ = maps_NbF.shape
  sim_NN = np.zeros((n, n))
  for i in range(b):
    u_NF = np.asarray(maps_NbF[:, i], dtype=np.float64)
    u_NF = u_NF / np.maximum(np.linalg.norm(u_NF, axis=-1, keepdims=True), _TINY)
    sim_NN += u_NF @ u_NF.T
  return sim_NN / max(b, 1)


class AttentionAccumulator:
  """Streams the attention metrics of one iteration at a time (maps [k, B, H, S, S])."""

  def __init__(self, sink_threshold: float = 0.3, map_batch: int = 2, map_iterations: int = 16,
               map_columns: int = 128):
    self.sink_threshold, self.map_batch = sink_threshold, map_batch
    self.map_iterations, self.map_columns = map_iterations, map_columns
    self._prev_kBHSS: np.ndarray | None = None
    self._series: dict[str, list[np.ndarray]] = {
        "attention_change": [], "colsum_concentration": [], "sink_rate": [], "mixing": []}
    self._maps: list[np.ndarray] = []

  def add(self, att_kBHSS: np.ndarray) -> None:
    """Adds the maps of the next iteration."""
    att = _f64(att_kBHSS)
    k, _, h = att.shape[:3]
    if self._prev_kBHSS is None:
      change_kH = np.full((k, h), np.nan)
    else:
      change_kH = frobenius_change(att, self._prev_kBHSS)
    self._series["attention_change"].append(change_kH)
    self._series["colsum_concentration"].append(np.asarray(colsum_concentration(att)))
    self._series["sink_rate"].append(np.asarray(sink_rate(att, self.sink_threshold)))
    self._series["mixing"].append(np.asarray(mixing_score(att)))
    if self.map_batch > 0 and len(self._maps) < self.map_iterations:
      cols = att.shape[-1]
      if cols > self.map_columns:  # evenly spaced key columns: the map's memory does not grow with S
        att = att[..., np.linspace(0, cols - 1, self.map_columns).round().astype(int)]
      m_kbF = att[:, :self.map_batch].reshape(k, min(self.map_batch, att.shape[1]), -1)
      m_kbF = m_kbF / np.maximum(np.linalg.norm(m_kbF, axis=-1, keepdims=True), _TINY)
      self._maps.append(m_kbF.astype(np.float32))
    self._prev_kBHSS = _f64(att_kBHSS)

  def result(self) -> dict[str, np.ndarray | None]:
    """Series [R, k] ([R, k, H] for the change) and the [(T*k), (T*k)] similarity map of the first
    T = min(R, map_iterations) iterations, rows (t, l)."""
    out: dict[str, np.ndarray | None] = {name: np.stack(v) for name, v in self._series.items()}
    if self._maps:
      maps_RkbF = np.stack(self._maps)
      r, k = maps_RkbF.shape[:2]
      out["attention_similarity"] = similarity_map(maps_RkbF.reshape(r * k, *maps_RkbF.shape[2:]))
    else:
      out["attention_similarity"] = None
    return out
