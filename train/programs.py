"""The programs a training run executes, built once for the trainer and for ahead-of-time compiles.

  p = build(cfg, mesh)                       # cfg resolved; mesh of the devices the run uses
  p.train_step(state, batch, n_iters)        # jax.jit with the shardings, donation, micro-batching
  p.eval_step(params, batch)                 # one pass of max(train.eval_recurrences) iterations

`python -m train` runs them (train/trainer.py); `python -m train.aot` lowers the same objects for a
TPU topology and reads their memory, FLOPs and collectives (train/aot.py). Building checks that the
shapes shard evenly and that the state fits the devices, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from configs import recurrence
from looped_models import sharding
from rundir.config import check_grad_accum, is_text
from train.step import (TrainState, abstract_train_state, make_eval_step, make_optimizer,
                        make_schedule, make_train_step)


@dataclasses.dataclass
class Programs:
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState       # ShapeDtypeStructs carrying their shardings
  state_sharding: Any
  batch_sharding: NamedSharding
  max_iters: int
  train_step: Callable              # jitted: (state, batch, n_iters) -> (state, metrics)
  eval_step: Callable               # jitted: (params, batch) -> counts per eval recurrence

  def batch(self, batch_size: int, seq: int) -> dict:
    """The abstract batch of the programs' inputs ([batch_size, seq], sharded as the trainer's)."""
    shape = lambda dt: jax.ShapeDtypeStruct((batch_size, seq), dt, sharding=self.batch_sharding)
    return {"inputs": shape(np.int32), "targets": shape(np.int32), "mask": shape(np.float32)}


def build(cfg: Any, mesh: Mesh, token_bytes: np.ndarray | None = None, *,
          check_memory: bool = True) -> Programs:
  """The training and evaluation programs of `cfg` (resolved) on `mesh`; ConfigError (one line) for
  shapes that do not shard evenly or (`check_memory`: the devices are here) a state that cannot fit
  the devices. `token_bytes` ([V]: UTF-8 bytes of each token id; text runs): the evaluation also
  counts bits per byte."""
  t = cfg.train
  sharding.check_divisible(cfg.model, t.batch_size, mesh)
  sharding.check_divisible(cfg.model, t.eval_batch_size, mesh, "train.eval_batch_size")
  check_grad_accum(t, mesh.shape["data"] * mesh.shape["fsdp"])
  tx, schedule = make_optimizer(t), make_schedule(t)
  graphdef, abstract = abstract_train_state(cfg.model, tx, t.seed)
  state_sharding = sharding.tree_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
  if check_memory:
    sharding.check_fits(abstract, "the parameters and optimizer state")
  batch_sharding, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  max_iters = recurrence.max_recurrence(t)
  step_fn = make_train_step(graphdef, tx, max_iters=max_iters, backprop_depth=t.backprop_depth,
                            seed=t.seed, grad_accum=t.grad_accum)
  train_step = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, rep),
                       out_shardings=(state_sharding, rep), donate_argnums=(0,))
  eval_fn = make_eval_step(graphdef, recurrences=t.eval_recurrences, seed=t.seed,
                           token_bytes=token_bytes if is_text(cfg) else None)
  eval_step = jax.jit(eval_fn, in_shardings=(state_sharding["params"], batch_sharding),
                      out_shardings=rep)
  return Programs(graphdef, tx, schedule, abstract, state_sharding, batch_sharding, max_iters,
                  train_step, eval_step)
