"""Tests for tasks/synthetic.py: determinism, process slicing, labels vs brute force, accuracy, errors."""

import numpy as np
import pytest

from configs.errors import ConfigError
from tasks import synthetic as tasks
from tasks.metrics import accuracy
from tasks.synthetic import SYNTHETIC_TASKS, TASK_NAMES, get_task, make_batch

SIZES = {"prefix_or": (1, 5, 16, 33), "prefix_parity": (1, 5, 16, 33), "var_chain": (2, 3, 8, 17, 64),
         "addition": (1, 4, 8, 21)}


def _batch(name="prefix_parity", **kw):
  args = dict(seed=3, step=7, batch_size=8, min_length=4, max_length=12)
  args.update(kw)
  return make_batch(get_task(name), **args)


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ("inputs", "targets", "mask", "lengths"))


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)  # text: tests/test_text.py
def test_task_attributes(name):
  task = get_task(name)
  assert task.name == name
  assert 0 <= task.pad_id < task.vocab_size
  assert task.default_test_lengths and min(task.default_test_lengths) > task.default_train_length
  assert [task.seq_len(n) for n in (2, 5)] == {"prefix_or": [2, 5], "prefix_parity": [2, 5],
                                               "var_chain": [6, 12], "addition": [8, 17]}[name]


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)  # text: tests/test_text.py
def test_determinism(name):
  lo = get_task(name).min_length
  base = _batch(name, min_length=lo)
  assert _same(base, _batch(name, min_length=lo))
  for change in ({"step": 8}, {"seed": 4}, {"stream": 1}):
    assert not np.array_equal(base["inputs"], _batch(name, min_length=lo, **change)["inputs"]), change


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)  # text: tests/test_text.py
def test_process_slices_concatenate_to_global_batch(name):
  full = _batch(name, batch_size=16, pad_to=60)
  parts = [_batch(name, batch_size=16, pad_to=60, process_index=p, process_count=4) for p in range(4)]
  assert all(p["inputs"].shape == (4, 60) for p in parts)
  joined = {k: np.concatenate([p[k] for p in parts]) for k in full}
  assert _same(full, joined)


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)  # text: tests/test_text.py
def test_example_matches_brute_force(name):
  task = get_task(name)
  rng = np.random.default_rng(0)
  for n in SIZES[name]:
    S = task.seq_len(n)
    for _ in range(150):
      x, y, m = task.example(rng, n)
      assert x.shape == y.shape == m.shape == (S,)
      assert x.dtype == y.dtype == np.int32 and m.dtype == np.float32
      assert x.min() >= 0 and x.max() < task.vocab_size and y.max() < task.vocab_size
      assert not (x == task.pad_id).any()
      np.testing.assert_array_equal(y, task.solve(x, n))
      if name.startswith("prefix"):
        assert (m == 1).all()
      elif name == "var_chain":
        assert m[-1] == 1 and m[:-1].sum() == 0
      else:
        assert m.sum() == n + 1 and (m[2 * n + 1:] == 1).all()


def test_addition_known_example():
  task = get_task("addition")
  # a = 3 (bits 1,1), b = 1 (bits 1,0): sum 4 = bits 0,0,1 LSB first.
  x = np.array([1, 1, task.PLUS, 1, 0, task.EQ, 0, 0], np.int32)
  np.testing.assert_array_equal(task.solve(x, 2)[5:], [0, 0, 1])
  rng = np.random.default_rng(1)
  for _ in range(50):
    x, y, m = task.example(rng, 40)  # wider than int64: bits are added without overflow
    a = sum(int(v) << i for i, v in enumerate(x[:40]))
    b = sum(int(v) << i for i, v in enumerate(x[41:81]))
    assert sum(int(v) << i for i, v in enumerate(y[m > 0])) == a + b


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)  # text: tests/test_text.py
def test_padding_and_lengths(name):
  task = get_task(name)
  lo = task.min_length
  hi = lo + 9
  batch = make_batch(task, seed=0, step=1, batch_size=64, min_length=lo, max_length=hi, pad_to=task.seq_len(hi) + 3)
  S = task.seq_len(hi) + 3
  assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (64, S)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["mask"].dtype == np.float32 and batch["lengths"].dtype == np.int32
  lengths = batch["lengths"]
  assert lengths.min() >= lo and lengths.max() <= hi and len(set(lengths.tolist())) > 3
  for row, n in enumerate(lengths):
    s = task.seq_len(int(n))
    assert (batch["inputs"][row, s:] == task.pad_id).all()
    assert (batch["targets"][row, s:] == task.pad_id).all()
    assert (batch["mask"][row, s:] == 0).all()
    assert not (batch["inputs"][row, :s] == task.pad_id).any()
    assert batch["mask"][row, :s].sum() > 0
    np.testing.assert_array_equal(batch["targets"][row], task.solve(batch["inputs"][row], int(n)))


