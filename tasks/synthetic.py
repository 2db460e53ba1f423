"""Tasks: synthetic reasoning tasks generated on the fly, and text windows from a prepared corpus
(tasks/text.py). Both are deterministic (pure numpy).

Every task is "predict at each position" for a causal model: `targets[i]` is what the model must output
at position i having seen `inputs[:i+1]`; `mask[i]` is 1 where the loss and accuracy count.
Example i of the global batch for step `step` comes from np.random.default_rng([stream, seed, step, i]),
so resuming needs no iterator state and every process draws its own slice of the same global batch.
"""

from __future__ import annotations

import numpy as np

from configs.errors import ConfigError
from tasks import DataError
from tasks.text import TextData

SYNTHETIC_TASKS = ("prefix_or", "prefix_parity", "var_chain", "addition")  # generated on the fly
TASK_NAMES = (*SYNTHETIC_TASKS, "text")

Example = tuple[np.ndarray, np.ndarray, np.ndarray]


class Task:
  """Base class: a family of examples indexed by a problem size `length`."""

  name: str = ""
  vocab_size: int = 0
  pad_id: int = 0
  min_length: int = 1
  max_length: int | None = None  # largest supported problem size (None: unbounded)
  default_train_length: int = 0
  default_test_lengths: tuple[int, ...] = ()

  def seq_len(self, length: int) -> int:
    """Tokens in one example of problem size `length`."""
    raise NotImplementedError

  def check_length(self, length: int) -> None:
    """Raises ConfigError if this task cannot make examples of size `length`."""
    hi = "" if self.max_length is None else str(self.max_length)
    if length < self.min_length or (self.max_length is not None and length > self.max_length):
      raise ConfigError("task.lengths", length, f"{self.min_length}..{hi}")

  def example(self, rng: np.random.Generator, length: int) -> Example:
    """inputs_S int32, targets_S int32, mask_S float32 with S = seq_len(length)."""
    raise NotImplementedError

  def solve(self, inputs_S: np.ndarray, length: int) -> np.ndarray:
    """Brute-force targets from the inputs alone (for tests); positions past seq_len(length) get pad_id."""
    raise NotImplementedError

  def for_stream(self, stream: int) -> "Task":
    """The task that data stream `stream` draws from (0 training, 1 evaluation): the same task for
    generated problems; the held-out split for text."""
    return self

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _padded_like(inputs_S: np.ndarray, pad_id: int) -> np.ndarray:
  return np.full(np.asarray(inputs_S).shape, pad_id, np.int32)


class PrefixOr(Task):
  """1-D reachability: x_i ~ Bernoulli(1/n), y_i = OR_{j<=i} x_j. Tokens 0, 1, PAD=2."""

  name, vocab_size, pad_id = "prefix_or", 3, 2
  min_length, default_train_length, default_test_lengths = 1, 16, (32, 64)

  def seq_len(self, length: int) -> int:
    return length

  def example(self, rng: np.random.Generator, length: int) -> Example:
    self.check_length(length)
    x_S = (rng.random(length) < 1.0 / length).astype(np.int32)
    y_S = np.maximum.accumulate(x_S).astype(np.int32)
    return x_S, y_S, np.ones(length, np.float32)

  def solve(self, inputs_S: np.ndarray, length: int) -> np.ndarray:
    out_S, seen = _padded_like(inputs_S, self.pad_id), 0
    for i in range(length):
      seen = 1 if (seen == 1 or int(inputs_S[i]) == 1) else 0
      out_S[i] = seen
    return out_S


class PrefixParity(Task):
  """Prefix sums mod 2: x uniform bits, y_i = (x_0 + ... + x_i) mod 2. Tokens 0, 1, PAD=2."""

  name, vocab_size, pad_id = "prefix_parity", 3, 2
  min_length, default_train_length, default_test_lengths = 1, 16, (32, 64)

  def seq_len(self, length: int) -> int:
    return length

  def example(self, rng: np.random.Generator, length: int) -> Example:
    self.check_length(length)
    x_S = rng.integers(0, 2, size=length).astype(np.int32)
    y_S = (np.cumsum(x_S) % 2).astype(np.int32)
    return x_S, y_S, np.ones(length, np.float32)

  def solve(self, inputs_S: np.ndarray, length: int) -> np.ndarray:
    out_S, parity = _padded_like(inputs_S, self.pad_id), 0
    for i in range(length):
      parity = (parity + int(inputs_S[i])) % 2
      out_S[i] = parity
    return out_S


