"""Tests for looped_models/: shapes for every option, scan == unrolled loop, backprop_depth, jaxpr size
independent of r, and config validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import looped_models
from configs.base import get_config
from configs.errors import ConfigError
from looped_models import LoopedTransformer, validate_model_config
from looped_models.config import INJECTIONS, NORMS

B, S, V = 2, 8, 5


def tiny_config(**overrides):
  """The default model config shrunk to tiny shapes, with `overrides` applied."""
  m = get_config().model
  m.update(d_model=16, n_heads=2, d_ff=32, max_len=16, vocab_size=V, n_prelude=1, block_size=2,
           n_coda=1)
  m.update(overrides)
  return m


def build(seed=0, **overrides):
  m = tiny_config(**overrides)
  validate_model_config(m)
  return LoopedTransformer(m, rngs=nnx.Rngs(seed))


def tokens(seed=0, batch=B, seq=S):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, V)


def rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def tree_rel_err(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (num / den) ** 0.5


# -- 1. shapes for every injection x norm -----------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("injection", INJECTIONS)
def test_shapes_every_injection_and_norm(injection, norm):
  """logits [B,S,V], states [R,k,B,S,D], attention [R,k,B,H,S,S], all finite; attention rows are
  causal distributions; the last layer's state of the last iteration is what gets decoded."""
  model, x, R = build(injection=injection, norm=norm), tokens(), 3
  out = model(x, R, return_states=True, return_attention=True)
  assert out.logits_BSV.shape == (B, S, V) and out.logits_BSV.dtype == jnp.float32
  assert out.states_RkBSD.shape == (R, 2, B, S, 16)
  assert out.attention_RkBHSS.shape == (R, 2, B, 2, S, S)
  for a in out:
    assert bool(jnp.all(jnp.isfinite(a)))
  np.testing.assert_allclose(out.attention_RkBHSS.sum(-1), 1.0, atol=1e-5)
  assert float(jnp.abs(jnp.triu(out.attention_RkBHSS, k=1)).max()) == 0.0
  ctx = model.context(S)
  np.testing.assert_allclose(model.decode(out.states_RkBSD[-1, -1], ctx), out.logits_BSV,
                             atol=1e-5, rtol=1e-5)
  # Iterations do something: the state changes from one iteration to the next.
  assert float(jnp.abs(out.states_RkBSD[1, -1] - out.states_RkBSD[0, -1]).max()) > 1e-6


def test_return_flags_and_iterations():
  """Without the return flags the traces are None and the logits are the same; r matters."""
  model, x = build(), tokens()
  full = model(x, 3, return_states=True, return_attention=True)
  plain = model(x, 3)
  assert plain.states_RkBSD is None and plain.attention_RkBHSS is None
  np.testing.assert_allclose(plain.logits_BSV, full.logits_BSV, atol=1e-6, rtol=1e-6)
  assert not np.allclose(model(x, 1).logits_BSV, plain.logits_BSV, atol=1e-6)


def test_injections_differ():
  """Same seed, different injection: different logits (the option is actually wired in)."""
  x = tokens()
  logits = {inj: build(injection=inj)(x, 3).logits_BSV for inj in ("none", "add")}
  assert not np.allclose(logits["none"], logits["add"], atol=1e-6)


# -- 2. other options ---------------------------------------------------------------------------------

def test_norm_type_layer_vs_rms():
  x = tokens()
  rms, layer = build(norm_type="rms"), build(norm_type="layer")
  assert isinstance(rms.final_norm, nnx.RMSNorm) and isinstance(layer.final_norm, nnx.LayerNorm)
  a, b = rms(x, 2).logits_BSV, layer(x, 2).logits_BSV
  assert bool(jnp.all(jnp.isfinite(b)))
  assert not np.allclose(a, b, atol=1e-6)


