"""Huginn / Raven import and export (convert/, looped_models/raven.py) and the model options the
layout needs. Tiny Raven checkpoints are written here with random weights; the reference is a plain
NumPy transcription of the forward pass in docs/pretrained.md (float64)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from conftest import fake_devices
from flax import nnx
from safetensors.numpy import load_file, save_file

import convert
from configs.base import get_config
from configs.errors import ConfigError
from convert import importer, raven_files
from looped_models import LoopedTransformer, raven, validate_model_config

B, S = 2, 7
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raven_cfg(**overrides):
  rc = dict(model_type="huginn_raven", n_embd=16, n_heads=2, n_layers_in_prelude=1,
            n_layers_in_recurrent_block=2, n_layers_in_coda=1, intermediate_size=24, vocab_size=29,
            tie_embeddings=True, norm_eps=1e-6, rope_base=50000.0, qk_bias=True, mean_recurrence=4,
            mean_backprop_depth=2, block_size=16, state_init="like-init", injection_type="linear")
  rc.update(overrides)
  return rc


def layout(rc):
  """The tensors of the layout (names and shapes as the format page lists them)."""
  d, f, V, H = rc["n_embd"], rc["intermediate_size"], rc["vocab_size"], rc["n_heads"]
  out = {"transformer.wte.weight": (V, d)}
  for group, n in (("prelude", rc["n_layers_in_prelude"]), ("core_block", rc["n_layers_in_recurrent_block"]),
                   ("coda", rc["n_layers_in_coda"])):
    for i in range(n):
      p = f"transformer.{group}.{i}."
      out.update({p + f"norm_{j}.weight": (d,) for j in (1, 2, 3, 4)})
      out.update({p + "attn.Wqkv.weight": (3 * d, d), p + "attn.proj.weight": (d, d),
                  p + "mlp.fc.weight": (2 * f, d), p + "mlp.proj.weight": (d, f)})
      if rc["qk_bias"]:
        out[p + "attn.qk_bias"] = (2, 1, H, d // H)
  out.update({"transformer.adapter.weight": (d, 2 * d), "transformer.ln_f.weight": (d,)})
  if not rc["tie_embeddings"]:
    out["lm_head.weight"] = (V, d)
  return out


def random_tensors(rc, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in layout(rc).items():
    if "norm_" in name or "ln_f" in name:
      out[name] = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith("qk_bias"):
      out[name] = 0.5 * rng.standard_normal(shape)
    else:
      out[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
  return {k: v.astype(np.float32) for k, v in out.items()}


def write_raven(path, rc, tensors, dtype="float32", shards=1, extra=None):
  """A Raven directory: config.json, one safetensors file or `shards` files with an index."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(rc, f)
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
  tensors.update(extra or {})
  names = list(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path
  files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
  weight_map = {}
  for i, file in enumerate(files):
    part = {k: tensors[k] for k in names[i::shards]}
    save_file(part, os.path.join(path, file))
    weight_map.update({k: file for k in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return path


def as_f32(tensors, dtype):
  """The values the checkpoint really holds (bfloat16 rounds)."""
  if dtype == "float32":
    return tensors
  return {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}


# -- the NumPy transcription of the layout's forward pass ------------------------------------------

def rms(x, w, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def rope(x_BSHD, base):
  """Adjacent pairs (2i, 2i+1) rotate as complex numbers by t * base^(-2i/Dh)."""
  Dh = x_BSHD.shape[-1]
  angle = np.arange(x_BSHD.shape[1])[:, None] * base ** (-np.arange(0, Dh, 2) / Dh)
  z = (x_BSHD[..., 0::2] + 1j * x_BSHD[..., 1::2]) * np.exp(1j * angle)[None, :, None, :]
  out = np.empty_like(x_BSHD)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def np_block(x, t, p, rc):
  d, H, eps = rc["n_embd"], rc["n_heads"], rc["norm_eps"]
  Dh = d // H

  def attn(h):
    q, k, v = (a.reshape(*h.shape[:2], H, Dh) for a in np.split(h @ t[p + "attn.Wqkv.weight"].T, 3, -1))
    if rc["qk_bias"]:
      q, k = q + t[p + "attn.qk_bias"][0], k + t[p + "attn.qk_bias"][1]
    q, k = rope(q, rc["rope_base"]), rope(k, rc["rope_base"])
    s = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(Dh)
    s = np.where(np.tril(np.ones((h.shape[1],) * 2, bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", a, v).reshape(h.shape) @ t[p + "attn.proj.weight"].T

  def mlp(h):
    g, u = np.split(h @ t[p + "mlp.fc.weight"].T, 2, -1)
    return (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.proj.weight"].T

  x = rms(x + attn(rms(x, t[p + "norm_1.weight"], eps)), t[p + "norm_2.weight"], eps)
  return rms(x + mlp(rms(x, t[p + "norm_3.weight"], eps)), t[p + "norm_4.weight"], eps)


def np_forward(t, rc, tokens, r, s0):
  """(logits [B, S, V], latent = ln_f(state) [B, S, D]) after r iterations from state s0."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  d, eps = rc["n_embd"], rc["norm_eps"]
  x = t["transformer.wte.weight"][tokens] * np.sqrt(d)
  for i in range(rc["n_layers_in_prelude"]):
    x = np_block(x, t, f"transformer.prelude.{i}.", rc)
  s = s0.astype(np.float64)
  for _ in range(r):
    s = np.concatenate([s, x], -1) @ t["transformer.adapter.weight"].T
    for i in range(rc["n_layers_in_recurrent_block"]):
      s = np_block(s, t, f"transformer.core_block.{i}.", rc)
  latent = rms(s, t["transformer.ln_f.weight"], eps)
  y = latent
  for i in range(rc["n_layers_in_coda"]):
    y = np_block(y, t, f"transformer.coda.{i}.", rc)
  y = rms(y, t["transformer.ln_f.weight"], eps)
  head = t["transformer.wte.weight"] if rc["tie_embeddings"] else t["lm_head.weight"]
  return y @ head.T, latent


def tokens_and_state(rc, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, rc["vocab_size"], (B, S)).astype(np.int32),
          rng.standard_normal((B, S, rc["n_embd"])).astype(np.float32))


# -- import, parity, the logits command, export ------------------------------------------------------

@pytest.mark.parametrize("dtype,tied,shards,qk_bias", [("float32", True, 1, True),
                                                       ("bfloat16", False, 3, False)])
def test_import_parity_logits_command(tmp_path, dtype, tied, shards, qk_bias):
  """Import (single file or sharded index, f32 or bf16, tied or untied) gives a run directory the
  framework opens; `logits` matches the NumPy forward pass to 1e-4 at r = 1, 4, 16, from zeros and
  from a given state."""
  rc = raven_cfg(tie_embeddings=tied, qk_bias=qk_bias)
  tensors = random_tensors(rc)
  freqs = np.zeros((1, rc["block_size"], 1, 4, 2), np.float32)  # a stored RoPE table is ignored
  hf = write_raven(str(tmp_path / "hf"), rc, tensors, dtype, shards, extra={"freqs_cis": freqs})
  run = str(tmp_path / "run")
  assert convert.main(["from-raven", hf, "--out", run]) == 0
  assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "import.json", "status.json"]
  stored = json.load(open(os.path.join(run, "config.json")))
  assert stored["model"]["rope_style"] == "pairs" and stored["model"]["tie_embeddings"] == tied
  assert stored["wandb"]["tags"] == ["imported", "huginn_raven"]

  tokens, state = tokens_and_state(rc)  # rows 0..B-1 start from zeros, rows B.. from `state`
  tokens, state = np.concatenate([tokens, tokens]), np.concatenate([np.zeros_like(state), state])
  np.save(tmp_path / "tokens.npy", tokens)
  np.save(tmp_path / "state.npy", state)
  out = str(tmp_path / "out.npz")
  assert convert.main(["logits", run, "--tokens", str(tmp_path / "tokens.npy"), "--state0",
                       str(tmp_path / "state.npy"), "--iterations", "1,4,16", "--out", out]) == 0
  got = np.load(out)
  ref = as_f32(tensors, dtype)
  for r in (1, 4, 16):
    logits, latent = np_forward(ref, rc, tokens, r, state)
    assert got[f"logits_r{r}"].shape == (2 * B, S, rc["vocab_size"])
    assert np.abs(got[f"logits_r{r}"] - logits).max() < 1e-4, r
    assert np.abs(got[f"latents_r{r}"] - latent).max() < 1e-4, r
  # the iterations really differ, and the initial state matters at r = 1
  assert np.abs(got["logits_r16"] - got["logits_r1"]).max() > 1e-3
  assert np.abs(got["logits_r1"][:B] - got["logits_r1"][B:]).max() > 1e-3


def test_round_trip_and_sharded_export(tmp_path):
  """import -> export gives the same tensors, bit for bit, and the same config fields; importing the
  export gives identical logits; a small shard size writes an index."""
  rc = raven_cfg(tie_embeddings=False)
  tensors = random_tensors(rc, seed=1)
  hf = write_raven(str(tmp_path / "hf"), rc, tensors)
  (tmp_path / "hf" / "tokenizer.json").write_text('{"model": "a tokenizer"}')
  run, back, again = (str(tmp_path / n) for n in ("run", "back", "again"))
  convert.import_raven(hf, run)
  assert open(os.path.join(run, "tokenizer.json")).read() == '{"model": "a tokenizer"}'
  assert convert.main(["to-raven", run, "--out", back, "--shard_gb", str(4e-6)]) == 0
  index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(tensors)
  exported = {}
  for file in set(index["weight_map"].values()):
    exported.update(load_file(os.path.join(back, file)))
  for name, w in tensors.items():
    np.testing.assert_array_equal(exported[name], w, err_msg=name)
  assert os.path.exists(os.path.join(back, "tokenizer.json"))
  back_rc = json.load(open(os.path.join(back, "config.json")))
  assert {k: back_rc[k] for k in rc} == rc
  convert.import_raven(back, again)
  tokens, _ = tokens_and_state(rc, seed=3)
  a = convert.run_logits(run, tokens, [1, 4], "zeros")
  b = convert.run_logits(again, tokens, [1, 4], "zeros")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  bf16 = str(tmp_path / "bf16")
  convert.export_raven(run, bf16, dtype="bfloat16")
  assert json.load(open(os.path.join(bf16, "config.json")))["torch_dtype"] == "bfloat16"
  assert load_file(os.path.join(bf16, "model.safetensors"))["lm_head.weight"].dtype == ml_dtypes.bfloat16


SHARDED = """
import sys
from jax.sharding import PartitionSpec as P
import convert
from convert import importer, raven_files
from looped_models import raven
from looped_models.sharding import tree_shardings
from looped_models.model import abstract_model
hf, run = sys.argv[1:]
assert convert.main(["from-raven", hf, "--out", run, "--mesh", "1,2,2"]) == 0
rc, found = raven_files.read_config(hf), raven_files.scan_tensors(hf)
_, abstract = abstract_model(importer.run_config(rc, "float32").model, 0)
params = raven_files.stream_params(hf, rc, {k: found[k][2] for k in raven.expected_tensors(rc)},
                                   abstract, tree_shardings(abstract, importer.make_mesh("1,2,2")),
                                   "float32")
q, up = params["block"][0]["attn"]["query"]["kernel"], params["coda"][0]["mlp"]["up"]["kernel"]
assert q.sharding.spec == P("fsdp", "tensor") and {s.data.shape for s in q.addressable_shards} == {(8, 8)}
assert {s.data.shape for s in up.addressable_shards} == {(8, 12)}
"""


def test_import_sharded_over_a_mesh(tmp_path):
  """With --mesh (4 fake devices as fsdp 2 x tensor 2) every device receives only its shard as the
  tensors are read, and the run holds the same parameters as a single-device import."""
  from eval.evaluate import load_params
  from rundir.run import load_run_config
  rc = raven_cfg()
  hf = write_raven(str(tmp_path / "hf"), rc, random_tensors(rc, seed=4), shards=2)
  env = {**os.environ, "XLA_FLAGS": fake_devices(4), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", SHARDED, hf, str(tmp_path / "sharded")], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  convert.import_raven(hf, str(tmp_path / "single"))
  trees = [load_params(load_run_config(str(tmp_path / n)), str(tmp_path / n), False)[1]
           for n in ("sharded", "single")]
  jax.tree.map(np.testing.assert_array_equal, *trees)


def test_every_tensor_is_mapped():
  """Perturbing any one tensor of the checkpoint changes the logits."""
  rc = raven_cfg()
  tensors = random_tensors(rc, seed=2)
  cfg = importer.run_config(raven.check_config(rc), "float32")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LoopedTransformer(cfg.model, rngs=nnx.Rngs(0))))

  def params_of(t):
    params = {}
    for name, w in t.items():
      for path, a in raven.to_params(name, w, rc):
        raven_files.set_leaf(params, path, jnp.asarray(a))
    return params

  tokens, state = tokens_and_state(rc)
  fwd = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, 2, state0=jnp.asarray(state)).logits_BSV)
  base = np.asarray(fwd(params_of(tensors)))
  np.testing.assert_allclose(base, np_forward(tensors, rc, tokens, 2, state)[0], atol=1e-4)
  rng = np.random.default_rng(5)
  for name in tensors:
    t = dict(tensors)
    t[name] = t[name] + 0.3 * rng.standard_normal(t[name].shape).astype(np.float32)
    assert np.abs(np.asarray(fwd(params_of(t))) - base).max() > 1e-4, name


# -- bad input -----------------------------------------------------------------------------------

def _drop(name):
  return lambda rc, t: t.pop(name)


@pytest.mark.parametrize("case,expected", [
    ("no_config", "holds no config.json"),
    ("model_type", "model_type='llama'"),
    ("missing", "transformer.core_block.1.norm_3.weight is missing"),
    ("misshapen", "transformer.coda.0.attn.Wqkv.weight has shape [48, 15]"),
    ("extra", "transformer.extra.weight is not part of the layout"),
    ("vocab", "vocab_size=31 disagrees with transformer.wte.weight"),
    ("field", "n_heads=3"),
    ("untied_no_head", "lm_head.weight is missing"),
])
def test_bad_input_one_line_nothing_written(tmp_path, capsys, case, expected):
  rc, tensors = raven_cfg(), random_tensors(raven_cfg())
  if case == "model_type":
    rc["model_type"] = "llama"
  elif case == "missing":
    tensors.pop("transformer.core_block.1.norm_3.weight")
  elif case == "misshapen":
    tensors["transformer.coda.0.attn.Wqkv.weight"] = tensors["transformer.coda.0.attn.Wqkv.weight"][:, :15]
  elif case == "extra":
    tensors["transformer.extra.weight"] = np.zeros(3, np.float32)
  elif case == "vocab":
    rc["vocab_size"] = 31
  elif case == "field":
    rc["n_heads"] = 3
  elif case == "untied_no_head":
    rc["tie_embeddings"] = False
  hf = write_raven(str(tmp_path / "hf"), rc, tensors)
  if case == "no_config":
    os.remove(os.path.join(hf, "config.json"))
  out = tmp_path / "run"
  assert convert.main(["from-raven", hf, "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and expected in err, err
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("run")]


def test_bad_arguments_and_refused_export(tmp_path, capsys):
  """A non-empty --out, a bad --dtype, tokens out of range, a wrong state shape: one line each, and
  export refuses a model whose options do not fit the layout, naming the option."""
  rc = raven_cfg()
  hf = write_raven(str(tmp_path / "hf"), rc, random_tensors(rc))
  run = str(tmp_path / "run")
  convert.import_raven(hf, run)
  assert convert.main(["from-raven", hf, "--out", run]) == 2
  assert "already exists and is not empty" in capsys.readouterr().err
  assert convert.main(["from-raven", hf, "--out", str(tmp_path / "x"), "--dtype", "float16"]) == 2
  assert "--dtype='float16'" in capsys.readouterr().err
  with pytest.raises(ConfigError, match="--tokens"):
    convert.run_logits(run, np.full((1, 3), 29), [1])
  with pytest.raises(ConfigError, match="--state0"):
    convert.run_logits(run, np.zeros((1, 3), np.int32), [1], np.zeros((1, 3, 5)))
  cfg = json.load(open(os.path.join(run, "config.json")))
  cfg["model"]["rope_style"] = "half"
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump(cfg, f)
  assert convert.main(["to-raven", run, "--out", str(tmp_path / "hf2")]) == 2
  err = capsys.readouterr().err
  assert "model.rope_style='half'" in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "hf2").exists()


def test_command_line_runs_as_a_module(tmp_path):
  """`python -m convert` is the command line: bad input exits 2 with one line on stderr."""
  missing = str(tmp_path / "none")
  proc = subprocess.run([sys.executable, "-m", "convert", "from-raven", missing, "--out",
                         str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [f"error: {missing} is not a directory"], proc.stderr
  assert not (tmp_path / "run").exists()


def test_eval_opens_imported_run(tmp_path):
  """`python -m eval --workdir RUN` (in process) evaluates an imported model: params-only restore."""
  from eval.evaluate import evaluate
  from rundir.run import load_run_config
  rc = raven_cfg()  # max_len 16: the evaluation runs on the training length only
  run = str(tmp_path / "run")
  convert.import_raven(write_raven(str(tmp_path / "hf"), rc, random_tensors(rc)), run)
  cfg = load_run_config(run)
  cfg.train.eval_batch_size = 4
  summary = evaluate(cfg, run, iterations=4, batch_size=2, chunk=2, log_wandb=False, progress=False)
  from rundir.outputs import latest
  assert summary["fp/iterations"] == 4 and latest(run, "fixed_points.json") == os.path.join(
      run, "eval", "0", "fixed_points.json")  # an imported model's checkpoint is step 0


# -- the model options the layout needs -----------------------------------------------------------

def small_model(**overrides):
  """tests/test_model.py's shapes (its op-by-op kernels are then already compiled in a full run)."""
  m = get_config().model
  m.update(d_model=16, n_heads=2, d_ff=32, max_len=16, vocab_size=5, n_prelude=1, block_size=1,
           n_coda=1, attention="full", init_std=0.0)
  m.update(overrides)
  validate_model_config(m)
  return LoopedTransformer(m, rngs=nnx.Rngs(0))


def test_like_init_state_and_embed_scale():
  m = get_config().model
  m.update(d_model=16, n_heads=2, vocab_size=11, state_init="like_init", state_std=0.1)
  model = nnx.eval_shape(lambda: LoopedTransformer(m, rngs=nnx.Rngs(0)))  # initial_state needs no weights
  s = np.asarray(jax.jit(model.initial_state)(jnp.zeros((64, 16, 16)), jax.random.key(1)))
  sigma = 0.1 * np.sqrt(16)
  assert np.abs(s).max() <= 3 * sigma + 1e-6 and np.abs(s).max() > 2.5 * sigma
  assert abs(s.std() / sigma - 1) < 0.05
  with jax.disable_jit():
    model = small_model(n_prelude=0)  # encode = the scaled embedding; the scale is read at call time
    tok = jnp.arange(6)[None] % 5
    ctx = model.context(6)
    plain = np.asarray(model.encode(tok, ctx))
    model.spec.embed_scale = "sqrt_d"
    np.testing.assert_allclose(model.encode(tok, ctx), 4.0 * plain, rtol=1e-6)
    model.spec.embed_scale = 2.5
    np.testing.assert_allclose(model.encode(tok, ctx), 2.5 * plain, rtol=1e-6)


def test_rope_styles_and_qk_bias_differ():
  tok = jnp.arange(6)[None] % 5
  with jax.disable_jit():
    out = {k: small_model(**kw)(tok, 2).logits_BSV for k, kw in {
        "half": {}, "pairs": dict(rope_style="pairs"), "base": dict(rope_base=500.0),
        "bias": dict(qk_bias=True), "latent": dict(latent_norm=True)}.items()}
  for k in ("pairs", "base", "latent"):
    assert np.abs(out[k] - out["half"]).max() > 1e-5, k
  np.testing.assert_array_equal(out["bias"], out["half"])  # the bias starts at zero


@pytest.mark.parametrize("key,value", [("rope_style", "complex"), ("rope_base", 0.5),
                                       ("embed_scale", "sqrt"), ("embed_scale", -1.0),
                                       ("qk_bias", 1), ("latent_norm", "yes"), ("norm_eps", 0.0),
                                       ("param_dtype", "float16"), ("state_init", "like-init")])
def test_new_options_validated(key, value):
  m = ml_collections.ConfigDict({**get_config().model.to_dict(), "vocab_size": 11}, type_safe=False)
  m[key] = value
  with pytest.raises(ConfigError, match=f"model.{key}="):
    validate_model_config(m)


def test_an_imported_model_starts_a_fine_tuning_run_and_an_evaluation_trial(tmp_path):
  """train.init_from: a run starts from the imported parameters (fresh optimizer), and a trial with
  train.steps = 0 evaluates the imported model itself (the sweep runner's init-style trials)."""
  from eval.evaluate import evaluate
  from rundir.run import load_run_config, open_run
  from rundir.workdir import RunDirError
  from train.trainer import Trainer
  rc = raven_cfg()
  run = str(tmp_path / "run")
  convert.import_raven(write_raven(str(tmp_path / "hf"), rc, random_tensors(rc)), run)
  cfg = load_run_config(run)
  cfg.train.update(init_from=run, steps=2, log_every=1, eval_every=-1, checkpoint_every=0,
                   eval_batch_size=4, batch_size=4)
  cfg.wandb.mode = "disabled"
  trainer = Trainer(cfg, str(tmp_path / "tuned"))
  start, imported = trainer.init_state()["params"], open_run(run).params
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(imported)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert trainer.run()["status"] == "done"
  cfg.train.steps = 0
  trial = evaluate(cfg, str(tmp_path / "trial"), init=True, iterations=4, batch_size=2, chunk=2,
                   log_wandb=False, progress=False)
  direct = evaluate(load_run_config(run), run, iterations=4, batch_size=2, chunk=2, log_wandb=False,
                    progress=False)
  assert trial["fp/regime"] == direct["fp/regime"]
  assert trial["fp/degeneracy_min_cosine"] == pytest.approx(direct["fp/degeneracy_min_cosine"], rel=1e-5)
  cfg.model.d_model = 32
  with pytest.raises(RunDirError, match="train.init_from=.* holds a model with model.d_model"):
    Trainer(cfg, str(tmp_path / "other"))
