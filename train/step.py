"""Optimizer, loss, and the jitted train and eval steps (pure functions of a pytree train state).

The model is split once into a static graph definition and a pure-dict parameter tree; every step
merges them inside `jax.jit` (the functional NNX pattern), so no module is mutated under jit.
The train state is {"params", "opt_state", "step"}: exactly what a checkpoint holds.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs.errors import check_choice
from looped_models import stepper
from looped_models.model import abstract_model
from looped_models.sharding import path_str
from rundir.config import SCHEDULES
from tasks.metrics import accuracy_counts, masked_cross_entropy, text_counts

TrainState = dict[str, Any]


def make_schedule(t: Any) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup` steps, then `constant`; `cosine` decay to
  lr * min_lr_ratio at `steps`; or `wsd` (warmup-stable-decay): `lr` until the last
  decay_fraction * steps steps, which decay linearly to lr * min_lr_ratio."""
  check_choice("train.schedule", t.schedule, SCHEDULES)
  end = t.lr * t.min_lr_ratio
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup,
        decay_steps=max(t.steps, t.warmup + 1), end_value=end)
  warmup = optax.linear_schedule(0.0, t.lr, max(t.warmup, 1))
  if t.schedule == "constant":
    return optax.join_schedules([warmup, optax.constant_schedule(t.lr)], [t.warmup])
  decay_steps = max(round(t.decay_fraction * t.steps), 1)
  decay_start = max(t.steps - decay_steps, t.warmup)
  return optax.join_schedules(
      [warmup, optax.constant_schedule(t.lr), optax.linear_schedule(t.lr, end, decay_steps)],
      [t.warmup, decay_start])


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
  """True for the parameters weight decay applies to: matrices, except those with a path component
  in `no_decay` (by default the embeddings). Vectors (norm scales, biases) are never decayed."""
  def one(path, x):
    names = set(path_str(path).split("/"))
    return x.ndim >= 2 and not names & set(no_decay)
  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(t: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (betas b1, b2, epsilon eps) on `make_schedule`, with weight
  decay on `decay_mask`."""
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=lambda params: decay_mask(params, tuple(t.no_decay))))


def abstract_train_state(m: Any, tx: optax.GradientTransformation, seed: int
                         ) -> tuple[nnx.GraphDef, TrainState]:
  """The graph and the shapes of the training state a checkpoint holds: params, optimiser state, step."""
  graphdef, params = abstract_model(m, seed)
  return graphdef, {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, max_iters: int,
                    backprop_depth: int, seed: int, grad_accum: int = 1) -> Callable:
  """step(state, batch, n_iters) -> (state, metrics). `n_iters` is traced: one compile for every r.

  With `grad_accum` A > 1 the batch is split into A micro-batches (micro-batch i holds rows i, i+A,
  ..., so each device's share splits evenly) whose gradients are summed in a scan: the loss is
  normalised by the whole batch's token count, so the update is the unaccumulated one."""

  def micro_grads(params, micro: dict, n_iters, key, n_tokens):
    """(loss share, accuracy counts), gradient of one micro-batch."""
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      out = model(micro["inputs"], n_iters, max_iters=max_iters, backprop_depth=backprop_depth,
                  differentiated=True, key=key)
      ce_BS = optax.softmax_cross_entropy_with_integer_labels(out.logits_BSV, micro["targets"])
      loss = (ce_BS * micro["mask"]).sum() / n_tokens
      return loss, accuracy_counts(out.logits_BSV.argmax(-1), micro["targets"], micro["mask"])
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def train_step(state: TrainState, batch: dict, n_iters: jax.Array) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    n_tokens = jnp.maximum(batch["mask"].sum(), 1.0)
    if grad_accum == 1:
      (loss, counts), grads = micro_grads(state["params"], batch, n_iters, key, n_tokens)
    else:
      split = lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
      micros = jax.tree.map(split, batch)

      def add(total, xs):
        micro, i = xs
        out = micro_grads(state["params"], micro, n_iters, jax.random.fold_in(key, i), n_tokens)
        return jax.tree.map(jnp.add, total, out), None

      first = jax.tree.map(lambda x: x[0], micros)
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
          micro_grads, state["params"], first, n_iters, key, n_tokens))
      ((loss, counts), grads), _ = jax.lax.scan(add, zeros, (micros, jnp.arange(grad_accum)))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/per_position": counts["pos_right"] / jnp.maximum(counts["pos_count"], 1),
               "train/exact_match": counts["seq_right"] / jnp.maximum(counts["seq_count"], 1),
               "train/recurrence": n_iters}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, *, recurrences: Sequence[int], seed: int,
                   token_bytes=None) -> Callable:
  """eval(params, batch) -> accuracy counts and mean loss at each of `recurrences` iterations, every
  count stacked over them in their order ([len(recurrences)]): one pass of max(recurrences)
  iterations of `looped_models.stepper`, read at each (one compile per batch shape). With
  `token_bytes` ([V] UTF-8 bytes per token id: text), also the summed loss in nats and the bytes of
  the counted targets, for bits per byte."""
  R, index = max(recurrences), np.array([r - 1 for r in recurrences])

  def read(model, s_BSD, ctx, batch):
    logits_BSV = model.decode(s_BSD, ctx)
    counts = accuracy_counts(logits_BSV.argmax(-1), batch["targets"], batch["mask"])
    counts["loss"] = masked_cross_entropy(logits_BSV, batch["targets"], batch["mask"])
    if token_bytes is not None:
      counts.update(text_counts(logits_BSV, batch["targets"], batch["mask"], token_bytes))
    return counts

  def eval_step(params: dict, batch: dict) -> dict:
    model = nnx.merge(graphdef, params)
    out = stepper.trace(model, batch["inputs"], R, read, batch, key=jax.random.key(seed),
                        at=stepper.read_mask(R, recurrences))
    return jax.tree.map(lambda x: x[index], out.reads)

  return eval_step
