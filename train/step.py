"""Optimizer, loss, and the jitted train and eval steps (pure functions of a pytree train state).

The model is split once into a static graph definition and a pure-dict parameter tree; every step
merges them inside `jax.jit` (the functional NNX pattern), so no module is mutated under jit.
The train state is {"params", "opt_state", "step"}: exactly what a checkpoint holds.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from looped_models import LoopedTransformer
from train.tasks import accuracy_counts

TrainState = dict[str, Any]


def make_schedule(t: Any) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to lr * min_lr_ratio at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup,
      decay_steps=max(t.steps, t.warmup + 1), end_value=t.lr * t.min_lr_ratio)


def make_optimizer(t: Any) -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay to lr * min_lr_ratio, and global-norm clipping.
  Weight decay applies to matrices only (not norms or biases)."""
  schedule = make_schedule(t)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=t.weight_decay, mask=decay_mask))


def init_model(m: Any, seed: int) -> tuple[nnx.GraphDef, dict]:
  """The model's static graph and its parameters as a pure dict."""
  graphdef, state = nnx.split(LoopedTransformer(m, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def abstract_model(m: Any, seed: int) -> tuple[nnx.GraphDef, dict]:
  """The graph and the parameter shapes (jax.ShapeDtypeStruct), without computing any values."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LoopedTransformer(m, rngs=nnx.Rngs(seed))))
  return graphdef, nnx.to_pure_dict(state)


def abstract_train_state(m: Any, tx: optax.GradientTransformation, seed: int
                         ) -> tuple[nnx.GraphDef, TrainState]:
  """The graph and the shapes of the training state a checkpoint holds: params, optimiser state, step."""
  graphdef, params = abstract_model(m, seed)
  return graphdef, {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}


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


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, max_iters: int,
                    backprop_depth: int, seed: int) -> Callable:
  """step(state, batch, n_iters) -> (state, metrics). `n_iters` is traced: one compile for every r."""

  def train_step(state: TrainState, batch: dict, n_iters: jax.Array) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      out = model(batch["inputs"], n_iters, max_iters=max_iters, backprop_depth=backprop_depth, key=key)
      loss = masked_cross_entropy(out.logits_BSV, batch["targets"], batch["mask"])
      return loss, out.logits_BSV.argmax(-1)

    (loss, preds_BS), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    counts = accuracy_counts(preds_BS, batch["targets"], batch["mask"])
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/per_position": counts["pos_right"] / jnp.maximum(counts["pos_count"], 1),
               "train/exact_match": counts["seq_right"] / jnp.maximum(counts["seq_count"], 1),
               "train/recurrence": n_iters}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, *, max_iters: int, seed: int,
                   token_bytes=None) -> Callable:
  """eval(params, batch, n_iters) -> accuracy counts at n_iters iterations (one compile per shape).
  With `token_bytes` ([V] UTF-8 bytes per token id: text), also the summed loss in nats and the bytes
  of the counted targets, for bits per byte."""

  def eval_step(params: dict, batch: dict, n_iters: jax.Array) -> dict:
    model = nnx.merge(graphdef, params)
    out = model(batch["inputs"], n_iters, max_iters=max_iters, key=jax.random.key(seed))
    counts = accuracy_counts(out.logits_BSV.argmax(-1), batch["targets"], batch["mask"])
    counts["loss"] = masked_cross_entropy(out.logits_BSV, batch["targets"], batch["mask"])
    if token_bytes is not None:
      counts.update(text_counts(out.logits_BSV, batch["targets"], batch["mask"], token_bytes))
    return counts

  return eval_step
