"""One good trial, one with an invalid value, one that diverges (NaN loss)."""

from conftest import tiny_config


def get_config():
  c = tiny_config(train__steps=12, train__checkpoint_every=0, train__eval_batch_size=16)
  c.task.test_lengths = ()  # one evaluation length: the train length
  c.eval.update(halting=True, iterations=8, batch_size=2, chunk=4)
  return c


def get_hyper(h):
  return h.chain(h.fixed("model.injection", "add"), h.fixed("model.injection", "bogus"),
                 h.product([h.fixed("model.injection", "none"), h.fixed("train.lr", 1e30),
                            h.fixed("train.grad_clip", 1e30), h.fixed("model.init_std", 50.0)]))
