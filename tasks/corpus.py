"""Preparing a text corpus: read documents (text files, lines, JSONL), split them between train and
validation by a seeded shuffle, tokenise once and write flat token shards with meta.json (the format
`tasks.text.TextData` reads)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from tasks import DataError
from tasks.text import FORMAT_VERSION, META, SPLITS, TOKEN_BYTES, sha256
from tasks.tokenizers import TOKENIZER_FILE, make_tokenizer


def expand_inputs(patterns: Sequence[str]) -> list[str]:
  """Files matching each pattern (a path or a glob), sorted and deduplicated; DataError if none."""
  files: list[str] = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise DataError(f"--input {pattern}: no such file")
    files += matches
  return list(dict.fromkeys(files))


def _read_text(path: str) -> str:
  raw = open(path, "rb").read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 text: undecodable byte 0x{raw[e.start]:02x} at offset "
                    f"{e.start}") from None


def read_documents(files: Sequence[str], lines: bool = False) -> Iterator[str]:
  """Documents: a whole file each, or one per non-empty line with `lines`; `.jsonl` files give one
  per line from its `text` field."""
  for path in files:
    text = _read_text(path)
    if path.endswith(".jsonl"):
      for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
          continue
        try:
          doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise DataError(f"{path}:{n}: not a JSON object with a 'text' field") from None
        if not isinstance(doc, str):
          raise DataError(f"{path}:{n}: 'text' is not a string")
        if doc.strip():
          yield doc
    elif lines:
      yield from (line for line in text.splitlines() if line.strip())
    elif text.strip():
      yield text


class _ShardWriter:
  """Appends token arrays to `{split}-NNNNN.bin` files of at most `shard_tokens` tokens."""

  def __init__(self, directory: str, split: str, dtype, shard_tokens: int):
    self.directory, self.split, self.dtype, self.limit = directory, split, dtype, shard_tokens
    self.shards: list[dict] = []
    self.file, self.count = None, 0

  def _open(self) -> None:
    name = f"{self.split}-{len(self.shards):05d}.bin"
    self.shards.append({"file": name, "tokens": 0})
    self.file = open(os.path.join(self.directory, name), "wb")

  def write(self, ids: np.ndarray) -> None:
    while len(ids):
      if self.file is None or self.shards[-1]["tokens"] >= self.limit:
        self.close_shard()
        self._open()
      room = self.limit - self.shards[-1]["tokens"]
      part, ids = ids[:room], ids[room:]
      self.file.write(part.astype(self.dtype).tobytes())
      self.shards[-1]["tokens"] += len(part)

  def close_shard(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None

  def finish(self) -> list[dict]:
    self.close_shard()
    for s in self.shards:
      s["sha256"] = sha256(os.path.join(self.directory, s["file"]))
    return self.shards


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
  """A boolean mask of the documents that go to validation: a seeded shuffle, at least one document
  in each split when there are two or more."""
  n_val = int(round(n_docs * val_fraction))
  if val_fraction > 0 and n_docs >= 2:
    n_val = min(max(n_val, 1), n_docs - 1)
  order = np.random.default_rng(seed).permutation(n_docs)
  is_val = np.zeros(n_docs, bool)
  is_val[order[:n_val]] = True
  return is_val


def prepare(inputs: Sequence[str], out: str, *, tokenizer: str = "byte", lines: bool = False,
            val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = 1 << 28,
            batch_docs: int = 256, bos: str | None = None, eos: str | None = None,
            progress: bool = True) -> dict:
  """Tokenise `inputs` into the prepared directory `out` (which must not exist yet). Returns meta."""

  if os.path.exists(os.path.join(out, META)):
    raise DataError(f"{out} already holds a prepared corpus; choose another --out")
  if os.path.exists(out) and os.listdir(out):
    raise DataError(f"{out} exists and is not empty; choose another --out")
  if not 0 <= val_fraction < 1:
    raise DataError(f"--val-fraction {val_fraction} is not allowed; allowed: 0 <= f < 1")
  files = expand_inputs(inputs)
  docs = list(read_documents(files, lines))  # decoding errors surface here, before anything is written
  if not docs:
    raise DataError(f"the input ({len(files)} file(s)) holds no text")
  is_val = split_documents(len(docs), val_fraction, seed)
  tok = make_tokenizer(tokenizer, (d for d, v in zip(docs, is_val) if not v), bos=bos, eos=eos)
  dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".prepare-", dir=parent)  # renamed into place only when complete
  os.chmod(tmp, 0o755)
  try:
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    max_id = 0
    bar = tqdm(total=sum(len(d) for d in docs), unit="char", unit_scale=True, desc="tokenise",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(docs), batch_docs):
      chunk = docs[start:start + batch_docs]
      for doc, ids, val in zip(chunk, tok.encode_batch(chunk), is_val[start:start + batch_docs]):
        split = "val" if val else "train"
        parts = ([[tok.bos_id]] if tok.bos_id is not None else []) + [ids, [tok.eos_id]]
        full = np.concatenate([np.asarray(p, np.int64) for p in parts])
        if len(ids):
          max_id = max(max_id, int(ids.max()))
        writers[split].write(full)
        s = stats[split]
        s["documents"] += 1
        s["tokens"] += len(full)
        s["bytes"] += len(doc.encode("utf-8"))
      bar.update(sum(len(d) for d in chunk))
    bar.close()
    shards = {s: w.finish() for s, w in writers.items()}
    tok.save(tmp)
    np.save(os.path.join(tmp, TOKEN_BYTES), tok.token_bytes())
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": {"kind": tok.kind, "spec": tokenizer, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                      "file": None if tok.kind == "byte" else TOKENIZER_FILE},
        "dtype": np.dtype(dtype).name, "max_token_id": max(max_id, tok.eos_id, tok.bos_id or 0),
        "splits": {s: {**stats[s], "shards": shards[s]} for s in SPLITS},
        "inputs": files, "lines": lines, "val_fraction": val_fraction, "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta
