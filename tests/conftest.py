"""Shared test helpers: a tiny trial config and offline W&B in a temp dir."""

import os

# The test session keeps glibc's allocator defaults (rundir/host.py): its many small compiles and calls
# run faster with per-thread arenas; the CLIs that tests start choose as in use (`python -m train` tunes).

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One persistent compilation cache for the session, inherited by the processes tests start: the tiny
# models of many tests (and the CLIs they run) compile the same programs. Fresh per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="jax_cache_tests_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# XLA's CPU backend turns the programs into machine code without LLVM's optimisations (-O0), here and
# in the processes tests start: most of the suite's time goes to compiling many small programs that
# each run a few times, and -O0 compiles them about a third faster (the same XLA programs).
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _FLAGS:
  os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_backend_optimization_level=0".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs.base import get_config  # noqa: E402


def fake_devices(n: int) -> str:
  """XLA_FLAGS for a process with `n` fake CPU devices (the session's flags kept)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()


def tiny_config(**overrides):
  """A trial that trains in seconds on CPU: d=32, (1, 1x r, 1) on prefix_or of size 8."""
  c = get_config()
  c.task.train_length, c.task.test_lengths = 8, (16,)
  c.model.update(d_model=32, n_heads=2, d_ff=64, max_len=32, n_prelude=1, block_size=1, n_coda=1)
  c.train.update(steps=40, batch_size=16, eval_batch_size=32, warmup=5, log_every=5, eval_every=0,
                 checkpoint_every=20, recurrence="uniform", min_recurrence=2, max_recurrence=4,
                 mean_recurrence=3)
  c.wandb.mode = "disabled"
  c.eval.halting = False  # sweep trials measure halting only where a test asks for it
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.fixture(autouse=True)
def _wandb_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
  (tmp_path / "wandb").mkdir()


# -- a small text corpus and a model trained on it (tests of text, generation) ----------------

WORDS = ("the king is dead long live the queen a horse my kingdom for a horse to be or not to be "
         "all the world is a stage and all the men and women merely players").split()


def write_texts(directory, n_docs=6, words=400, seed=0):
  """Small deterministic documents (a word salad with some structure), one file each."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for d in range(n_docs):
    text = "\n".join(" ".join(rng.choice(WORDS, size=8)) + "." for _ in range(words // 8))
    path = os.path.join(directory, f"doc{d}.txt")
    with open(path, "w") as f:
      f.write(f"Document {d}, naïve café.\n" + text)
    paths.append(path)
  return paths


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  from tasks.corpus import prepare
  tmp = tmp_path_factory.mktemp("corpus")
  write_texts(tmp / "texts")
  prepare([str(tmp / "texts" / "*.txt")], str(tmp / "byte"), val_fraction=0.34, progress=False)
  return str(tmp / "byte"), str(tmp / "texts")


def text_config(path, **overrides):
  c = tiny_config(**overrides)
  c.task.update(name="text", path=path, train_length=32, test_lengths=())
  c.model.update(max_len=32, attention="full")
  c.train.update(eval_batch_size=8, batch_size=8)
  return c


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
  """A tiny model trained on the corpus: 40 steps, held-out loss at 1..16 iterations."""
  from train.trainer import Trainer
  run = str(tmp_path_factory.mktemp("run") / "text")
  result = Trainer(text_config(corpus[0], train__steps=40, train__lr=1e-2), run).run()
  return run, result