def test_mlp_swiglu():
  x = tokens()
  gelu, swiglu = build(mlp="gelu"), build(mlp="swiglu")
  assert gelu.block[0].mlp.gate is None
  assert swiglu.block[0].mlp.gate.kernel[...].shape == (16, 32)
  out = swiglu(x, 2).logits_BSV
  assert out.shape == (B, S, V) and bool(jnp.all(jnp.isfinite(out)))
  assert not np.allclose(out, gelu(x, 2).logits_BSV, atol=1e-6)


def test_state_init():
  """embed: s0 = e; zeros: s0 = 0; normal: truncated normal that depends on `key`; outputs differ."""
  x = tokens()
  models = {s: build(state_init=s) for s in ("embed", "zeros", "normal")}
  ctx = models["embed"].context(S)
  e = models["embed"].encode(x, ctx)
  np.testing.assert_array_equal(models["embed"].initial_state(e), e)
  np.testing.assert_array_equal(models["zeros"].initial_state(e, jax.random.key(2)), jnp.zeros_like(e))
  init = models["normal"].initial_state
  noise = init(jnp.zeros((4, 64, 16)), jax.random.key(1))
  assert float(jnp.abs(noise).max()) <= 2.0 + 1e-6  # truncated at 2 state_std
  assert 0.75 < float(noise.std()) < 1.0  # std of N(0, 1) truncated at +-2: 0.88
  np.testing.assert_array_equal(init(e, jax.random.key(1)), init(e, jax.random.key(1)))
  assert not np.allclose(init(e, jax.random.key(1)), init(e, jax.random.key(2)))

  out = {s: models[s](x, 2, key=jax.random.key(1)).logits_BSV for s in models}
  assert not np.allclose(out["embed"], out["zeros"], atol=1e-6)
  assert not np.allclose(out["embed"], out["normal"], atol=1e-6)
  other_key = models["normal"](x, 2, key=jax.random.key(2)).logits_BSV
  assert not np.allclose(other_key, out["normal"], atol=1e-6)


def _variants(x_S, changes):
  """A batch: row 0 is x_S, row 1 + c is x_S with the token at position changes[c] changed."""
  rows = [x_S] + [x_S.at[j].set((x_S[j] + 1) % V) for j in changes]
  return jnp.stack(rows)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_local_attention_window(positions):
  """One layer, one iteration, window w: token j reaches position i iff 0 <= i - j < w."""
  w, seq, changes = 3, 10, (0, 4)
  kw = dict(n_prelude=0, block_size=1, n_coda=0, positions=positions)
  x = _variants(tokens(seq=seq)[0], changes)
  logits = build(attention="local", window=w, **kw)(x, 1).logits_BSV
  for c, j in enumerate(changes):
    diff = np.asarray(jnp.abs(logits[1 + c] - logits[0]).max(axis=-1))  # per position i
    for i in range(seq):
      if i < j or i - j >= w:
        assert diff[i] == 0.0, (j, i)
      else:
        assert diff[i] > 1e-6, (j, i)
  # Full attention: the change at j = 0 reaches every later position.
  logits = build(attention="full", **kw)(x, 1).logits_BSV
  assert float(jnp.abs(logits[1] - logits[0]).max(axis=-1).min()) > 1e-6


def test_local_attention_map_is_banded():
  w = 3
  att = build(attention="local", window=w)(tokens(), 2, return_attention=True).attention_RkBHSS
  i, j = np.arange(S)[:, None], np.arange(S)[None, :]
  outside = (j > i) | (i - j >= w)
  assert float(jnp.abs(jnp.where(outside, att, 0.0)).max()) == 0.0
  assert float(jnp.where(outside, 1.0, att).min()) > 0.0


def test_positions_learned_vs_rope():
  """Both encode order: in a one-layer model, swapping two earlier tokens changes the last position's
  output (attention without positions would be invariant to it); rope has no position table."""
  kw = dict(n_prelude=0, block_size=1, n_coda=0, attention="full")
  rope, learned = build(positions="rope", **kw), build(positions="learned", **kw)
  assert rope.pos_embed is None and learned.pos_embed.embedding[...].shape == (16, 16)
  assert "pos_embed" not in nnx.state(rope, nnx.Param)
  x = jnp.array([[1, 2, 3, 4], [2, 1, 3, 4]])
  out = {}
  for name, model in (("rope", rope), ("learned", learned)):
    out[name] = model(x, 1).logits_BSV
    assert bool(jnp.all(jnp.isfinite(out[name])))
    assert float(jnp.abs(out[name][0, -1] - out[name][1, -1]).max()) > 1e-6, name
  assert not np.allclose(out["rope"], out["learned"], atol=1e-6)