def test_default_pad_is_seq_len_of_max_length():
  batch = _batch("addition", min_length=3, max_length=5)
  assert batch["inputs"].shape == (8, get_task("addition").seq_len(5))


def test_prefix_or_density():
  task = get_task("prefix_or")
  rng = np.random.default_rng(0)
  for n in (4, 16, 64):
    mean = np.mean([task.example(rng, n)[0].mean() for _ in range(2000)])
    assert abs(mean - 1 / n) < 0.25 / n, (n, mean)


def test_var_chain_structure():
  task = get_task("var_chain")
  rng = np.random.default_rng(0)
  depths = set()
  for n in (2, 5, 8, 31, 64):
    for _ in range(100):
      x, y, _ = task.example(rng, n)
      lhs, rhs = x[0:2 * n:2], x[1:2 * n:2]
      assert sorted(lhs.tolist()) == sorted(set(lhs.tolist()))  # every variable is an lhs exactly once
      assert (lhs < task.NUM_VARS).all()
      assert x[-2] == task.QUERY and x[-1] in set(lhs.tolist())
      roots = rhs[rhs >= task.NUM_VARS]
      assert len(roots) == 2 and roots[0] != roots[1]
      assert (roots < task.NUM_VARS + task.NUM_CONSTS).all()
      assert set(rhs[rhs < task.NUM_VARS].tolist()) <= set(lhs.tolist())
      # q's depth: hops to a constant, at most ceil(n/2)
      rhs_of, v, hops = dict(zip(lhs.tolist(), rhs.tolist())), int(x[-1]), 0
      while v < task.NUM_VARS:
        v, hops = rhs_of[v], hops + 1
      assert 1 <= hops <= (n + 1) // 2 and v == y[-1]
      if n == 8:
        depths.add(hops)
  assert depths == {1, 2, 3, 4}


def test_accuracy_hand_made():
  preds = np.array([[1, 2, 3], [1, 0, 3], [9, 9, 9], [0, 0, 0]])
  targets = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [5, 5, 5]])
  mask = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 0]], np.float32)
  acc = accuracy(preds, targets, mask)
  # seq 3 has an empty mask (ignored); seq 0 right, seq 1 one wrong, seq 2 its only masked position wrong.
  assert acc["exact_match"] == pytest.approx(1 / 3)
  assert acc["per_position"] == pytest.approx(5 / 7)
  assert accuracy(targets, targets, mask) == {"exact_match": 1.0, "per_position": 1.0}
  # positions outside the mask do not count
  assert accuracy(np.array([[7, 2]]), np.array([[1, 2]]), np.array([[0, 1]])) == {
      "exact_match": 1.0, "per_position": 1.0}


def test_accuracy_on_jax_arrays():
  jnp = pytest.importorskip("jax.numpy")
  acc = accuracy(jnp.array([[1, 0]]), jnp.array([[1, 1]]), jnp.array([[1.0, 1.0]]))
  assert acc == {"exact_match": 0.0, "per_position": 0.5}


def test_unknown_task_error_is_one_line():
  with pytest.raises(ConfigError) as info:
    get_task("nope")
  msg = str(info.value)
  assert "\n" not in msg and "task.name" in msg and "nope" in msg
  assert all(name in msg for name in TASK_NAMES)


@pytest.mark.parametrize("kwargs", [
    {"batch_size": 10, "process_count": 4},
    {"min_length": 9, "max_length": 4},
    {"pad_to": 11},  # seq_len(12) = 12
    {"min_length": 0},
    {"process_index": 4, "process_count": 4},
    {"seed": -1},
])
def test_make_batch_errors(kwargs):
  with pytest.raises(ConfigError) as info:
    _batch("prefix_parity", **kwargs)
  assert "\n" not in str(info.value)


def test_var_chain_size_limits():
  task = get_task("var_chain")
  for n in (1, 65):
    with pytest.raises(ConfigError, match="2..64"):
      task.example(np.random.default_rng(0), n)
  with pytest.raises(ConfigError):
    make_batch(task, seed=0, step=0, batch_size=2, min_length=8, max_length=65)


def test_module_is_pure_numpy():
  src = open(tasks.__file__).read()
  assert "import jax" not in src and "from jax" not in src
