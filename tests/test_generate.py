"""Generation: the exact cache reproduces the full forward, the latest cache does not grow with R,
batching and slots change nothing, the exact cache reads an exited token at its last iteration, exited
tokens stop costing block FLOPs, sampling options, bad input is one line, and the CLI writes its
record and plot without overwriting anything. Past the context (RoPE), the ring buffer computes the
causal local attention of width model.max_len over the whole sequence, with and without exit; learned
positions stop at the context with one line."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import text_config, tiny_config
from flax import nnx

from configs.errors import ConfigError
from eval.generate import encode, parse_exit
from looped_models.generate import Generator, cache_bytes, empty_cache, generate
from looped_models.layers import KV, make_cached_context
from looped_models.model import abstract_model, init_model
from rundir.config import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 0, 1, 1, 0, 0, 1], [0, 1], [1]]


def tiny_model(**overrides):
  cfg = resolve(tiny_config(**overrides))
  graphdef, params = init_model(cfg.model, 0)
  return nnx.merge(graphdef, params)


def full_forward_logits(model, prompts, generated, R, rows=len(PROMPTS), length=16):
  """The next-token logits at every generated position of each sequence, from one full-sequence
  forward pass over all of them. The sequences are zero-padded at the end into `rows` x `length`:
  the model is causal, so no position reads the padding after it, and every call has the same shapes
  (its eager operations compile once)."""
  seqs = [list(p) + list(g[:-1]) for p, g in zip(prompts, generated)]
  batch = np.zeros((rows, length), np.int32)
  for i, seq in enumerate(seqs):
    batch[i, :len(seq)] = seq
  logits = np.asarray(model(jnp.asarray(batch), R).logits_BSV)
  return [logits[i, len(p) - 1:len(seq)] for i, (p, seq) in enumerate(zip(prompts, seqs))]


@pytest.mark.parametrize("overrides", [
    {"model__block_size": 2, "model__injection": "concat", "model__norm": "sandwich"},
    {"model__block_size": 2, "model__injection": "add", "model__norm": "peri", "model__n_coda": 2,
     "model__attention": "local", "model__window": 5, "model__mlp": "swiglu"},
])
def test_exact_cache_reproduces_the_full_forward(overrides):
  model = tiny_model(**overrides)
  gen = Generator(model)
  for R in (1, 5):
    out = gen(PROMPTS, max_new=6, iterations=R, cache="exact", return_logits=True, slots=2)
    full = full_forward_logits(model, PROMPTS, out.tokens, R)
    for tokens, logits, its, want in zip(out.tokens, out.logits, out.iterations, full):
      assert len(tokens) == 6 and (its == R).all()
      np.testing.assert_allclose(logits, want, atol=1e-5)
      assert (tokens == logits.argmax(-1)).all()  # greedy
  # teacher forcing: the logits of a given text, decoded token by token, equal the full forward's
  text = [1, 0, 0, 1, 1, 1, 0, 1, 0, 0]
  out = generate(model, [text[:1]], max_new=9, iterations=3, forced=[text[1:]], return_logits=True)
  assert out.tokens[0].tolist() == text[1:]
  [want] = full_forward_logits(model, [text[:1]], [text[1:]], 3)
  np.testing.assert_allclose(out.logits[0], want, atol=1e-5)


def test_latest_cache_memory_does_not_grow_with_R_and_equals_exact_at_R_1():
  model = tiny_model(model__block_size=2)
  m = model.spec
  for R in (1, 8, 32):
    block = empty_cache(m, 2, 16, R, "latest", jnp.float32).block
    assert block.k_SLBHKT.shape == (1, 2, 2, m.n_heads, m.d_model // m.n_heads, 16)
    assert empty_cache(m, 2, 16, R, "exact", jnp.float32).block.k_SLBHKT.shape[0] == R
  assert cache_bytes(m, 2, 16, 4, "latest", "float32") == cache_bytes(m, 2, 16, 32, "latest", "float32")
  assert cache_bytes(m, 2, 16, 32, "exact", "float32") > 8 * cache_bytes(m, 2, 16, 32, "latest", "float32")
  exact = generate(model, PROMPTS, max_new=5, iterations=1, cache="exact", return_logits=True)
  latest = generate(model, PROMPTS, max_new=5, iterations=1, cache="latest", return_logits=True)
  for a, b in zip(exact.logits, latest.logits):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # at R > 1 a token reads earlier tokens at their final iteration instead of its own: not the same
  exact = generate(model, PROMPTS, max_new=5, iterations=4, cache="exact", return_logits=True)
  latest = generate(model, PROMPTS, max_new=5, iterations=4, cache="latest", return_logits=True)
  assert max(np.abs(a - b).max() for a, b in zip(exact.logits, latest.logits)) > 1e-6


@pytest.mark.parametrize("cache", ["exact", "latest"])
def test_slots_and_batching_change_nothing(cache):
  """Each sequence's tokens, iterations and logits do not depend on how many are in flight (sampling
  keys per sequence and position; every slot at its own iteration)."""
  model = tiny_model(model__block_size=2, model__injection="add")
  options = dict(max_new=7, iterations=6, cache=cache, exit=("fixed_point", 1e-3), temperature=1.0,
                 top_k=3, seed=4, return_logits=True)
  gen = Generator(model)
  one = gen(PROMPTS, slots=1, **options)
  for slots in (2, 3):
    out = gen(PROMPTS, slots=slots, **options)
    for i in range(len(PROMPTS)):
      np.testing.assert_array_equal(one.tokens[i], out.tokens[i])
      np.testing.assert_array_equal(one.iterations[i], out.iterations[i])
      np.testing.assert_allclose(one.logits[i], out.logits[i], atol=1e-5)
    assert out.stats["tokens"] == 21 and out.stats["slots"] == slots
  assert len({int(i) for its in one.iterations for i in its}) > 1  # the exits really differ


def stepwise_logits(model, tokens, exits, window=None, latest_from=None):
  """Next-token logits at every position of `tokens`, decoded one token at a time, token t running
  exits[t] block iterations, with every key and value kept per (group, layer, iteration): at block
  iteration j a token reads an earlier token u at iteration min(j, exits[u]) (1-based), the rule the
  exact cache keeps with adaptive exit; from token `latest_from` on, at exits[u] (the latest cache's
  rule for the tokens the decode loop runs; a prefilled prompt runs as the full forward). Token t
  reads keys and values from buffers of len(tokens) slots, those after t zero and masked by its
  causal context, and with `window` those at t - window or before masked too (every token's
  operations have the same shapes, so that they compile once)."""
  store = {}  # (group, layer, iteration) -> {position: (k, v)}
  T = len(tokens)
  latest_from = T if latest_from is None else latest_from

  def run(layer, x, t, ctx, key, read):
    def kv(k, v):
      store.setdefault(key, {})[t] = (np.asarray(k), np.asarray(v))
      ks, vs = (np.zeros((1, T, *k.shape[2:]), k.dtype) for _ in range(2))
      for u in range(t + 1):
        ks[:, u], vs[:, u] = (a[:, 0] for a in store[(*key[:2], read(u))][u])
      return KV(jnp.asarray(ks), jnp.asarray(vs)), None
    return layer(x, ctx, kv=kv)[0]

  logits = []
  for t, token in enumerate(tokens):
    ctx = make_cached_context(model.spec, jnp.array([t]), T)
    if window is not None:
      ctx = ctx._replace(mask_SS=ctx.mask_SS & (t - jnp.arange(T) < window))
    x = model.embed_tokens(jnp.array([[token]]), jnp.array([[t]]))
    for l, layer in enumerate(model.prelude):
      x = run(layer, x, t, ctx, ("prelude", l, 0), lambda u: 0)
    e, s = x, model.initial_state(x)
    for j in range(exits[t]):
      x = model.inject(s, e)
      for l, layer in enumerate(model.block):
        read = ((lambda u: j if u == t else exits[u] - 1) if t >= latest_from else
                (lambda u: min(j, exits[u] - 1)))
        x = run(layer, x, t, ctx, ("block", l, j), read)
      s = model.close_iteration(x)
    x = model.latent(s)
    for l, layer in enumerate(model.coda):
      x = run(layer, x, t, ctx, ("coda", l, 0), lambda u: 0)
    x = model.final_norm(x)
    logits.append(np.asarray(model.embed.attend(x) if model.unembed is None else model.unembed(x))[0, 0])
  return np.stack(logits)


def test_exact_cache_reads_an_exited_token_at_its_last_iteration():
  """With adaptive exit, the exact cache gives the logits of a token-by-token decode in which a later
  token at iteration j reads each earlier token at min(j, its last iteration)."""
  model = tiny_model(model__block_size=2, model__injection="add", model__n_coda=2)
  R, prompt = 6, PROMPTS[0]
  out = Generator(model)([prompt], max_new=9, iterations=R, cache="exact", exit=("fixed_point", 1e-3),
                         return_logits=True)
  its = [int(i) for i in out.iterations[0]]
  assert min(its) < max(its) and min(its) < R  # tokens exit at different iterations, before R
  exits = [R] * (len(prompt) - 1) + its  # the prompt but its last token at R
  tokens = list(prompt) + [int(t) for t in out.tokens[0][:-1]]
  ref = stepwise_logits(model, tokens, exits)[len(prompt) - 1:]
  np.testing.assert_allclose(np.stack(out.logits[0]), ref, atol=1e-5)


# -- past the context: a ring buffer of model.max_len keys ---------------------------------------

RING = 16  # the model's context: every sequence below goes well past it
RING_MODEL = dict(model__attention="full", model__max_len=RING, model__init_std=0.0,
                  model__vocab_size=16, model__block_size=2, model__injection="add", model__n_coda=2)
LONG_PROMPTS = [[1, 0, 1, 1, 0], [3, 5, 7, 11, 13, 2, 4, 6, 8, 10, 12, 14, 1, 9, 15, 0, 3, 2, 1, 7], [9]]


def ring_models():
  """A RoPE model of context RING with full attention (weights at 1/sqrt(fan-in): attention that
  depends on its keys), and the same parameters in a model of context 128 with causal local attention
  of window RING: its window admits the keys at (p - RING, p], exactly what the ring buffer keeps."""
  model = tiny_model(**RING_MODEL)
  local = resolve(tiny_config(**{**RING_MODEL, "model__attention": "local", "model__window": RING,
                                 "model__max_len": 128}))
  assert model.spec.positions == "rope"
  return model, nnx.merge(abstract_model(local.model, 0)[0], nnx.state(model))


@pytest.mark.parametrize("cache,R", [("exact", 3), ("latest", 1)])
def test_generation_past_the_context_is_causal_local_attention(cache, R):
  """Greedy generation of 3 x the context after prompts shorter and longer than it, in 2 slots
  (continuous batching), equals one full forward pass of local attention of width max_len over each
  whole sequence: the same logits, its argmax the generated tokens. The cache stays max_len long.
  (The latest cache equals the full forward at R = 1; at R > 1 see the exit test.)"""
  model, local = ring_models()
  max_new = 3 * RING
  out = Generator(model)(LONG_PROMPTS, max_new=max_new, iterations=R, cache=cache, slots=2,
                         return_logits=True)
  assert out.stats["cache_tokens"] == RING
  assert out.stats["cache_bytes"] == cache_bytes(model.spec, 2, RING, R, cache, "float32")
  want = full_forward_logits(local, LONG_PROMPTS, out.tokens, R, length=72)
  for tokens, logits, full in zip(out.tokens, out.logits, want):
    assert len(tokens) == max_new
    np.testing.assert_allclose(logits, full, atol=1e-4)
    np.testing.assert_array_equal(full.argmax(-1), tokens)


@pytest.mark.parametrize("cache", ["exact", "latest"])
def test_exit_past_the_context_reads_each_token_at_its_last_iteration(cache):
  """With per-token exit past the context (a prompt longer than it, then 2.5 x the context), the ring
  gives the logits of a token-by-token decode that sees only the last max_len tokens and reads each
  earlier token at its last iteration (exact: at min(j, it); latest: at it)."""
  model, _ = ring_models()
  R, prompt = 6, LONG_PROMPTS[1]
  out = Generator(model)([prompt], max_new=40, iterations=R, cache=cache, exit=("kl", 1e-3),
                         return_logits=True)
  its = [int(i) for i in out.iterations[0]]
  assert len(set(its)) > 1 and min(its) < R  # tokens exit at different iterations, before R
  exits = [R] * (len(prompt) - 1) + its
  tokens = list(prompt) + [int(t) for t in out.tokens[0][:-1]]
  ref = stepwise_logits(model, tokens, exits, window=RING,
                        latest_from=len(prompt) - 1 if cache == "latest" else None)
  np.testing.assert_allclose(np.stack(out.logits[0]), ref[len(prompt) - 1:], atol=1e-4)


def test_learned_positions_end_at_the_context():
  """Learned position embeddings end at model.max_len: a prompt or a generation past it is one line
  naming the limit and why (RoPE models generate past it)."""
  model = tiny_model(model__positions="learned")
  for prompts, options, needle in [([[1] * 7], {"max_new": 30}, "leaves room for 26 new tokens"),
                                   ([[1] * 40], {"max_new": 4}, "longer than the model's context of 32"),
                                   ([[1] * 7], {"max_new": 4, "context": 40}, "model.max_len=32")]:
    with pytest.raises(ConfigError) as e:
      generate(model, prompts, iterations=2, **options)
    assert needle in str(e.value) and "learned position" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
  out = generate(model, [[1] * 7], max_new=26, iterations=2)  # exactly fills the context
  assert len(out.tokens[0]) == 26 and out.stats["cache_tokens"] == 32


def identity_model():
  """A block that adds nothing (attention and MLP outputs zeroed): every token's state is fixed
  after its first iteration."""
  model = tiny_model(model__injection="none", model__norm="pre")
  for layer in model.block:
    layer.attn.out.kernel[...] = jnp.zeros_like(layer.attn.out.kernel[...])
    layer.mlp.down.kernel[...] = jnp.zeros_like(layer.mlp.down.kernel[...])
  return model


def test_exited_tokens_stop_costing_block_flops():
  model = identity_model()
  gen = Generator(model)
  fixed = gen(PROMPTS, max_new=5, iterations=8, slots=3)
  for criterion, threshold in [("fixed_point", 1e-3), ("entropy", 1e-6), ("argmax_stable", 2)]:
    out = gen(PROMPTS, max_new=5, iterations=8, slots=3, exit=(criterion, threshold))
    expected = 3 if criterion == "argmax_stable" else 2
    assert all((its == expected).all() for its in out.iterations), criterion
    for a, b in zip(out.tokens, fixed.tokens):  # a fixed point: the same predictions as fixed R
      np.testing.assert_array_equal(a, b)
    # the loop ran only the iterations the tokens needed (one block iteration of 3 slots per step)
    assert out.stats["steps"] == 5 * expected, criterion
    assert out.stats["block_flops_executed"] == out.stats["block_flops_needed"]
    assert out.stats["block_flops_executed"] == pytest.approx(
        fixed.stats["block_flops_executed"] * expected / 8), criterion
  assert fixed.stats["steps"] == 5 * 8


def test_idle_slots_are_counted_as_executed_flops():
  """Prompts of unequal work in 2 slots: the executed block FLOPs cover idle slots too."""
  model = tiny_model()
  out = generate(model, [[1, 0], [0]], max_new=3, iterations=4, slots=2)
  assert out.stats["block_flops_executed"] == out.stats["block_flops_needed"]  # both always busy
  out = generate(model, [[1, 0], [0], [1]], max_new=3, iterations=4, slots=2)
  assert out.stats["steps"] == 2 * 3 * 4  # 3 sequences of 12 iterations in 2 slots
  # sequences 0 and 1 share the slots for 12 steps, then sequence 2 runs 12 steps beside an idle slot
  assert out.stats["block_flops_executed"] == pytest.approx(out.stats["block_flops_needed"] * 48 / 36)
  assert out.stats["slot_utilisation"] == pytest.approx(36 / 48)


def test_sampling():
  model = tiny_model()
  gen = Generator(model)
  greedy = gen(PROMPTS, max_new=8, iterations=2)
  for options in ({"temperature": 1.0, "top_p": 1e-6}, {"temperature": 1.0, "top_k": 1}):
    out = gen(PROMPTS, max_new=8, iterations=2, **options)
    for a, b in zip(out.tokens, greedy.tokens):
      np.testing.assert_array_equal(a, b)
  a = gen(PROMPTS, max_new=16, iterations=2, temperature=2.0, seed=1)
  b = gen(PROMPTS, max_new=16, iterations=2, temperature=2.0, seed=1)
  c = gen(PROMPTS, max_new=16, iterations=2, temperature=2.0, seed=2)
  assert all((x == y).all() for x, y in zip(a.tokens, b.tokens))
  assert any((x != y).any() for x, y in zip(a.tokens, c.tokens))
  top2 = gen(PROMPTS, max_new=16, iterations=2, temperature=5.0, top_k=2, return_logits=True)
  for tokens, logits in zip(top2.tokens, top2.logits):
    ranks = (logits > logits[np.arange(len(tokens)), tokens][:, None]).sum(-1)
    assert (ranks < 2).all()


def test_stops_at_eos():
  model = tiny_model()
  gen, options = Generator(model), dict(max_new=8, iterations=2, temperature=2.0, seed=1)
  tokens = gen(PROMPTS, **options).tokens[0].tolist()
  i = next(i for i in range(1, 8) if tokens[i] not in tokens[:i])  # a token's first appearance
  stopped = gen(PROMPTS, eos_id=tokens[i], **options)
  assert stopped.tokens[0].tolist() == tokens[:i + 1]
  assert all(len(t) <= 8 for t in stopped.tokens)


@pytest.mark.parametrize("change,needle", [
    ({"prompts": [[1, 0], []]}, "prompt 1 is empty"),
    ({"context": 0}, "generate.context"),
    ({"exit": ("patience", 1e-3)}, "generate.exit"),
    ({"exit": ("fixed_point", 0.0)}, "a threshold > 0"),
    ({"exit": ("kl", -1.0)}, "halting.threshold"),
    ({"iterations": 0}, "an integer R >= 1"),
    ({"cache": "paged"}, "generate.cache"),
    ({"prompts": [[1, 99]]}, "tokenizer does not match"),
    ({"temperature": -1.0}, "generate.temperature"),
    ({"top_p": 0.0}, "generate.top_p"),
])
def test_bad_input_is_one_line_before_any_compile(change, needle):
  model = tiny_model()
  kwargs = {"prompts": [[1, 0, 1, 1, 1, 0, 0]], "max_new": 4, "iterations": 2, **change}
  with pytest.raises(ConfigError) as e:
    generate(model, kwargs.pop("prompts"), **kwargs)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_exit_flag_and_tokenizer_checks():
  assert parse_exit("fixed_point:1e-3") == ("fixed_point", 1e-3)
  assert parse_exit("argmax_stable:2") == ("argmax_stable", 2)
  assert parse_exit(None) is None
  with pytest.raises(ConfigError, match="CRITERION:THRESHOLD"):
    parse_exit("fixed_point")
  from tasks.tokenizers import ByteTokenizer
  with pytest.raises(ConfigError, match="does not match the run"):
    encode(ByteTokenizer(), tiny_model().spec, ["hi"], bos=True)  # 258 ids, model has 2
  with pytest.raises(ConfigError, match="needs a text run"):
    encode(None, tiny_model().spec, ["hi"], bos=True)


def cli(*args):
  return subprocess.run([sys.executable, "-m", "eval", "generate", *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_generates_records_and_refuses_to_overwrite(trained, tmp_path):
  run, _ = trained
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the king\n\nall the world\n")
  out = tmp_path / "gen.json"
  r = cli("--workdir", run, "--batch", str(prompts), "--prompt", "a horse", "--max-new", "12",
          "--iterations", "6", "--exit", "fixed_point:1e-2", "--cache", "latest", "--temperature", "0.7",
          "--top-k", "20", "--slots", "2", "--out", str(out))
  assert r.returncode == 0, r.stderr
  rec = json.loads(out.read_text())
  assert [g["prompt"] for g in rec["generations"]] == ["a horse", "the king", "all the world"]
  for g in rec["generations"]:
    assert len(g["tokens"]) == len(g["iterations"]) <= 12
    assert all(1 <= i <= 6 for i in g["iterations"])
    assert g["prompt_tokens"][0] == 256  # BOS, as the documents were prepared
    assert g["text"] in r.stdout
  assert rec["settings"]["exit"] == "fixed_point:0.01" and rec["decode_tokens_per_s"] > 0
  assert (tmp_path / "gen_iterations.png").is_file() and (tmp_path / "gen_iterations.svg").is_file()
  again = cli("--workdir", run, "--prompt", "a", "--out", str(out))
  assert again.returncode == 2 and "not overwritten" in again.stderr
  # without --out: under the run's eval/STEP/, a new directory the second time
  for _ in range(2):
    r = cli("--workdir", run, "--prompt", "to be", "--max-new", "4")
    assert r.returncode == 0, r.stderr
  records = sorted(p for p in os.listdir(os.path.join(run, "eval")) if os.path.isfile(
      os.path.join(run, "eval", p, "generate.json")))
  assert len(records) >= 2


def test_cli_generates_past_the_context(corpus, tmp_path):
  """A text run of context 32 with RoPE positions, trained one step from weights at 1/sqrt(fan-in)
  (attention that depends on its keys): through the CLI, a prompt longer than the context and a
  short one, then up to 3 x the context new tokens each, greedy at fixed R in 2 slots. The record
  says the cache held 32 tokens, and its tokens are the argmax of one full forward pass of the same
  parameters with local attention of width 32 over the whole sequence."""
  from train.trainer import Trainer

  from rundir.run import open_run
  run = str(tmp_path / "run")
  Trainer(text_config(corpus[0], train__steps=1, model__init_std=0.0), run).run()
  out, prompts = tmp_path / "long.json", tmp_path / "prompts.txt"
  prompts.write_text("all the world is a stage and all the men\nthe king\n")
  r = cli("--workdir", run, "--batch", str(prompts), "--max-new", "96", "--iterations", "3",
          "--slots", "2", "--out", str(out))
  assert r.returncode == 0, r.stderr
  rec = json.loads(out.read_text())
  assert rec["stats"]["cache_tokens"] == 32 and len(rec["generations"][0]["prompt_tokens"]) > 32
  opened = open_run(run)
  model, spec = opened.model(), opened.cfg.model.copy_and_resolve_references()
  assert spec.positions == "rope" and spec.max_len == 32
  spec.update(attention="local", window=32, max_len=256)
  local = nnx.merge(abstract_model(spec, 0)[0], nnx.state(model))
  assert max(len(row["tokens"]) for row in rec["generations"]) == 96  # (a row may stop at EOS)
  assert "of the last 32 tokens" in r.stdout
  for row in rec["generations"]:
    assert row["text"] in r.stdout and len(row["iterations"]) == len(row["tokens"])
    seq = row["prompt_tokens"] + row["tokens"][:-1]
    assert len(seq) > 32
    logits = np.asarray(local(jnp.asarray([seq]), 3).logits_BSV)[0, len(row["prompt_tokens"]) - 1:]
    np.testing.assert_array_equal(logits.argmax(-1), row["tokens"])


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "non-empty --prompt"),
    (["--prompt", "a", "--exit", "entropy:0"], "a threshold > 0"),
    (["--prompt", "a", "--exit", "sometimes:1"], "generate.exit"),
    (["--prompt", "a", "--iterations", "0"], "an integer R >= 1"),
    (["--batch", "/no/such/file"], "does not exist"),
])
def test_cli_bad_input_is_one_line(trained, args, needle):
  r = cli("--workdir", trained[0], *args)
  assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_imported_raven_checkpoint_generates_with_its_own_tokenizer(tmp_path):
  """An imported Huginn-layout checkpoint (concat, sandwich, qk bias, RoPE pairs, like-init state)
  with its own tokenizer.json generates through the CLI's path, with per-token exit."""
  from test_convert import random_tensors, raven_cfg, write_raven
  from tokenizers import Tokenizer, models, pre_tokenizers

  import convert
  from eval.generate import run_generate
  words = ["<eos>", "<bos>"] + [f"w{i}" for i in range(27)]  # 29 ids, the model's vocabulary
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  rc = raven_cfg()
  hf = write_raven(str(tmp_path / "hf"), rc, random_tensors(rc))
  tok.save(os.path.join(hf, "tokenizer.json"))
  run = str(tmp_path / "run")
  convert.import_raven(hf, run)
  rec, where = run_generate(run, ["w3 w4 w5", "w7"], out=None, max_new=5, iterations=6,
                            exit=("kl", 1e-3), cache="latest", slots=2)
  assert where == os.path.join(run, "eval", "0", "generate.json") and os.path.isfile(where)
  for row, prompt in zip(rec["generations"], (["w3", "w4", "w5"], ["w7"])):
    assert row["prompt_tokens"] == [1] + [words.index(w) for w in prompt]  # after its <bos>
    assert 1 <= len(row["tokens"]) <= 5 and all(0 <= t < 29 for t in row["tokens"])
    assert all(2 <= i <= 6 for i in row["iterations"])  # no exit before iteration 2
