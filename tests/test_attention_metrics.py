"""Tests for eval/attention_metrics.py on hand-made attention maps with known values."""

import numpy as np
import pytest

from eval.attention_metrics import (AttentionAccumulator, colsum_concentration, frobenius_change,
                                    mixing_score, similarity_map, sink_rate)

B, H, S = 2, 3, 8


def uniform():
  return np.full((B, H, S, S), 1.0 / S)


def sink_column():
  a = np.zeros((B, H, S, S))
  a[..., 0] = 1.0
  return a


def causal_uniform():
  a = np.tril(np.ones((S, S)))
  return np.broadcast_to(a / a.sum(-1, keepdims=True), (B, H, S, S))


def test_uniform_map():
  assert colsum_concentration(uniform()) == pytest.approx(0.0, abs=1e-12)
  assert sink_rate(uniform()) == 0.0
  assert mixing_score(uniform()) == pytest.approx(np.log(S))


def test_one_hot_sink_column():
  assert colsum_concentration(sink_column()) == pytest.approx(1.0)
  assert sink_rate(sink_column()) == 1.0
  assert mixing_score(sink_column()) == pytest.approx(0.0, abs=1e-12)


def test_causal_uniform_values():
  a = causal_uniform()
  c = np.array([sum(1.0 / (i + 1) for i in range(j, S)) / S for j in range(S)])
  assert colsum_concentration(a) == pytest.approx(1 + np.sum(c * np.log(c)) / np.log(S))
  assert sink_rate(a) == float(c.max() >= 0.3)
  assert mixing_score(a) == pytest.approx(np.mean([np.log(i + 1) for i in range(S)]))


def test_sink_rate_counts_heads():
  a = uniform().copy()
  a[0, 1] = sink_column()[0, 1]  # one of B*H = 6 maps is a sink
  assert sink_rate(a) == pytest.approx(1 / 6)
  assert sink_rate(a, threshold=0.1) == 1.0  # 1/8 >= 0.1: every map counts


def test_frobenius_change():
  assert np.array_equal(frobenius_change(uniform(), uniform()), np.zeros(H))
  diff = frobenius_change(sink_column(), uniform())
  expected = np.sqrt(S * ((1 - 1 / S) ** 2 + (S - 1) / S ** 2))
  assert diff.shape == (H,) and diff == pytest.approx(np.full(H, expected))


def test_leading_dims_vectorise():
  a_kBHSS = np.stack([uniform(), sink_column()])
  assert colsum_concentration(a_kBHSS) == pytest.approx([0.0, 1.0], abs=1e-12)
  assert sink_rate(a_kBHSS) == pytest.approx([0.0, 1.0])
  assert mixing_score(a_kBHSS) == pytest.approx([np.log(S), 0.0], abs=1e-12)
  assert frobenius_change(a_kBHSS, a_kBHSS).shape == (2, H)


def test_similarity_map_ordering():
  # Layer 0 always uniform, layer 1 always a sink: similarity 1 within a layer across iterations.
  acc = AttentionAccumulator(map_batch=2)
  r = 4
  for _ in range(r):
    acc.add(np.stack([uniform(), sink_column()]))
  out = acc.result()
  sim = out["attention_similarity"]
  assert sim.shape == (2 * r, 2 * r)
  layer = np.arange(2 * r) % 2  # iteration-major rows: (t, l) -> t * k + l
  same = layer[:, None] == layer[None, :]
  assert np.allclose(sim[same], 1.0)
  expected = (1 / S * S) / (np.sqrt(S * S / S ** 2) * np.sqrt(S))  # cos(uniform, sink column)
  assert np.allclose(sim[~same], expected)
  assert out["attention_change"].shape == (r, 2, H)
  assert np.isnan(out["attention_change"][0]).all() and np.allclose(out["attention_change"][1:], 0)


def test_similarity_map_off_and_direct():
  acc = AttentionAccumulator(map_batch=0)
  acc.add(np.stack([uniform()]))
  assert acc.result()["attention_similarity"] is None
  m = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
  assert similarity_map(m) == pytest.approx(np.array(
      [[1, 0, 2 ** -0.5], [0, 1, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1]]))
