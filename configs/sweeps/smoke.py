"""A two-trial sweep that exercises the whole path (train, evaluate, report) in well under 2 minutes."""

from configs.sweeps.default import get_config as default_config


def get_config():
  c = default_config()
  c.train.update(steps=30, checkpoint_every=0, eval_batch_size=32)
  c.eval.update(iterations=16)
  return c


def get_hyper(h):
  return h.product([h.sweep("model.block_size", [1, 2]), h.fixed("model.injection", "add"),
                    h.fixed("model.norm", "pre")])
