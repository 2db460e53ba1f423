"""The one stepper (looped_models/stepper.py): reads at chosen iteration counts equal separate forward
passes of that many iterations, whatever the chunking, from the model's own or a given start."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from looped_models.model import init_model
from looped_models.stepper import Stepper, read_mask
from rundir.config import resolve


def head(model, s_BSD, ctx, batch):
  return {"logits": model.decode(s_BSD, ctx), "latent": model.latent(s_BSD)}


@pytest.mark.parametrize("chunk", [1, 3])
def test_reads_at_chosen_counts_equal_separate_passes(chunk):
  cfg = resolve(tiny_config(model__state_init="normal"))
  graphdef, params = init_model(cfg.model, 0)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 8)).astype(np.int32)
  out = Stepper(graphdef, params, head, seed=3, chunk=chunk).reads({"inputs": tokens}, 5, at=(5, 2))
  assert out["logits"].shape[0] == 2 and out["latent"].shape[:2] == (2, 2)
  model = nnx.merge(graphdef, params)
  for i, r in enumerate((2, 5)):  # increasing order
    alone = model(jnp.asarray(tokens), r, key=jax.random.key(3)).logits_BSV
    np.testing.assert_allclose(out["logits"][i], alone, atol=1e-5, rtol=1e-5)
  zeros = np.zeros((2, 8, cfg.model.d_model), np.float32)  # another start: the forward pass's state0
  given = Stepper(graphdef, params, head, chunk=chunk).reads(
      {"inputs": tokens}, 2, at=(2,), start=lambda s0, e: jnp.asarray(zeros, s0.dtype))
  alone = model(jnp.asarray(tokens), 2, state0=jnp.asarray(zeros)).logits_BSV
  np.testing.assert_allclose(given["logits"][0], alone, atol=1e-5, rtol=1e-5)
  assert not np.allclose(given["logits"][0], out["logits"][0], atol=1e-3)


def test_read_mask():
  assert read_mask(4, None) is None
  assert read_mask(4, (4, 1)).tolist() == [True, False, False, True]
