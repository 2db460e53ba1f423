"""The scale path: truncated backprop that frees memory, mixed precision, gradient accumulation and
optimiser options, and the fallback from a damaged checkpoint."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from configs.base import get_config
from configs.errors import ConfigError
from eval.capture import Capture
from eval.fixed_points import analyze_stream
from looped_models import LoopedTransformer
from looped_models.model import init_model
from rundir.checkpoint import Checkpointer
from rundir.config import SCHEDULES, check_grad_accum, resolve
from rundir.logger import read_metrics
from rundir.workdir import RunDirError, read_status
from tasks.synthetic import get_task, make_batch
from train.step import decay_mask, make_optimizer, make_schedule, make_train_step
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


def test_unrolled_loop_equals_scanned_loop():
  """`model.unroll` changes the compiled program, not the numbers: the loss and gradients with the
  loop unrolled (a differentiated pass, length <= unroll) equal those of the scanned loop, for traced
  n; the unrolled gradient program has no loop left, the scanned one and a plain forward pass keep
  their while loop."""
  M, x = 6, tokens()
  graphdef, params, rest = nnx.split(build(unroll=8), nnx.Param, ...)
  graphdef_s, _, rest_s = nnx.split(build(unroll=0), nnx.Param, ...)

  def loss(params, n, scanned=False):
    g, r = (graphdef_s, rest_s) if scanned else (graphdef, rest)
    return _loss(nnx.merge(g, params, r)(x, n, max_iters=M, differentiated=True).logits_BSV)

  unrolled = jax.jit(jax.value_and_grad(loss))
  scanned = jax.jit(jax.value_and_grad(lambda p, n: loss(p, n, True)))
  for n in (1, 4, 6):
    (v, g), (v_s, g_s) = unrolled(params, jnp.int32(n)), scanned(params, jnp.int32(n))
    np.testing.assert_allclose(v, v_s, rtol=1e-6)
    assert tree_rel_err(g, g_s) < 1e-6, n
  hlo = lambda f: f.lower(params, jnp.int32(M)).as_text()
  assert "stablehlo.while" in hlo(scanned)
  assert "stablehlo.while" not in hlo(unrolled)
  forward = jax.jit(lambda p, n: nnx.merge(graphdef, p, rest)(x, n, max_iters=M).logits_BSV)
  assert "stablehlo.while" in forward.lower(params, jnp.int32(M)).as_text()  # not differentiated


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


def _grad_temp_bytes(b: int, R: int = 32) -> int:
  """Scratch memory of the compiled parameter gradient at r = R with backprop depth b."""
  model = build(d_model=32, d_ff=64, max_len=64, block_size=1, attention="full")
  graphdef, params = nnx.split(model)
  x = jnp.zeros((8, 64), jnp.int32)
  loss = lambda p, n: nnx.merge(graphdef, p)(x, n, max_iters=R, backprop_depth=b).logits_BSV.sum()
  compiled = jax.jit(jax.grad(loss)).lower(params, jnp.int32(R)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_truncation_frees_backward_memory():
  """At r = 32 the compiled gradient's scratch memory with b = 4 is well below that with b = 32
  (measured on CPU: 0.18 of it, about b/r plus a constant; with remat 0.50)."""
  b4, b32 = _grad_temp_bytes(4), _grad_temp_bytes(32)
  assert b4 < 0.3 * b32, (b4, b32)


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


# -- 3. optimisation ------------------------------------------------------------------------------

def _steps(cfg, grad_accum, n_steps=3):
  """Losses and final parameters of `n_steps` train steps on the tiny task's batches."""
  cfg = resolve(cfg)
  t = cfg.train
  tx = make_optimizer(t)
  graphdef, params = init_model(cfg.model, t.seed)
  step = jax.jit(make_train_step(graphdef, tx, max_iters=4, backprop_depth=2, seed=t.seed,
                                 grad_accum=grad_accum))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  losses = []
  for i in range(n_steps):
    batch = make_batch(get_task("prefix_or"), seed=0, step=i, batch_size=t.batch_size, min_length=4,
                       max_length=8, stream=0)
    batch.pop("lengths")
    state, metrics = step(state, batch, jnp.int32(3 + i % 2))
    losses.append(metrics)
  return jax.device_get(losses), state["params"]


