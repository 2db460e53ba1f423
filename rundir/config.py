"""Resolve the derived values of a trial config and check every key before anything is built."""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import recurrence
from configs.base import get_config
from configs.errors import ConfigError, check_choice, check_int
from looped_models import validate_model_config
from rundir import distributed
from rundir.logger import WANDB_MODES
from tasks.synthetic import task_of

SCHEDULES = ("constant", "cosine", "wsd")


def resolve(cfg: ml_collections.ConfigDict, task: Any = None) -> ml_collections.ConfigDict:
  """A validated copy of `cfg` with the derived values filled in (vocab size from the task,
  the minimum training length, the evaluation iteration counts). `task`: the config's task when it
  is made otherwise (a text task over a stand-in corpus, for ahead-of-time compiles)."""
  cfg = with_defaults(cfg.to_dict())
  task = task or task_of(cfg)
  t, m = cfg.train, cfg.model
  if not m.vocab_size:
    m.vocab_size = task.vocab_size
  if not cfg.task.min_train_length:
    cfg.task.min_train_length = cfg.task.train_length
  recurrence.validate(t)
  if not t.eval_recurrences:
    t.eval_recurrences = default_eval_recurrences(cfg)
  validate(cfg, task)
  return cfg


def with_defaults(values: dict) -> ml_collections.ConfigDict:
  """`values` (a config as a dict, e.g. a stored config.json) over configs/base.py's defaults: keys
  added to the framework since the config was written take their defaults."""
  cfg = get_config()

  def merge(node, values: dict) -> None:
    for key, value in values.items():
      if isinstance(value, dict) and key in node:
        merge(node[key], value)
      else:
        node[key] = value

  merge(cfg, values)
  return cfg


def is_text(cfg: Any) -> bool:
  return cfg.task.name == "text"


def default_eval_recurrences(cfg: Any) -> tuple[int, ...]:
  """Synthetic tasks: (r, 2r, 4r) of the mean training recurrence. Text: 1, 2, 4, ... up to 4x the
  training maximum (how Huginn's authors monitor a looped language model)."""
  if is_text(cfg):
    top = 4 * recurrence.max_recurrence(cfg.train)
    return tuple(2 ** i for i in range(top.bit_length()) if 2 ** i <= top)
  r = cfg.train.mean_recurrence
  return (r, 2 * r, 4 * r)


def validate(cfg: ml_collections.ConfigDict, task: Any = None) -> None:
  task = task or task_of(cfg)
  validate_model_config(cfg.model)
  m, t = cfg.model, cfg.train
  if is_text(cfg):
    if m.vocab_size < task.vocab_size:
      raise ConfigError("model.vocab_size", m.vocab_size, reason=f"the corpus {cfg.task.path} was "
                        f"prepared with a vocabulary of {task.vocab_size}; use a model of at least that")
    if task.max_token_id >= m.vocab_size:
      raise ConfigError("task.path", cfg.task.path, reason=f"holds token id {task.max_token_id}, "
                        f"outside the model's vocabulary of {m.vocab_size}")
    if cfg.task.min_train_length != cfg.task.train_length:
      raise ConfigError("task.min_train_length", cfg.task.min_train_length,
                        allowed=f"0 or task.train_length={cfg.task.train_length} (text windows have "
                        "one length)")
  elif m.vocab_size < task.vocab_size:
    raise ConfigError("model.vocab_size", m.vocab_size, allowed=f">= {task.vocab_size} ({task.name})")
  check_int("task.train_length", cfg.task.train_length, minimum=task.min_length)
  check_int("task.min_train_length", cfg.task.min_train_length, minimum=task.min_length)
  if cfg.task.min_train_length > cfg.task.train_length:
    raise ConfigError("task.min_train_length", cfg.task.min_train_length,
                      reason=f"must be <= task.train_length={cfg.task.train_length}")
  for n in (cfg.task.train_length, *cfg.task.test_lengths):
    check_int("task.test_lengths", n, minimum=task.min_length)
    task.check_length(n)
    if task.seq_len(n) > m.max_len:
      raise ConfigError("task.test_lengths" if n != cfg.task.train_length else "task.train_length",
                        n, reason=f"{task.name} of size {n} needs {task.seq_len(n)} tokens, more "
                        f"than model.max_len={m.max_len}")
  for key in ("steps", "warmup", "checkpoint_every", "seed"):
    check_int(f"train.{key}", t[key], minimum=0)
  check_int("train.eval_every", t.eval_every, minimum=-1)
  for key in ("batch_size", "eval_batch_size", "keep_checkpoints", "log_every"):
    check_int(f"train.{key}", t[key], minimum=1)
  for r in t.eval_recurrences:
    check_int("train.eval_recurrences", r, minimum=1)
  if not t.lr > 0:
    raise ConfigError("train.lr", t.lr, allowed="> 0")
  validate_optimizer(t)
  check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
  distributed.validate(cfg.distributed)
  check_int("eval.iterations", cfg.eval.iterations, minimum=0)
  if 0 < cfg.eval.iterations < 3:
    raise ConfigError("eval.iterations", cfg.eval.iterations, allowed="0 (default) or >= 3")
  check_int("eval.batch_size", cfg.eval.batch_size, minimum=1)
  check_int("eval.chunk", cfg.eval.chunk, minimum=1)
  check_int("eval.path_starts", cfg.eval.path_starts, minimum=0)
  if not isinstance(cfg.train.get("init_from", ""), str):
    raise ConfigError("train.init_from", cfg.train.init_from, allowed='"" or a run directory')
  for key in ("halting", "control"):
    if not isinstance(cfg.eval[key], bool):
      raise ConfigError(f"eval.{key}", cfg.eval[key], allowed="True|False")


def seq_lengths(cfg: Any) -> dict[int, int]:
  """Problem size -> tokens, for the training length and every test length."""
  task = task_of(cfg)
  return {n: task.seq_len(n) for n in (cfg.task.train_length, *cfg.task.test_lengths)}


def validate_optimizer(t: Any) -> None:
  """ConfigError (one line) for the first optimiser key of the `train` section that cannot work."""
  check_choice("train.schedule", t.schedule, SCHEDULES)
  check_int("train.grad_accum", t.grad_accum, minimum=1)
  if t.batch_size % t.grad_accum:
    raise ConfigError("train.grad_accum", t.grad_accum,
                      reason=f"must divide train.batch_size={t.batch_size}")
  if not 0 <= t.decay_fraction <= 1:
    raise ConfigError("train.decay_fraction", t.decay_fraction, allowed="[0, 1]")
  for key in ("b1", "b2"):
    if not 0 <= t[key] < 1:
      raise ConfigError(f"train.{key}", t[key], allowed="[0, 1)")
  if not t.eps > 0:
    raise ConfigError("train.eps", t.eps, allowed="> 0")
  if isinstance(t.no_decay, str) or not all(isinstance(n, str) for n in t.no_decay):
    raise ConfigError("train.no_decay", t.no_decay, reason="must be a tuple of parameter names")


def check_grad_accum(t: Any, batch_ways: int) -> None:
  """Micro-batches split every device's share of the batch evenly (`batch_ways` = mesh data*fsdp)."""
  per_device = t.batch_size // batch_ways
  if per_device % t.grad_accum:
    raise ConfigError("train.grad_accum", t.grad_accum,
                      reason=f"must divide the per-device batch {per_device} (train.batch_size="
                      f"{t.batch_size} over mesh data*fsdp={batch_ways})")