class VarChain(Task):
  """k-hop pointer resolution over two chains of variables.

  Tokens: variables 0..NV-1, constants NV..NV+9, QUERY, PAD. The n assignments [lhs, rhs] come in a random
  order, then [QUERY, q]; the target (at the last position only) is the constant at the root of q's chain.
  """

  NUM_VARS, NUM_CONSTS = 64, 10
  CONST0 = NUM_VARS
  QUERY = NUM_VARS + NUM_CONSTS
  name, vocab_size, pad_id = "var_chain", NUM_VARS + NUM_CONSTS + 2, NUM_VARS + NUM_CONSTS + 1
  min_length, max_length = 2, NUM_VARS
  default_train_length, default_test_lengths = 8, (16, 32)

  def seq_len(self, length: int) -> int:
    return 2 * length + 2

  def example(self, rng: np.random.Generator, length: int) -> Example:
    self.check_length(length)
    n = length
    names_N = rng.choice(self.NUM_VARS, size=n, replace=False)
    consts_2 = self.CONST0 + rng.choice(self.NUM_CONSTS, size=2, replace=False)
    split = (n + 1) // 2
    chains = (names_N[:split], names_N[split:])
    lhs_N = np.concatenate(chains)
    rhs_N = np.concatenate([np.concatenate([[c], ch[:-1]]) for c, ch in zip(consts_2, chains)])
    root_N = np.repeat(consts_2, [len(ch) for ch in chains])
    order_N = rng.permutation(n)
    q = int(rng.integers(n))
    S = self.seq_len(n)
    inputs_S = np.empty(S, np.int32)
    inputs_S[0:2 * n:2], inputs_S[1:2 * n:2] = lhs_N[order_N], rhs_N[order_N]
    inputs_S[-2:] = (self.QUERY, lhs_N[q])
    targets_S = np.full(S, self.pad_id, np.int32)
    targets_S[-1] = root_N[q]
    mask_S = np.zeros(S, np.float32)
    mask_S[-1] = 1.0
    return inputs_S, targets_S, mask_S

  def solve(self, inputs_S: np.ndarray, length: int) -> np.ndarray:
    out_S = _padded_like(inputs_S, self.pad_id)
    rhs_of = {int(inputs_S[2 * j]): int(inputs_S[2 * j + 1]) for j in range(length)}
    value = int(inputs_S[2 * length + 1])
    for _ in range(length + 1):
      if value >= self.NUM_VARS:
        break
      value = rhs_of[value]
    out_S[2 * length + 1] = value
    return out_S


class Addition(Task):
  """n-bit binary addition, LSB first, as next-token prediction; loss on the n+1 sum bits.

  Full sequence: a bits, PLUS, b bits, EQ, sum bits (n+1); inputs = full[:-1], targets = full[1:].
  """

  PLUS, EQ = 2, 3
  name, vocab_size, pad_id = "addition", 5, 4
  min_length, default_train_length, default_test_lengths = 1, 8, (16, 32)

  def seq_len(self, length: int) -> int:
    return 3 * length + 2

  def example(self, rng: np.random.Generator, length: int) -> Example:
    self.check_length(length)
    n = length
    a_N = rng.integers(0, 2, size=n)
    b_N = rng.integers(0, 2, size=n)
    sum_N1 = np.zeros(n + 1, np.int64)  # ripple carry (bits, not ints: no overflow)
    carry = 0
    for i in range(n):
      total = a_N[i] + b_N[i] + carry
      sum_N1[i], carry = total % 2, total // 2
    sum_N1[n] = carry
    full = np.concatenate([a_N, [self.PLUS], b_N, [self.EQ], sum_N1]).astype(np.int32)
    mask_S = np.zeros(self.seq_len(n), np.float32)
    mask_S[2 * n + 1:] = 1.0
    return full[:-1].copy(), full[1:].copy(), mask_S

  def solve(self, inputs_S: np.ndarray, length: int) -> np.ndarray:
    n = length
    out_S = _padded_like(inputs_S, self.pad_id)
    a = sum(int(inputs_S[i]) << i for i in range(n))
    b = sum(int(inputs_S[n + 1 + i]) << i for i in range(n))
    total = a + b
    for i in range(2 * n + 1):
      out_S[i] = int(inputs_S[i + 1])
    for i in range(n + 1):
      out_S[2 * n + 1 + i] = (total >> i) & 1
    return out_S