def test_tie_embeddings():
  tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
  assert "unembed" not in nnx.state(tied, nnx.Param)
  assert "unembed" in nnx.state(untied, nnx.Param)
  n_tied = sum(p.size for p in jax.tree.leaves(nnx.state(tied, nnx.Param)))
  n_untied = sum(p.size for p in jax.tree.leaves(nnx.state(untied, nnx.Param)))
  assert n_untied - n_tied == 16 * V
  # Tied logits are the final-normed state times the embedding table.
  x = tokens()
  out = tied(x, 2, return_states=True)
  assert out.logits_BSV.shape == (B, S, V) and bool(jnp.all(jnp.isfinite(out.logits_BSV)))
  ctx = tied.context(S)
  h = out.states_RkBSD[-1, -1]
  for layer in tied.coda:
    h, _ = layer(h, ctx)
  expected = tied.final_norm(h) @ tied.embed.embedding[...].T
  np.testing.assert_allclose(out.logits_BSV, expected, atol=1e-5, rtol=1e-5)


# -- 3. scan == unrolled loop -------------------------------------------------------------------------

def unrolled(model, s, e, ctx, r):
  """r applications of block_step in a Python loop: final state and stacked per-iteration traces."""
  states, atts = [], []
  for _ in range(r):
    s, st, at = model.block_step(s, e, ctx)
    states.append(st)
    atts.append(at)
  return s, jnp.stack(states), jnp.stack(atts)


