"""Text corpora: tokenise once into flat token shards, then read random windows from a memory map.

  python -m train.data prepare --input 'texts/*.txt' [--input more.jsonl] [--lines] \
      [--tokenizer byte|bpe:N|FILE.json] [--val-fraction 0.05] [--seed 0] --out DIR
  python -m train.data verify DIR       # re-checks every shard's size and sha256 against meta.json

Opening a corpus checks every shard's size and its largest token id against the vocabulary (one
pass over the memory maps, once per process and shard version); `verify` also checks the sha256.

A prepared directory holds `meta.json` (tokenizer, vocabulary, documents / tokens / bytes per split,
shard checksums), the shards `{train,val}-NNNNN.bin` (flat uint16, or uint32 for vocabularies over
65,535), `token_bytes.npy` (UTF-8 bytes of each token id, for bits per byte) and, for a `tokenizers`
tokenizer, `tokenizer.json`. Every document is stored as [BOS] tokens [EOS]. Documents are split
between train and validation by a seeded shuffle, so no document contributes to both.

A corpus prepared with generated problems (`--synthetic`, tasks/reasoning.py) also holds, token for
token with each shard, a uint8 class shard `classes-{split}-NNNNN.bin` (listed under the split's
`classes` in meta.json, the encoding under `classes`) and may hold a third split `extrapolate`;
`TextData.classes(split)` and `window_with_classes` read them. Readers of train and val see nothing
new.

Training reads windows through `TextData.window(rng, length)` with the rng of the synthetic tasks
(tasks/synthetic.py): a window is a pure function of (seed, step, row), so resuming and multi-host need no
iterator state and each process reads only its own rows.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from configs.errors import ConfigError
from tasks import DataError
from tasks.tokenizers import TOKENIZER_FILE, ByteTokenizer, HFTokenizer

META = "meta.json"
TOKEN_BYTES = "token_bytes.npy"
SPLITS = ("train", "val")
EXTRA_SPLITS = ("extrapolate",)  # optional: problems with more steps than trained (reasoning.py)
FORMAT_VERSION = 1


def splits_of(meta: dict) -> tuple[str, ...]:
  """The splits a corpus holds: train and val, then those of EXTRA_SPLITS it has."""
  return SPLITS + tuple(s for s in EXTRA_SPLITS if s in meta["splits"])


def _open_shards(directory: str, shards: list[dict], dtype: np.dtype,
                 vocab_size: int | None = None) -> list[np.ndarray]:
  """Memory maps of the non-empty `shards` (DataError for one missing or of the wrong size), their
  token ids checked against `vocab_size` where given (token shards, not class shards)."""
  arrays = []
  for shard in shards:
    path = os.path.join(directory, shard["file"])
    size = os.path.getsize(path) if os.path.isfile(path) else -1
    if size != shard["tokens"] * dtype.itemsize:
      raise DataError(f"{path} is missing or truncated ({size} bytes, expected "
                      f"{shard['tokens'] * dtype.itemsize}); prepare the corpus again")
    if shard["tokens"]:
      arrays.append(np.memmap(path, dtype=dtype, mode="r"))
      if vocab_size is not None:
        check_ids(path, arrays[-1], vocab_size)
  return arrays


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def load_tokenizer(directory: str, meta: dict | None = None):
  """The tokenizer a prepared directory (or a run directory holding a tokenizer.json) was made with."""
  meta = meta or read_meta(directory)
  t = meta["tokenizer"]
  if t["kind"] == "byte":
    return ByteTokenizer()
  tok = HFTokenizer.from_file(os.path.join(directory, TOKENIZER_FILE), kind=t["kind"])
  tok.bos_id, tok.eos_id = t["bos_id"], t["eos_id"]
  return tok


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META)
  if not os.path.isdir(directory):
    raise DataError(f"data directory {directory} does not exist (prepare it with "
                    "`python -m train.data prepare`)")
  if not os.path.isfile(path):
    raise DataError(f"{directory} holds no {META}: not a prepared corpus")
  try:
    with open(path) as f:
      meta = json.load(f)
    meta["splits"]["train"], meta["tokenizer"]["vocab_size"]  # noqa: B018 - the keys must exist
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise DataError(f"{path} is unreadable or corrupt ({e})") from None
  return meta


_CHECKED: set[tuple] = set()  # (path, size, mtime) of shards whose token ids were checked


def check_ids(path: str, tokens: np.ndarray, vocab_size: int) -> None:
  """DataError when a shard holds a token id past the vocabulary (a shard overwritten or mixed up):
  one pass over its memory map, once per process for each (file, size, modification time)."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, vocab_size)
  if key in _CHECKED:
    return
  step = 1 << 24
  largest = max((int(tokens[i:i + step].max()) for i in range(0, len(tokens), step)), default=0)
  if largest >= vocab_size:
    raise DataError(f"{path} holds token id {largest}, past the vocabulary of {vocab_size}; the "
                    "shard is corrupt or from another corpus (prepare the corpus again)")
  _CHECKED.add(key)


