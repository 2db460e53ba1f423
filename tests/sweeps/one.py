"""A one-trial sweep for the multi-process (pod) test."""

from conftest import tiny_config


def get_config():
  c = tiny_config(train__steps=8, train__checkpoint_every=0, train__eval_batch_size=16)
  c.task.test_lengths = ()  # one evaluation length: the train length
  c.eval.update(halting=True, iterations=6, batch_size=2, chunk=3)
  c.wandb.mode = "offline"
  return c


def get_hyper(h):
  return h.fixed("model.block_size", 2)
