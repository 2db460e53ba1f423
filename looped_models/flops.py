"""FLOPs of the model: the one formula that generation, halting and the benchmarks (tokens/s, MFU)
count with.

Matmuls count 2 FLOPs per multiply-add (projections, MLP, the injection's adapter, the unembedding);
the embedding lookup, norms and softmax count nothing. Attention counts 4·d FLOPs per query-key pair
(QKᵀ and AV), for the keys each query is counted against:
- a causal pass over S tokens counts S/2 keys per query (`causal_keys`): the causal half of the S × S
  scores, the work the model needs. The blocked CPU attention and cuDNN skip most of the masked half;
  XLA's dense path computes all of it, so its hardware FLOPs are higher than these model FLOPs.
- cached decoding counts the whole buffer of T slots per query (`pass_flops(m, T)`), since every slot
  is computed, occupied or not.
Training counts 3× the forward (the backward pass does twice the forward's matmuls) with every
iteration back-propagated; recomputation under `model.remat` is not counted (as MFU counts)."""

from __future__ import annotations

from typing import NamedTuple

from looped_models.config import ModelSpec


def layer_flops(m: ModelSpec, keys: float) -> float:
  """Forward FLOPs per token of one transformer layer whose queries each count `keys` keys."""
  d, f = m.d_model, m.d_ff
  return 2 * (4 * d * d + (3 if m.mlp == "swiglu" else 2) * d * f) + 4 * keys * d


class PassFlops(NamedTuple):
  """Forward FLOPs per token of the pieces of a pass (`layer_flops` with `keys` keys per query)."""
  prelude: float    # embedding excluded: the prelude layers
  iteration: float  # one block iteration: its k layers and the injection's projection
  decode: float     # the coda layers and the unembedding


def pass_flops(m: ModelSpec, keys: float) -> PassFlops:
  layer = layer_flops(m, keys)
  inject = 2 * 2 * m.d_model * m.d_model if m.injection in ("concat", "gate") else 0
  return PassFlops(m.n_prelude * layer, m.block_size * layer + inject,
                   m.n_coda * layer + 2 * m.d_model * m.vocab_size)


def causal_keys(seq: int) -> float:
  """Keys counted per query of a causal pass over `seq` tokens: half the score matrix."""
  return seq / 2


def forward_flops(m: ModelSpec, batch: int, seq: int, iterations: int, *,
                  loop_rows: int | None = None, decode_each: bool = False) -> float:
  """Forward FLOPs of causal passes over `batch` sequences of `seq` tokens: prelude and final decode of
  every sequence, and `iterations` block iterations over `loop_rows` of them (default: all), each
  followed by a decode when `decode_each` (a halting rule that reads every iteration's prediction)."""
  f = pass_flops(m, causal_keys(seq))
  loop_rows = batch if loop_rows is None else loop_rows
  per_iter = f.iteration + (f.decode if decode_each else 0)
  return float(batch * seq * (f.prelude + f.decode) + iterations * loop_rows * seq * per_iter)


def train_flops(m: ModelSpec, batch: int, seq: int, iterations: int) -> float:
  """FLOPs of one train step on `batch` sequences of `seq` tokens: 3× the forward's."""
  return 3 * forward_flops(m, batch, seq, iterations)
