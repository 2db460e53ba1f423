"""Forward FLOPs of the model's pieces: the one formula that generation, halting and the benchmarks
(tokens/s, MFU) count with. Matmuls count 2 FLOPs per multiply-add; causal attention is counted as
the full S x S product XLA computes (the mask saves nothing)."""

from __future__ import annotations

from typing import NamedTuple

from looped_models.config import ModelSpec


def layer_flops(m: ModelSpec, keys: int) -> float:
  """Forward FLOPs per token of one transformer layer whose queries each see `keys` keys (the
  sequence length for a full masked S x S attention, the buffer length for cached decoding)."""
  d, f = m.d_model, m.d_ff
  return 2 * (4 * d * d + (3 if m.mlp == "swiglu" else 2) * d * f) + 4 * keys * d


class PassFlops(NamedTuple):
  """Forward FLOPs per token of the pieces of a pass (`layer_flops` with `keys` keys per query)."""
  prelude: float    # embedding excluded: the prelude layers
  iteration: float  # one block iteration: its k layers and the injection's projection
  decode: float     # the coda layers and the unembedding


def pass_flops(m: ModelSpec, keys: int) -> PassFlops:
  layer = layer_flops(m, keys)
  inject = 2 * 2 * m.d_model * m.d_model if m.injection in ("concat", "gate") else 0
  return PassFlops(m.n_prelude * layer, m.block_size * layer + inject,
                   m.n_coda * layer + 2 * m.d_model * m.vocab_size)
