"""Shared test helpers: a tiny trial config and offline W&B in a temp dir."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

from configs.base import get_config  # noqa: E402


def tiny_config(**overrides):
  """A trial that trains in seconds on CPU: d=32, (1, 1x r, 1) on prefix_or of size 8."""
  c = get_config()
  c.task.train_length, c.task.test_lengths = 8, (16,)
  c.model.update(d_model=32, n_heads=2, d_ff=64, max_len=32, n_prelude=1, block_size=1, n_coda=1)
  c.train.update(steps=40, batch_size=16, eval_batch_size=32, warmup=5, log_every=5, eval_every=0,
                 checkpoint_every=20, recurrence="uniform", min_recurrence=2, max_recurrence=4,
                 mean_recurrence=3)
  c.wandb.mode = "disabled"
  c.eval.halting = False  # sweep trials measure halting only where a test asks for it
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.fixture(autouse=True)
def _wandb_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
  (tmp_path / "wandb").mkdir()