def test_grad_accumulation_matches_the_whole_batch():
  """4 micro-batches of a 16-sequence batch (of varying lengths, so unequal token counts) give the
  loss curve, metrics and parameters of the unaccumulated steps."""
  cfg = tiny_config(train__lr=1e-2, train__warmup=0)
  whole, p_whole = _steps(cfg, 1)
  accum, p_accum = _steps(cfg, 4)
  for a, w in zip(accum, whole):
    for key in ("train/loss", "train/grad_norm", "train/exact_match", "train/per_position"):
      np.testing.assert_allclose(a[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert whole[0]["train/loss"] > whole[-1]["train/loss"]  # the steps do learn
  assert tree_rel_err(p_accum, p_whole) < 1e-5


def test_schedules():
  t = tiny_config(train__steps=100, train__warmup=10, train__lr=1.0, train__min_lr_ratio=0.1,
                  train__decay_fraction=0.2).train
  lr = lambda name, step: float(make_schedule(_with(t, schedule=name))(step))
  for name in SCHEDULES:
    assert lr(name, 0) == 0.0 and abs(lr(name, 5) - 0.5) < 1e-6 and abs(lr(name, 10) - 1.0) < 1e-6
  assert lr("constant", 99) == lr("constant", 50) == 1.0
  assert lr("wsd", 80) == 1.0 and abs(lr("wsd", 90) - 0.55) < 1e-6 and abs(lr("wsd", 100) - 0.1) < 1e-6
  assert 0.1 < lr("cosine", 55) < 1.0 and abs(lr("cosine", 100) - 0.1) < 1e-6


def _with(t, **overrides):
  t = ml_collections.ConfigDict(t.to_dict())
  t.update(overrides)
  return t


def test_weight_decay_mask():
  """Decay on matrices only: not on embeddings (by default), norms or biases."""
  cfg = resolve(tiny_config(model__injection="gate", model__positions="learned"))
  _, params = init_model(cfg.model, 0)
  mask = decay_mask(params, tuple(cfg.train.no_decay))
  assert mask["block"][0]["mlp"]["up"]["kernel"] and mask["unembed"]["kernel"]
  assert mask["injection"]["proj"]["kernel"] and not mask["injection"]["proj"]["bias"]
  assert not mask["embed"]["embedding"] and not mask["pos_embed"]["embedding"]
  assert not mask["block"][0]["attn_norms"][0]["scale"]
  assert decay_mask(params, ())["embed"]["embedding"]
  # The optimiser applies it: with a zero gradient only the masked-in parameters move.
  t = _with(cfg.train, weight_decay=0.5, warmup=0, schedule="constant", lr=0.1)
  tx = make_optimizer(t)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p))(params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == jax.tree.map(lambda m, p: m and bool(jnp.any(p != 0)), mask, params)


def test_adam_hyperparameters_reach_the_optimizer():
  """The second AdamW update of a scalar after gradients g1, g2 matches the closed form for the
  configured b1, b2, eps."""
  base = tiny_config(train__warmup=0, train__schedule="constant", train__lr=1.0,
                     train__weight_decay=0.0, train__grad_clip=1e9).train

  def second_update(g1, g2, b1, b2, eps):
    tx = make_optimizer(_with(base, b1=b1, b2=b2, eps=eps))
    params = {"w": jnp.zeros(())}
    opt = tx.init(params)
    for g in (g1, g2):
      u, opt = tx.update({"w": jnp.float32(g)}, opt, params)
    return float(u["w"])

  def closed_form(g1, g2, b1, b2, eps):
    m = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / (1 - b1 ** 2)
    v = (b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2) / (1 - b2 ** 2)
    return -m / (v ** 0.5 + eps)

  for hyper in ((0.9, 0.98, 1e-8), (0.0, 0.5, 1e-8), (0.5, 0.9, 0.3)):
    np.testing.assert_allclose(second_update(1.0, -2.0, *hyper), closed_form(1.0, -2.0, *hyper),
                               rtol=1e-5, err_msg=str(hyper))


@pytest.mark.parametrize("overrides,key", [
    ({"train__schedule": "linear"}, "train.schedule"),
    ({"train__grad_accum": 3}, "train.grad_accum"),
    ({"train__grad_accum": 0}, "train.grad_accum"),
    ({"train__backprop_depth": 5}, "train.backprop_depth"),  # max_recurrence 4
    ({"train__recurrence": "fixed", "train__backprop_depth": 4}, "train.backprop_depth"),  # r = 3
    ({"train__b2": 1.0}, "train.b2"),
    ({"train__decay_fraction": 1.5}, "train.decay_fraction"),
])
def test_bad_optimisation_input(tmp_path, overrides, key):
  """One-line ConfigError naming the key, before anything is compiled or written."""
  with pytest.raises(ConfigError) as info:
    Trainer(tiny_config(**overrides), str(tmp_path / "run"))
  assert info.value.key == key and "\n" not in str(info.value)
  assert not (tmp_path / "run").exists()


def test_grad_accum_must_divide_the_per_device_batch():
  t = tiny_config(train__batch_size=16, train__grad_accum=8).train
  check_grad_accum(t, 1)
  check_grad_accum(t, 2)
  with pytest.raises(ConfigError, match="per-device batch 4") as info:
    check_grad_accum(t, 4)
  assert info.value.key == "train.grad_accum"


# -- 4. a damaged checkpoint ----------------------------------------------------------------------

def orbax_steps(workdir):
  """The steps orbax lists in WORKDIR/checkpoints."""
  ckpt = Checkpointer(str(workdir), 2)
  steps = sorted(ckpt.manager.all_steps())
  ckpt.close()
  return steps


def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, capfd):
  """The newest of two checkpoints is corrupted: the rerun says so in one line, resumes from the
  older one, keeps the damaged one aside (orbax no longer lists it) and finishes. With no readable
  checkpoint at all, resuming is an error and nothing is moved."""
  workdir = tmp_path / "run"
  trainer = Trainer(tiny_config(train__steps=20, train__checkpoint_every=10, task__test_lengths=(),
                                train__eval_every=-1), str(workdir))
  assert trainer.run()["status"] == "done"
  ckpts = workdir / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == ["10", "20"]
  files = [p for p in (ckpts / "20").rglob("*") if p.is_file() and p.stat().st_size > 0]
  for p in files:
    p.write_bytes(b"\x00garbage" * 8)
  trainer.cfg.train.steps = 30  # a longer run, as a user resuming with more steps
  capfd.readouterr()
  result = trainer.run()
  err = capfd.readouterr().err
  assert result["status"] == "done" and result["step"] == 30
  assert read_status(str(workdir))["resumed_from"] == 10
  lines = [l for l in err.splitlines() if "kept aside" in l]
  assert len(lines) == 1 and "resuming from step 10" in lines[0] and "20" in lines[0], err
  names = [p.name for p in ckpts.iterdir()]
  aside = [p for p in ckpts.iterdir() if p.name.startswith("20.damaged-")]
  assert len(aside) == 1 and len(list(ckpts.iterdir())) == 3  # beside the new 20 and 30
  assert orbax_steps(workdir) == [20, 30]  # orbax sees only the good ones
  assert len([p for p in aside[0].rglob("*") if p.is_file()]) >= len(files)  # kept for inspection
  metrics = read_metrics(str(workdir))
  assert [m["step"] for m in metrics][-1] == 30
  for step in ("20", "30"):
    for p in (ckpts / step).rglob("*"):
      if p.is_file():
        p.write_bytes(b"\x00garbage")
  trainer.cfg.train.steps = 40
  with pytest.raises(RunDirError, match="corrupt"):
    trainer.run()
  assert sorted(p.name for p in ckpts.iterdir()) == sorted(names)