class TextData:
  """A prepared directory's splits as memory maps; windows are drawn from one split."""

  def __init__(self, directory: str):
    self.directory = directory
    self.meta = meta = read_meta(directory)
    self.vocab_size = int(meta["tokenizer"]["vocab_size"])
    dtype = np.dtype(meta["dtype"])
    self.maps: dict[str, list[np.ndarray]] = {}
    self.class_maps: dict[str, list[np.ndarray]] = {}  # of a corpus with classes, aligned with maps
    for split in splits_of(meta):
      self.maps[split] = _open_shards(directory, meta["splits"][split]["shards"], dtype,
                                      self.vocab_size)
      if "classes" in meta["splits"][split]:
        classes = _open_shards(directory, meta["splits"][split]["classes"], np.dtype(np.uint8))
        if [len(c) for c in classes] != [len(a) for a in self.maps[split]]:
          raise DataError(f"{directory}: the class shards of {split} do not match its token "
                          "shards; prepare the corpus again")
        self.class_maps[split] = classes
    tb = os.path.join(directory, TOKEN_BYTES)
    self.token_bytes = np.load(tb) if os.path.isfile(tb) else np.ones(self.vocab_size, np.int32)

  def tokenizer(self):
    """The tokenizer this corpus was prepared with (to decode windows)."""
    return load_tokenizer(self.directory, self.meta)

  def tokens(self, split: str) -> int:
    return sum(len(a) for a in self.maps[split])

  def check_window(self, length: int, key: str = "task.train_length") -> None:
    """A window of `length` inputs needs length + 1 tokens in one shard of every split."""
    for split in SPLITS:
      longest = max((len(a) for a in self.maps[split]), default=0)
      if longest < length + 1:
        raise ConfigError(key, length, reason=f"a window of {length} tokens needs {length + 1} in one "
                          f"shard of the {split} split of {self.directory}, which has {longest}")

  def classes(self, split: str) -> list[np.ndarray]:
    """The uint8 class of every token of `split`, shard for shard with `self.maps[split]` (the
    encoding: meta['classes'], tasks/reasoning.py); DataError for a corpus without classes."""
    if split not in self.class_maps:
      raise DataError(f"{self.directory} holds no token classes for {split} (prepare it with "
                      "--synthetic)")
    return self.class_maps[split]

  def _place(self, rng: np.random.Generator, length: int, split: str) -> tuple[int, int]:
    """Where a random window of `split` starts: (shard, start), shards weighted by size."""
    maps = self.maps[split]
    fits = [i for i, a in enumerate(maps) if len(a) > length]
    sizes = np.array([len(maps[i]) - length for i in fits], np.float64)
    i = fits[0] if len(fits) == 1 else fits[int(rng.choice(len(fits), p=sizes / sizes.sum()))]
    return i, int(rng.integers(0, len(maps[i]) - length))

  def window(self, rng: np.random.Generator, length: int, split: str) -> np.ndarray:
    """length + 1 consecutive tokens (int32) from a random place in `split` (shards weighted by size)."""
    i, start = self._place(rng, length, split)
    return np.asarray(self.maps[split][i][start:start + length + 1], np.int32)

  def window_with_classes(self, rng: np.random.Generator, length: int, split: str
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The window `window` reads for the same rng state, and its tokens' classes (uint8)."""
    classes = self.classes(split)
    i, start = self._place(rng, length, split)
    return (np.asarray(self.maps[split][i][start:start + length + 1], np.int32),
            np.asarray(classes[i][start:start + length + 1], np.uint8))


def verify(directory: str) -> dict:
  """Recompute every shard's sha256 and compare with meta.json; DataError on the first mismatch."""
  meta = read_meta(directory)
  TextData(directory)  # sizes
  for split in splits_of(meta):
    for shard in meta["splits"][split]["shards"] + meta["splits"][split].get("classes", []):
      if sha256(os.path.join(directory, shard["file"])) != shard["sha256"]:
        raise DataError(f"{directory}/{shard['file']}: checksum mismatch; prepare the corpus again")
  return meta


class VocabOnly:
  """A corpus known only by its vocabulary: what compiling a text model's programs needs (their
  shapes), so that `python -m train.aot` runs where the corpus is not (`Text(path, data=...)`)."""

  def __init__(self, vocab_size: int, directory: str = ""):
    self.directory, self.vocab_size = directory, int(vocab_size)
    self.meta = {"max_token_id": self.vocab_size - 1}
    self.token_bytes = np.ones(self.vocab_size, np.int32)

  def check_window(self, length: int, key: str = "task.train_length") -> None:
    """Any window: there are no shards to hold it."""

