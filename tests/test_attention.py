"""Attention (jax.nn.dot_product_attention, and the blocked einsums CPUs run) against the plain
einsum + softmax implementation (causal and local windows, outputs and gradients), the explicit weights path the evaluator uses, the
projections over flattened rows, and `model.attention_impl`'s checks. Run op by op
(`jax.disable_jit`): tiny shapes, nothing compiled per test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model import tiny_config, tokens

from configs.errors import ConfigError
from looped_models import LoopedTransformer, validate_model_config
from looped_models.layers import (MLP, Attention, apply_rope, attention_impl, blocked_attention,
                                  dense, make_context)

B, S, D, H = 2, 12, 32, 4


@pytest.fixture(autouse=True)
def eager():
  with jax.disable_jit():
    yield


MASKS = [dict(attention="full"), dict(attention="local", window=3)]


def plain_attention(att: Attention, x_BSD, m):
  """The attention of the code base before dot_product_attention: separate projections, einsum,
  float32 softmax over the masked logits. Returns (output, probabilities)."""
  b, s, d = x_BSD.shape
  ctx = make_context(m, s)
  split = lambda y: y.reshape(b, s, m.n_heads, d // m.n_heads)
  q, k, v = split(att.query(x_BSD)), split(att.key(x_BSD)), split(att.value(x_BSD))
  q, k = apply_rope(q, ctx.rope), apply_rope(k, ctx.rope)
  i, j = np.arange(s)[:, None], np.arange(s)[None, :]
  mask = (j <= i) & ((i - j) < m.window if m.attention == "local" else True)
  logits = jnp.einsum("bshk,bthk->bhst", q, k).astype(jnp.float32) / np.sqrt(d // m.n_heads)
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  return att.out(jnp.einsum("bhst,bthk->bshk", probs, v).reshape(b, s, d)), probs


def setup(**overrides):
  m = tiny_config(d_model=D, n_heads=H, max_len=S, **overrides)
  validate_model_config(m)
  x = jax.random.normal(jax.random.key(1), (B, S, D))
  return m, Attention(m, nnx.Rngs(0)), x


IMPLS = ["blocked", "xla"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", MASKS, ids=lambda o: o["attention"])
def test_fused_and_weights_paths_equal_plain(mask, impl):
  m, att, x = setup(attention_impl=impl, **mask)
  ctx = make_context(m, S)
  assert ctx.impl == impl
  want_y, want_p = plain_attention(att, x, m)
  fused_y, none = att(x, ctx)
  explicit_y, probs = att(x, ctx, weights=True)
  assert none is None and probs.shape == (B, H, S, S)
  np.testing.assert_allclose(fused_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(explicit_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probs, want_p, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  i, j = np.arange(S)[:, None], np.arange(S)[None, :]
  outside = (j > i) | ((i - j) >= mask.get("window", S + 1))
  assert np.all(np.asarray(probs)[:, :, outside] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", MASKS, ids=lambda o: o["attention"])
def test_gradients_equal_plain(mask, impl):
  """Training's attention (blocked or dot_product_attention): gradients match the plain
  implementation's."""
  m, att, x = setup(attention_impl=impl, **mask)
  graphdef, params = nnx.split(att)
  ctx = make_context(m, S)._replace(query_block=5)  # blocks of 5, 5 and 2 queries

  def loss(params, x, plain):
    a = nnx.merge(graphdef, params)
    y = plain_attention(a, x, m)[0] if plain else a(x, ctx)[0]
    return jnp.sum(jnp.sin(y))

  got = jax.grad(loss, argnums=(0, 1))(params, x, False)
  want = jax.grad(loss, argnums=(0, 1))(params, x, True)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("query_block", [0, 1, 5])
