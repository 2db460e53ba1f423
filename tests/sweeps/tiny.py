"""Three tiny trials for the runner tests (each trains 12 steps and evaluates 8 iterations)."""

from conftest import tiny_config


def get_config():
  c = tiny_config(train__steps=12, train__checkpoint_every=6, train__eval_batch_size=16)
  c.task.test_lengths = ()  # one evaluation length: the train length
  c.eval.update(iterations=8, batch_size=2, chunk=4)
  c.wandb.mode = "offline"
  return c


def get_hyper(h):
  return h.product([h.sweep("model.block_size", [1, 2, 3]), h.fixed("model.norm", "pre")])
