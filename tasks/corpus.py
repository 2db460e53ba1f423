"""Preparing a text corpus: read documents (text files, lines, JSONL), split them between train and
validation by a seeded shuffle, tokenise once and write flat token shards with meta.json (the format
`tasks.text.TextData` reads). With `--synthetic`, generated problems are mixed into the prose and a
class shard lies beside each token shard (tasks/reasoning.py)."""

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

from tasks import DataError, reasoning
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
            synthetic: str | None = None, synthetic_ratio: float | None = None,
            progress: bool = True) -> dict:
  """Tokenise `inputs` into the prepared directory `out` (which must not exist yet). Returns meta.
  With `synthetic` (a tasks/reasoning.py spec), problems are mixed into the prose at
  `synthetic_ratio` (default 0.5) and every split gets its per-token class shards."""

  if os.path.exists(os.path.join(out, META)):
    raise DataError(f"{out} already holds a prepared corpus; choose another --out")
  if os.path.exists(out) and os.listdir(out):
    raise DataError(f"{out} exists and is not empty; choose another --out")
  if not 0 <= val_fraction < 1:
    raise DataError(f"--val-fraction {val_fraction} is not allowed; allowed: 0 <= f < 1")
  spec = reasoning.parse_spec(synthetic) if synthetic is not None else None
  if synthetic_ratio is not None and spec is None:
    raise DataError("--synthetic-ratio needs --synthetic (the problems to mix in)")
  ratio = 0.5 if synthetic_ratio is None else synthetic_ratio
  if spec and not 0 <= ratio < 1:
    raise DataError(f"--synthetic-ratio {ratio} is not allowed; allowed: 0 <= r < 1 (the share of "
                    "problems in the text; the rest is prose)")
  files = expand_inputs(inputs)
  docs = list(read_documents(files, lines))  # decoding errors surface here, before anything is written
  if not docs:
    raise DataError(f"the input ({len(files)} file(s)) holds no text")
  is_val = split_documents(len(docs), val_fraction, seed)
  if spec is None:
    order = {split: [d for d, v in zip(docs, is_val) if v == (split == "val")] for split in SPLITS}
  else:
    order = reasoning.mix(docs, is_val, spec, ratio, seed)
  tok = make_tokenizer(tokenizer, (_text(d) for d in order["train"]), bos=bos, eos=eos)
  dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".prepare-", dir=parent)  # renamed into place only when complete
  os.chmod(tmp, 0o755)
  try:
    splits = list(order)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in splits}
    class_writers = ({s: _ShardWriter(tmp, f"classes-{s}", np.uint8, shard_tokens) for s in splits}
                     if spec else {})
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in splits}
    counts = {s: np.zeros(256, np.int64) for s in splits}  # tokens per class
    max_id = 0
    entries = [(s, d) for s in splits for d in order[s]]
    bar = tqdm(total=sum(len(_text(d)) for _, d in entries), unit="char", unit_scale=True,
               desc="tokenise", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(entries), batch_docs):
      chunk = entries[start:start + batch_docs]
      for (split, doc), (ids, classes) in zip(chunk, _encode(tok, [d for _, d in chunk])):
        parts = ([[tok.bos_id]] if tok.bos_id is not None else []) + [ids, [tok.eos_id]]
        full = np.concatenate([np.asarray(p, np.int64) for p in parts])
        if len(ids):
          max_id = max(max_id, int(ids.max()))
        writers[split].write(full)
        if spec:
          edge = reasoning.PROSE if isinstance(doc, str) else reasoning.PROBLEM  # BOS and EOS
          head = [edge] if tok.bos_id is not None else []
          full_classes = np.concatenate([np.asarray(head, np.uint8), classes,
                                         np.asarray([edge], np.uint8)])
          class_writers[split].write(full_classes)
          counts[split] += np.bincount(full_classes, minlength=256)
        s = stats[split]
        s["documents"] += 1
        s["tokens"] += len(full)
        s["bytes"] += len(_text(doc).encode("utf-8"))
      bar.update(sum(len(_text(d)) for _, d in chunk))
    bar.close()
    shards = {s: w.finish() for s, w in writers.items()}
    for s, w in class_writers.items():
      stats[s]["classes"] = w.finish()
      stats[s].update(_class_stats(order[s], counts[s]))
    tok.save(tmp)
    np.save(os.path.join(tmp, TOKEN_BYTES), tok.token_bytes())
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": {"kind": tok.kind, "spec": tokenizer, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                      "file": None if tok.kind == "byte" else TOKENIZER_FILE},
        "dtype": np.dtype(dtype).name, "max_token_id": max(max_id, tok.eos_id, tok.bos_id or 0),
        "splits": {s: {**stats[s], "shards": shards[s]} for s in splits},
        "inputs": files, "lines": lines, "val_fraction": val_fraction, "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if spec:
      meta["synthetic"] = {**spec.to_meta(), "ratio": ratio}
      meta["classes"] = reasoning.CLASSES_META
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


def _text(doc: str | list[reasoning.Problem]) -> str:
  """A document's text: prose as it is, a problem document's lines joined."""
  return doc if isinstance(doc, str) else "".join(p.line for p in doc)


def _encode(tok, docs: list[str | list[reasoning.Problem]]) -> list[tuple[np.ndarray, np.ndarray]]:
  """(token ids, their classes) of each document, in one call of the tokenizer: prose whole (class
  PROSE), a problem document as its runs of reasoning.pieces, each tokenised apart."""
  texts, runs = [], []
  for doc in docs:
    pieces = [(doc, reasoning.PROSE)] if isinstance(doc, str) else reasoning.pieces(doc)
    texts += [t for t, _ in pieces]
    runs.append([c for _, c in pieces])
  encoded = iter(tok.encode_batch(texts))
  out = []
  for classes in runs:
    ids = [next(encoded) for _ in classes]
    out.append((np.concatenate(ids) if len(ids) > 1 else ids[0],
                np.repeat(np.asarray(classes, np.uint8), [len(i) for i in ids])))
  return out


def _class_stats(docs: list[str | list[reasoning.Problem]], counts: np.ndarray) -> dict:
  """A split's problems, problems per step count and tokens per class (for meta.json)."""
  hops = [p.hops for d in docs if not isinstance(d, str) for p in d]
  return {"problems": len(hops),
          "problems_per_hops": {str(h): hops.count(h) for h in sorted(set(hops))},
          "class_tokens": {"prose": int(counts[reasoning.PROSE]),
                           "problem": int(counts[reasoning.PROBLEM]),
                           "answer": int(counts[reasoning.ANSWER:].sum())}}