def test_blocked_attention_equals_dot_product_attention(window, query_block):
  """Every block size (uneven last blocks too) and window: the blocks see exactly the keys the mask
  allows, and the result is dot_product_attention's."""
  q, k, v = (jax.random.normal(jax.random.key(i), (B, S, H, D // H)) for i in range(3))
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                      local_window_size=None if window is None else (window - 1, 0))
  got = blocked_attention(q, k, v, window=window, query_block=query_block)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_blocked_attention_blocks_by_sequence_length():
  """make_context splits long sequences into at most 4 query blocks of at least 64 queries."""
  m = tiny_config(attention="full", max_len=1024)
  assert [make_context(m, n).query_block for n in (12, 64, 128, 255, 256, 1024)] == [
      12, 64, 64, 85, 64, 256]


def test_model_outputs_agree_with_and_without_attention_maps():
  """The evaluator's return_attention path (explicit weights) and the fused path give the same
  logits and states; the maps are per iteration and block layer."""
  m = tiny_config(attention="local", window=2, n_heads=2, n_prelude=0, n_coda=0)
  model = LoopedTransformer(m, rngs=nnx.Rngs(0))
  x = tokens()
  fused = model(x, 2, return_states=True)
  maps = model(x, 2, return_states=True, return_attention=True)
  assert fused.attention_RkBHSS is None
  assert maps.attention_RkBHSS.shape == (2, m.block_size, x.shape[0], 2, x.shape[1], x.shape[1])
  np.testing.assert_allclose(fused.logits_BSV, maps.logits_BSV, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fused.states_RkBSD, maps.states_RkBSD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_on_flattened_rows_equals_linear(dtype):
  m = tiny_config(d_model=D, n_heads=H, mlp="swiglu", d_ff=48, dtype=dtype)
  mlp = MLP(m, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (B, S, D))
  tol = 1e-5 if dtype == "float32" else 2e-2
  got = dense(mlp.up, x)
  assert got.shape == (B, S, 48) and got.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(got.astype(jnp.float32), mlp.up(x).astype(jnp.float32), rtol=tol, atol=tol)
  want = mlp.down(jax.nn.silu(mlp.gate(x)) * mlp.up(x))
  np.testing.assert_allclose(mlp(x).astype(jnp.float32), want.astype(jnp.float32), rtol=tol, atol=tol)


def test_attention_impl_config():
  m = tiny_config()
  backend = jax.default_backend()
  assert attention_impl(m) == ("blocked" if backend == "cpu" else "xla")  # auto, float32
  for impl in ("blocked", "xla"):
    m.attention_impl = impl
    validate_model_config(m)
    assert attention_impl(m) == impl
  for bad in ("flash", "cudnn") if backend != "gpu" else ("flash",):  # cuDNN: a GPU only
    m.attention_impl = bad
    with pytest.raises(ConfigError, match=f"model.attention_impl='{bad}'"):
      validate_model_config(m)


ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")


@ON_GPU
@pytest.mark.parametrize("mask", MASKS, ids=lambda o: o["attention"])
def test_cudnn_attention_equals_plain_in_bfloat16(mask):
  """cuDNN flash attention (a GPU, bfloat16; what `auto` picks there) against the plain
  implementation (float32 softmax): outputs and gradients within bfloat16's precision, both masks."""
  b, s, d, h = 2, 128, 128, 2  # head dimension 64
  m = tiny_config(d_model=d, n_heads=h, max_len=s, dtype="bfloat16", **mask)
  assert attention_impl(m) == "cudnn"  # what auto picks here
  m.attention_impl = "cudnn"
  validate_model_config(m)
  att = Attention(m, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (b, s, d))
  ctx = make_context(m, s)
  assert ctx.impl == "cudnn"
  graphdef, params = nnx.split(att)
  fused = lambda params, x: nnx.merge(graphdef, params)(x, ctx)[0]
  plain = lambda params, x: plain_attention(nnx.merge(graphdef, params), x, m)[0]

  def close(got, want):  # bfloat16's precision, on the scale of the array
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())

  close(fused(params, x), plain(params, x))
  loss = lambda fn: lambda params, x: jnp.sum(jnp.sin(fn(params, x).astype(jnp.float32)))
  got = jax.grad(loss(fused), argnums=(0, 1))(params, x)
  want = jax.grad(loss(plain), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    close(g, w)
