"""Two trials for the TPU preflight: the tiny one, and one too large for a v5e chip (tests/test_aot.py)."""

from conftest import tiny_config


def get_config():
  c = tiny_config(train__steps=6, train__checkpoint_every=0, train__eval_batch_size=16)
  c.task.test_lengths = ()
  c.eval.update(iterations=4, batch_size=2, chunk=2)
  return c


def get_hyper(h):
  huge = [h.fixed("model.d_model", 8192), h.fixed("model.n_heads", 64), h.fixed("model.d_ff", 32768),
          h.fixed("model.vocab_size", 65536), h.fixed("model.max_len", 64)]
  return h.chain(h.fixed("model.d_model", 32), h.product(huge))
