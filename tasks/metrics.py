"""What a prediction scores: accuracy counts (exact match per sequence, per position) and text loss
counts (nats, bytes: bits per byte), written with array methods so that they run under `jax.jit`
(on a sharded batch) as on numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def accuracy_counts(preds_BS, targets_BS, mask_BS) -> dict:
  """Counts behind `accuracy`, written with array methods only so that it also runs inside `jax.jit`
  (where the batch may be sharded over devices and hosts): right and counted sequences and positions."""
  on_BS = mask_BS > 0
  wrong_BS = (preds_BS != targets_BS) & on_BS
  counted_B = on_BS.any(axis=-1)
  return {"seq_right": (~wrong_BS.any(axis=-1) & counted_B).sum(), "seq_count": counted_B.sum(),
          "pos_right": (on_BS & ~wrong_BS).sum(), "pos_count": on_BS.sum()}


def fractions(counts: dict) -> dict[str, float]:
  """{"exact_match", "per_position"} from `accuracy_counts` (0.0 where nothing was counted)."""
  n_seq, n_pos = int(counts["seq_count"]), int(counts["pos_count"])
  return {"exact_match": float(counts["seq_right"]) / n_seq if n_seq else 0.0,
          "per_position": float(counts["pos_right"]) / n_pos if n_pos else 0.0}


def accuracy(preds_BS: np.ndarray, targets_BS: np.ndarray, mask_BS: np.ndarray) -> dict[str, float]:
  """{"exact_match": share of sequences (with a non-empty mask) right at every masked position,
  "per_position": share of masked positions that are right}. Accepts numpy or jax arrays."""
  return fractions(accuracy_counts(np.asarray(preds_BS), np.asarray(targets_BS), np.asarray(mask_BS)))


def masked_cross_entropy(logits_BSV: jax.Array, targets_BS: jax.Array, mask_BS: jax.Array) -> jax.Array:
  ce_BS = optax.softmax_cross_entropy_with_integer_labels(logits_BSV, targets_BS)
  return (ce_BS * mask_BS).sum() / jnp.maximum(mask_BS.sum(), 1.0)


def text_counts(logits_BSV: jax.Array, targets_BS: jax.Array, mask_BS: jax.Array, token_bytes
                ) -> dict[str, jax.Array]:
  """Summed next-token loss (nats) and the UTF-8 bytes of the counted targets: bits per byte is
  nats / bytes / ln 2, comparable across tokenizers."""
  ce_BS = optax.softmax_cross_entropy_with_integer_labels(logits_BSV, targets_BS)
  bytes_BS = jnp.asarray(token_bytes, jnp.float32)[targets_BS]
  return {"nats": (ce_BS * mask_BS).sum(), "bytes": (bytes_BS * mask_BS).sum()}
