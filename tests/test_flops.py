"""The one FLOPs formula (looped_models/flops.py): its pieces, the causal half of attention, training."""

from __future__ import annotations

import pytest

from configs.base import get_config
from looped_models.flops import causal_keys, forward_flops, layer_flops, pass_flops, train_flops


def reference_model(**overrides):
  """The model of bench/reference_speed.py: (2, 4⊗r, 2), d 256, swiglu 869, vocab 512, concat."""
  m = get_config().model
  m.update(d_model=256, n_heads=4, d_ff=869, mlp="swiglu", vocab_size=512, max_len=256,
           injection="concat", n_prelude=2, block_size=4, n_coda=2)
  m.update(overrides)
  return m


def test_forward_flops_at_the_reference_configuration():
  """Written out by hand: every matmul at 2 FLOPs per multiply-add, QKᵀ and AV over the causal half."""
  m, B, S, r, d, f, V = reference_model(), 8, 256, 8, 256, 869, 512
  layers = 2 + 2 + 4 * r
  dense = 2 * B * S * (layers * (4 * d * d + 3 * d * f) + r * 2 * d * d + d * V)
  attention = layers * 2 * 2 * B * (S * S / 2) * d
  assert forward_flops(m, B, S, r) == pytest.approx(dense + attention, rel=1e-12)
  assert forward_flops(m, B, S, r) == 151561175040.0  # the figure bench/RESULTS.md's rates divide
  assert train_flops(m, B, S, r) == 3 * forward_flops(m, B, S, r)


def test_causal_pass_counts_half_the_scores_and_decoding_the_whole_buffer():
  m, S = reference_model(), 256
  assert causal_keys(S) == S / 2
  full, causal = pass_flops(m, S), pass_flops(m, causal_keys(S))
  assert full.prelude - causal.prelude == m.n_prelude * 4 * (S / 2) * m.d_model
  assert layer_flops(m, S) - layer_flops(m, 0) == 4 * S * m.d_model  # QKᵀ and AV per query
  # Only the concat and gate injections have a projection; add and none cost nothing.
  assert (pass_flops(m, S).iteration - pass_flops(reference_model(injection="add"), S).iteration
          == 4 * m.d_model ** 2)


def test_loop_rows_and_a_decode_per_iteration():
  m, B, S = reference_model(mlp="gelu", d_ff=1024, injection="add"), 4, 32
  f = pass_flops(m, causal_keys(S))
  base = B * S * (f.prelude + f.decode)
  assert forward_flops(m, B, S, 0) == base
  assert forward_flops(m, B, S, 5, loop_rows=2) == base + 5 * 2 * S * f.iteration
  assert forward_flops(m, B, S, 5, decode_each=True) == base + 5 * B * S * (f.iteration + f.decode)
