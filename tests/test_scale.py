"""The scale path: truncated backprop that frees memory, mixed precision, gradient accumulation and
optimiser options, and the fallback from a damaged checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_config
from conftest import tiny_config
from eval.capture import Capture
from eval.fixed_points import analyze_stream
from looped_models import LoopedTransformer
from train.checkpoint import Checkpointer
from train.config import resolve
from train.step import init_model
from train.tasks import get_task, make_batch
from train.trainer import Trainer

V = 8


def build(seed=0, **overrides) -> LoopedTransformer:
  m = get_config().model
  m.update(d_model=16, n_heads=2, d_ff=32, max_len=32, vocab_size=V, n_prelude=1, block_size=2,
           n_coda=1)
  m.update(overrides)
  return LoopedTransformer(m, rngs=nnx.Rngs(seed))


def tokens(batch=2, seq=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, V)


def tree_rel_err(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (num / den) ** 0.5


# -- 1. truncated backprop ------------------------------------------------------------------------

def _loss(logits_BSV):
  return jnp.sum(jnp.sin(logits_BSV) * jnp.arange(1, logits_BSV.shape[-1] + 1))


def _stop_gradient_reference(model, x, n, M, b):
  """The loss of the former implementation: one masked scan whose state is cut by stop_gradient at
  the iteration n - b (the forward pass still stores every iteration for the backward pass)."""
  ctx = model.context(x.shape[1])
  e = model.encode(x, ctx)

  def body(s, t):
    s = jnp.where((t == n - b) & (n > b), jax.lax.stop_gradient(s), s)
    return jax.lax.cond(t < n, lambda s: model.block_step(s, e, ctx)[0], lambda s: s, s), None

  s, _ = jax.lax.scan(body, model.initial_state(e), jnp.arange(M))
  return _loss(model.decode(s, ctx))


def test_truncated_gradients_equal_stop_gradient_semantics():
  """Two scans (no-gradient, then the last b with gradients) give the same loss and parameter
  gradients as cutting one scan with stop_gradient, for traced n below, at and above b, with and
  without per-iteration remat."""
  M, b, x = 8, 3, tokens()
  graphdef, params, rest = nnx.split(build(block_size=1), nnx.Param, ...)
  graphdef_r, _, rest_r = nnx.split(build(block_size=1, remat=True), nnx.Param, ...)

  def loss(params, n, depth, remat=False):
    g, r = (graphdef_r, rest_r) if remat else (graphdef, rest)
    return _loss(nnx.merge(g, params, r)(x, n, max_iters=M, backprop_depth=depth).logits_BSV)

  def reference(params, n):
    return _stop_gradient_reference(nnx.merge(graphdef, params, rest), x, n, M, b)

  @jax.jit
  def grads(params, n):
    vg = jax.value_and_grad
    return vg(loss)(params, n, b), vg(loss)(params, n, b, True), vg(reference)(params, n)

  for n in (1, 3, 5, 8):
    (v, g), (v_remat, g_remat), (v_ref, g_ref) = grads(params, jnp.int32(n))
    np.testing.assert_allclose([v, v_remat], v_ref, rtol=1e-6)
    assert tree_rel_err(g, g_ref) < 1e-6, n
    assert tree_rel_err(g_remat, g_ref) < 1e-6, n
    assert float(jnp.abs(g_ref["block"][0]["mlp"]["up"]["kernel"]).max()) > 0
  assert grads._cache_size() == 1


def test_truncated_trace_equals_one_scan_trace():
  """The per-iteration states and attention of the two-scan loop are those of one scan, with the
  iterations past n repeating the final state (zero attention), for traced n on both sides of b."""
  model, x, M, b = build(), tokens(), 6, 2
  graphdef, state = nnx.split(model)

  @jax.jit
  def traces(state, n):
    m = nnx.merge(graphdef, state)
    run = lambda depth: m(x, n, max_iters=M, backprop_depth=depth, return_states=True,
                          return_attention=True)
    return run(b), run(0)

  for n in (1, 2, 4, 6):
    cut, whole = traces(state, jnp.int32(n))
    for a, c in zip(cut, whole):
      np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(cut.states_RkBSD[n:],
                                  jnp.broadcast_to(cut.states_RkBSD[n - 1, -1],
                                                   cut.states_RkBSD[n:].shape))
    assert float(jnp.abs(cut.attention_RkBHSS[n:]).max(initial=0.0)) == 0.0


def _grad_temp_bytes(b: int, remat: bool = False, R: int = 32) -> int:
  """Scratch memory of the compiled parameter gradient at r = R with backprop depth b."""
  model = build(d_model=32, d_ff=64, max_len=64, block_size=1, attention="full", remat=remat)
  graphdef, params = nnx.split(model)
  x = jnp.zeros((8, 64), jnp.int32)
  loss = lambda p, n: nnx.merge(graphdef, p)(x, n, max_iters=R, backprop_depth=b).logits_BSV.sum()
  compiled = jax.jit(jax.grad(loss)).lower(params, jnp.int32(R)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_truncation_frees_backward_memory():
  """At r = 32 the compiled gradient's scratch memory with b = 4 is well below that with b = 32
  (measured on CPU: 0.18 of it, about b/r plus a constant); remat composes and lowers it further."""
  b4, b32, b4_remat = _grad_temp_bytes(4), _grad_temp_bytes(32), _grad_temp_bytes(4, remat=True)
  assert b4 < 0.3 * b32, (b4, b32)
  assert b4_remat < 0.6 * b4, (b4_remat, b4)


# -- 2. mixed precision ---------------------------------------------------------------------------

def test_bf16_compute_keeps_float32_state_params_and_loss():
  """model.dtype=bfloat16: matmuls in bf16, the recurrent state, residual stream, logits and
  parameters in float32; model.state_dtype=bfloat16 carries the state in bf16."""
  x = tokens()
  for norm in ("post", "sandwich", "peri"):
    model = build(dtype="bfloat16", norm=norm, injection="concat")
    out = jax.eval_shape(lambda x: model(x, 3, return_states=True), x)
    assert out.states_RkBSD.dtype == out.logits_BSV.dtype == jnp.float32, norm
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    low = build(dtype="bfloat16", state_dtype="bfloat16", norm=norm, injection="concat")
    assert jax.eval_shape(lambda x: low(x, 3, return_states=True), x).states_RkBSD.dtype == jnp.bfloat16
  assert "bf16" in str(jax.make_jaxpr(lambda x: model(x, 3).logits_BSV)(x))


@pytest.fixture(scope="module")
def trained_by_dtype(tmp_path_factory):
  """The tiny prefix_or trial trained with float32 and with bfloat16 compute: {dtype: (result,
  params)}."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    workdir = str(tmp_path_factory.mktemp(dtype))
    cfg = tiny_config(train__steps=120, train__checkpoint_every=0, model__dtype=dtype,
                      task__test_lengths=(), train__eval_recurrences=(4,))
    trainer = Trainer(cfg, workdir)
    result = trainer.run()
    ckpt = Checkpointer(workdir, 2)
    state, _ = ckpt.restore(ckpt.latest_step(), trainer.abstract_state)
    ckpt.close()
    out[dtype] = (result, state["params"])
  return out