class Text(Task):
  """Next-token prediction on random windows of a prepared corpus (`task.path`): a problem of size n
  is a window of n tokens, targets the next n, every position counted. Stream 0 reads the training
  split, every other stream the validation split."""

  name, pad_id, min_length = "text", 0, 1
  default_train_length, default_test_lengths = 256, ()

  def __init__(self, path: str, split: str = "train", data=None):
    if not path:
      raise ConfigError("task.path", path, reason="the text task needs a prepared corpus directory "
                        "(python -m train.data prepare ... --out DIR)")
    try:
      self.data = data or TextData(path)
    except DataError as e:
      raise ConfigError("task.path", path, reason=str(e)) from None
    self.path, self.split = path, split
    self.vocab_size = self.data.vocab_size
    self.max_token_id = int(self.data.meta.get("max_token_id", self.vocab_size - 1))

  def seq_len(self, length: int) -> int:
    return length

  def check_length(self, length: int) -> None:
    super().check_length(length)
    self.data.check_window(length)

  def for_stream(self, stream: int) -> "Text":
    split = "train" if stream == 0 else "val"
    return self if split == self.split else Text(self.path, split, self.data)

  def example(self, rng: np.random.Generator, length: int) -> Example:
    w = self.data.window(rng, length, self.split)
    return w[:-1], w[1:], np.ones(length, np.float32)

  def solve(self, inputs_S: np.ndarray, length: int) -> np.ndarray:
    raise NotImplementedError("text has no brute-force solution")


_TASKS = {cls.name: cls for cls in (PrefixOr, PrefixParity, VarChain, Addition)}


def get_task(name: str, path: str = "") -> Task:
  """The task called `name` (one of TASK_NAMES); `text` reads the prepared corpus at `path`."""
  if name == "text":
    return Text(path)
  if name not in _TASKS:
    raise ConfigError("task.name", name, TASK_NAMES)
  return _TASKS[name]()


def task_of(cfg) -> Task:
  """The task of a config (its `task` section: name, and path for text)."""
  return get_task(cfg.task.name, cfg.task.get("path", ""))


def make_batch(task: Task, *, seed: int, step: int, batch_size: int, min_length: int, max_length: int,
               pad_to: int | None = None, process_index: int = 0, process_count: int = 1,
               stream: int = 0, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """This process's slice [p*b, (p+1)*b) of the global batch for `step`, b = batch_size // process_count,
  or, with `rows=(start, stop)`, exactly those rows of the global batch (whatever the sharding needs).

  Returns {"inputs": int32 [b, S], "targets": int32 [b, S], "mask": float32 [b, S], "lengths": int32 [b]}
  with S = pad_to or task.seq_len(max_length); shorter examples are right-padded with pad_id, mask 0.
  `stream` separates independent data streams (0 = training, 1 = evaluation).
  """
  for key, value in (("seed", seed), ("step", step), ("stream", stream)):
    if value < 0:
      raise ConfigError(key, value, ">= 0")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError("process_index", process_index, f"0..{process_count - 1}")
  if batch_size < 1 or batch_size % process_count != 0:
    raise ConfigError("train.batch_size", batch_size, f"a positive multiple of process_count={process_count}")
  if min_length > max_length:
    raise ConfigError("task.lengths", (min_length, max_length), reason="min_length > max_length")
  task = task.for_stream(stream)
  task.check_length(min_length)
  task.check_length(max_length)
  need = task.seq_len(max_length)
  S = need if pad_to is None else pad_to
  if S < need:
    raise ConfigError("task.pad_to", pad_to, f">= {need} (seq_len at max_length={max_length})")

  first, stop = (process_index * (batch_size // process_count),
                 (process_index + 1) * (batch_size // process_count)) if rows is None else rows
  if not 0 <= first < stop <= batch_size:
    raise ConfigError("rows", rows, f"a non-empty range within 0..{batch_size}")
  b = stop - first
  inputs_BS = np.full((b, S), task.pad_id, np.int32)
  targets_BS = np.full((b, S), task.pad_id, np.int32)
  mask_BS = np.zeros((b, S), np.float32)
  lengths_B = np.zeros(b, np.int32)
  for row, i in enumerate(range(first, stop)):
    rng = np.random.default_rng([stream, seed, step, i])
    length = int(rng.integers(min_length, max_length + 1))
    x_S, y_S, m_S = task.example(rng, length)
    n = len(x_S)
    inputs_BS[row, :n], targets_BS[row, :n], mask_BS[row, :n] = x_S, y_S, m_S
    lengths_B[row] = length
  return {"inputs": inputs_BS, "targets": targets_BS, "mask": mask_BS, "lengths": lengths_B}