@pytest.mark.parametrize("injection,norm", [("add", "pre"), ("gate", "peri"), ("concat", "sandwich")])
def test_scan_equals_unrolled(injection, norm):
  model, x, r = build(injection=injection, norm=norm), tokens(), 4
  ctx = model.context(S)
  e = model.encode(x, ctx)
  s0 = model.initial_state(e)
  s_ref, states_ref, atts_ref = unrolled(model, s0, e, ctx, r)
  trace = model.iterate(s0, e, ctx, r, r, return_states=True, return_attention=True)
  np.testing.assert_allclose(trace.state_BSD, s_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(trace.states_RkBSD, states_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(trace.attention_RkBHSS, atts_ref, atol=1e-5, rtol=1e-5)
  # The last layer's output of the last iteration is the final state.
  np.testing.assert_array_equal(trace.states_RkBSD[-1, -1], trace.state_BSD)
  # The whole forward pass decodes that state.
  np.testing.assert_allclose(model(x, r).logits_BSV, model.decode(s_ref, ctx), atol=1e-5, rtol=1e-5)


def test_one_iteration_is_one_block_step():
  model, x = build(), tokens()
  ctx = model.context(S)
  e = model.encode(x, ctx)
  s0 = model.initial_state(e)
  s1, states, atts = model.block_step(s0, e, ctx)
  trace = model.iterate(s0, e, ctx, 1, 1, return_states=True, return_attention=True)
  np.testing.assert_allclose(trace.state_BSD, s1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(trace.states_RkBSD[0], states, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(trace.attention_RkBHSS[0], atts, atol=1e-5, rtol=1e-5)


def test_traced_iterations_below_max():
  """Under jit with n traced and n < max_iters: the state after n iterations equals the unrolled
  n-step state, iterations past n repeat the state, and logits equal the static-n forward pass."""
  model, x, M = build(), tokens(), 6
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x, n):
    m = nnx.merge(graphdef, state)
    ctx = m.context(x.shape[1])
    e = m.encode(x, ctx)
    trace = m.iterate(m.initial_state(e), e, ctx, n, M, return_states=True, return_attention=True)
    return trace, m(x, n, max_iters=M).logits_BSV

  ctx = model.context(S)
  e = model.encode(x, ctx)
  s0 = model.initial_state(e)
  for n in (1, 3, 6):
    trace, logits = run(state, x, jnp.int32(n))
    s_ref, states_ref, atts_ref = unrolled(model, s0, e, ctx, n)
    np.testing.assert_allclose(trace.state_BSD, s_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(trace.states_RkBSD[:n], states_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(trace.attention_RkBHSS[:n], atts_ref, atol=1e-5, rtol=1e-5)
    for t in range(n, M):  # skipped iterations repeat the state, with zero attention
      np.testing.assert_array_equal(trace.states_RkBSD[t], jnp.broadcast_to(trace.state_BSD,
                                                                            (2, B, S, 16)))
      assert float(jnp.abs(trace.attention_RkBHSS[t]).max()) == 0.0
    np.testing.assert_allclose(logits, model(x, n).logits_BSV, atol=1e-5, rtol=1e-5)
  assert run._cache_size() == 1  # one compilation for every n


def test_traced_iterations_require_max_iters():
  model = build()
  with pytest.raises(ValueError, match="max_iters"):
    model(tokens(), jnp.int32(2))


# -- 4. backprop_depth --------------------------------------------------------------------------------

def _n_and_jit(n, dynamic):
  """n as a traced jit argument (masked scan to max_iters) or as a static Python int."""
  if dynamic:
    return jnp.int32(n), jax.jit
  return n, functools.partial(jax.jit, static_argnums=1)


def _final_state_loss(s):
  return jnp.sum(jnp.sin(s) * jnp.arange(s.shape[-1]))


@pytest.mark.parametrize("n_dynamic", [False, True])
def test_backprop_depth_cuts_gradient_to_initial_state(n_dynamic):
  """With b < n the final state does not depend (for gradients) on s0; with b = 0 or b >= n it does.
  n_dynamic: n is a traced value below max_iters (the masked path)."""
  model, x, n, M = build(n_prelude=0, block_size=1, n_coda=0), tokens(), 4, 6
  ctx = model.context(S)
  e = model.encode(x, ctx)
  s0 = model.initial_state(e)
  cut, kept = (1, 3), (0, 4)

  n_arg, jit = _n_and_jit(n, n_dynamic)

  @jit
  def grads_s0(s0, n_arg):
    f = lambda s, b: _final_state_loss(model.iterate(s, e, ctx, n_arg, M if n_dynamic else n,
                                                     backprop_depth=b).state_BSD)
    return [jax.grad(f)(s0, b) for b in cut + kept]

  grads = grads_s0(s0, n_arg)
  for b, g in zip(cut + kept, grads):
    if b in cut:
      assert float(jnp.abs(g).max()) == 0.0, b
    else:
      assert float(jnp.abs(g).max()) > 1e-6, b


@pytest.mark.parametrize("n_dynamic", [False, True])
def test_backprop_depth_matches_truncated_reference(n_dynamic):
  """Param gradient with backprop_depth b equals that of: stop_gradient(state after n - b iterations),
  then b more iterations; with b = 0 (full backprop) it differs."""
  model, x, n, b, M = build(injection="gate", n_prelude=0, block_size=1), tokens(), 4, 2, 6
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_depth(params, n_arg, depth):
    m = nnx.merge(graphdef, params, rest)
    ctx = m.context(S)
    e = m.encode(x, ctx)
    s = m.iterate(m.initial_state(e), e, ctx, n_arg, M if n_dynamic else n,
                  backprop_depth=depth).state_BSD
    return _final_state_loss(s)

  def loss_reference(params):
    m = nnx.merge(graphdef, params, rest)
    ctx = m.context(S)
    e = m.encode(x, ctx)
    s_mid = jax.lax.stop_gradient(m.iterate(m.initial_state(e), e, ctx, n - b, n - b).state_BSD)
    return _final_state_loss(m.iterate(s_mid, e, ctx, b, b).state_BSD)

  n_arg, jit = _n_and_jit(n, n_dynamic)

  @jit
  def all_grads(params, n_arg):
    vg = jax.value_and_grad
    return (vg(loss_depth)(params, n_arg, b), vg(loss_reference)(params),
            vg(loss_depth)(params, n_arg, 0))

  (v_cut, g_cut), (v_ref, g_ref), (v_full, g_full) = all_grads(params, n_arg)
  np.testing.assert_allclose(v_cut, v_ref, rtol=1e-6)
  np.testing.assert_allclose(v_full, v_ref, rtol=1e-6)  # forward value unchanged by the cut
  assert jax.tree.structure(g_cut) == jax.tree.structure(g_ref)
  assert tree_rel_err(g_cut, g_ref) < 1e-6
  for gc, gr in zip(jax.tree.leaves(g_cut["block"]), jax.tree.leaves(g_ref["block"])):
    assert rel_err(gc, gr) < 1e-6
  assert tree_rel_err(g_full, g_ref) > 1e-3
  assert rel_err(g_full["embed"]["embedding"][...], g_ref["embed"]["embedding"][...]) > 1e-3


# -- 5. compile size independent of r -----------------------------------------------------------------

def _count_eqns(jaxpr):
  """Equations in a jaxpr, including those of nested sub-jaxprs (scan/cond/pjit bodies)."""
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _count_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _count_eqns(sub)
  return total


def test_jaxpr_size_independent_of_iterations():
  model, x = build(), tokens()
  graphdef, state = nnx.split(model)

  def sizes(r, **kw):
    f = lambda state, x: nnx.merge(graphdef, state)(x, r, **kw).logits_BSV
    closed = jax.make_jaxpr(f)(state, x)
    return len(closed.jaxpr.eqns), _count_eqns(closed.jaxpr)

  assert sizes(2) == sizes(50)
  assert sizes(2, return_states=True) == sizes(50, return_states=True)
  assert sizes(2, max_iters=4) == sizes(30, max_iters=50)
  # Sanity: the counter sees the block (a bigger block gives a bigger jaxpr).
  big = build(block_size=4)
  graphdef4, state4 = nnx.split(big)
  f4 = lambda state, x: nnx.merge(graphdef4, state)(x, 2).logits_BSV
  assert _count_eqns(jax.make_jaxpr(f4)(state4, x).jaxpr) > sizes(2)[1]


# -- 6. config validation -----------------------------------------------------------------------------

def test_default_config_validates():
  m = get_config().model
  m.vocab_size = V
  validate_model_config(m)
  validate_model_config(tiny_config())
  assert looped_models.validate_model_config is validate_model_config


@pytest.mark.parametrize("key,value,expected", [
    ("injection", "mult", ["none", "add", "concat", "gate"]),
    ("norm", "pre_post", ["pre", "post", "sandwich", "peri", "none"]),
    ("norm_type", "batch", ["rms", "layer"]),
    ("state_init", "ones", ["embed", "zeros", "normal"]),
    ("attention", "sparse", ["full", "local"]),
    ("block_size", 0, [">= 1"]),
    ("window", 0, [">= 1"]),
    ("vocab_size", 0, [">= 1"]),
])
def test_validation_rejects(key, value, expected):
  m = get_config().model
  m.vocab_size = V
  m.attention = "local"
  m[key] = value
  with pytest.raises(ConfigError) as info:
    validate_model_config(m)
  msg = str(info.value)
  assert "\n" not in msg
  assert f"model.{key}" in msg and repr(value) in msg
  for allowed in expected:
    assert allowed in msg
  assert info.value.key == f"model.{key}"


def test_validation_d_model_not_divisible_by_heads():
  m = tiny_config(d_model=18, n_heads=4)
  with pytest.raises(ConfigError) as info:
    validate_model_config(m)
  msg = str(info.value)
  assert "\n" not in msg and "model.d_model" in msg and "model.n_heads" in msg


def test_validation_window_ignored_for_full_attention():
  validate_model_config(tiny_config(attention="full", window=0))