def test_bf16_trains_as_well_as_float32(trained_by_dtype):
  (full, _), (half, _) = trained_by_dtype["float32"], trained_by_dtype["bfloat16"]
  assert full["status"] == half["status"] == "done"
  key = "eval/len8/best_exact_match"
  assert half[key] >= 0.95 and abs(half[key] - full[key]) <= 0.03, (half[key], full[key])


def test_fixed_point_verdict_unchanged_by_bf16_compute(trained_by_dtype):
  """The evaluator's analysis of one converging trained model gives the same regime and the same
  convergence iteration per layer with float32 and with bfloat16 compute (float32 state)."""
  _, params = trained_by_dtype["float32"]
  batch = make_batch(get_task("prefix_or"), seed=0, step=0, batch_size=8, min_length=8,
                     max_length=8, stream=1)
  batch.pop("lengths")
  reports = {}
  for dtype in ("float32", "bfloat16"):
    graphdef, _ = init_model(resolve(tiny_config(model__dtype=dtype)).model, 0)
    reports[dtype] = analyze_stream(Capture(graphdef, params, chunk=8).chunks(batch, 48))
  full, half = reports["float32"], reports["bfloat16"]
  assert full.regime in ("cyclic", "degenerate")  # a converging model
  assert half.regime == full.regime
  assert [l.converged_at for l in half.layers] == [l.converged_at for l in full.layers]
