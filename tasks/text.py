"""Text corpora: tokenise once into flat token shards, then read random windows from a memory map.

  python -m train.data prepare --input 'texts/*.txt' [--input more.jsonl] [--lines] \
      [--tokenizer byte|bpe:N|FILE.json] [--val-fraction 0.05] [--seed 0] --out DIR
  python -m train.data verify DIR       # re-checks every shard's size and sha256 against meta.json

A prepared directory holds `meta.json` (tokenizer, vocabulary, documents / tokens / bytes per split,
shard checksums), the shards `{train,val}-NNNNN.bin` (flat uint16, or uint32 for vocabularies over
65,535), `token_bytes.npy` (UTF-8 bytes of each token id, for bits per byte) and, for a `tokenizers`
tokenizer, `tokenizer.json`. Every document is stored as [BOS] tokens [EOS]. Documents are split
between train and validation by a seeded shuffle, so no document contributes to both.

Training reads windows through `TextData.window(rng, length)` with the rng of the synthetic tasks
(tasks/synthetic.py): a window is a pure function of (seed, step, row), so resuming and multi-host need no
iterator state and each process reads only its own rows.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from configs.errors import ConfigError

META = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES = "token_bytes.npy"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
# Names of end- and start-of-document tokens in common tokenizer files (first match wins).
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<|im_end|>")
BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|im_start|>")


class DataError(Exception):
  """A corpus or prepared directory that cannot be used (one-line message)."""


# -- tokenizers -----------------------------------------------------------------------------------


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, BOS = 256, EOS = 257. Nothing to train."""

  kind = "byte"
  vocab_size, bos_id, eos_id = 258, 256, 257

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def token_text(self, i: int) -> str:
    """One token as readable text (specials by name, control bytes escaped)."""
    if i == self.bos_id:
      return "<bos>"
    if i == self.eos_id:
      return "<eos>"
    return repr(bytes([i]).decode("latin-1"))[1:-1]

  def token_bytes(self) -> np.ndarray:
    return np.array([1] * 256 + [0, 0], np.int32)

  def save(self, directory: str) -> None:
    """A byte tokenizer has no file: meta.json says everything."""


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer (a trained BPE or a user's tokenizer.json)."""

  def __init__(self, tok, kind: str, bos_id: int | None, eos_id: int):
    self.tok, self.kind, self.bos_id, self.eos_id = tok, kind, bos_id, eos_id
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_file(cls, path: str, kind: str = "file", bos: str | None = None,
                eos: str | None = None) -> "HFTokenizer":
    from tokenizers import Tokenizer
    try:
      tok = Tokenizer.from_file(path)
    except Exception as e:
      raise DataError(f"{path} is not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    vocab = tok.get_vocab(with_added_tokens=True)

    def find(name: str | None, names: tuple[str, ...], what: str) -> int | None:
      if name is not None:
        if name not in vocab:
          raise DataError(f"{path} has no token {name!r} for {what}")
        return vocab[name]
      return next((vocab[n] for n in names if n in vocab), None)

    eos_id = find(eos, EOS_NAMES, "--eos")
    if eos_id is None:
      raise DataError(f"{path} has no end-of-document token ({'|'.join(EOS_NAMES)}); name one with --eos")
    return cls(tok, kind, find(bos, BOS_NAMES, "--bos"), eos_id)

  @classmethod
  def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "HFTokenizer":
    """A byte-level BPE of `vocab_size` ids (<bos> = 0, <eos> = 1) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return cls(tok, "bpe", tok.token_to_id("<bos>"), tok.token_to_id("<eos>"))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    # encode_batch runs on all cores (the tokenizers library's own thread pool).
    encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int64) for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_text(self, i: int) -> str:
    return self.decode([i]) or (self.tok.id_to_token(int(i)) or "")

  def token_bytes(self) -> np.ndarray:
    """UTF-8 length of each token's text; 0 for special tokens. Exact for byte-level tokenizers
    (every token maps to bytes); for others (SentencePiece-style pieces) the decoded text's length,
    with `<0xNN>` byte pieces counted as one byte and the word marker as a space."""
    from tokenizers import pre_tokenizers
    alphabet = {c: b for b, c in enumerate(_byte_alphabet(pre_tokenizers.ByteLevel.alphabet()))}
    specials = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      piece = self.tok.id_to_token(i)
      if piece is None or piece in specials:
        continue
      if all(c in alphabet for c in piece):
        out[i] = len(piece)  # one byte per byte-level character
      elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        out[i] = 1
      else:
        out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out

  def save(self, directory: str) -> None:
    self.tok.save(os.path.join(directory, TOKENIZER_FILE))


def _byte_alphabet(chars: list[str]) -> list[str]:
  """The byte-level alphabet ordered by byte value (GPT-2's printable mapping of the 256 bytes)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  mapping, extra = {}, 0
  for b in range(256):
    if b in printable:
      mapping[b] = chr(b)
    else:
      mapping[b] = chr(256 + extra)
      extra += 1
  assert set(mapping.values()) == set(chars), "unexpected byte-level alphabet"
  return [mapping[b] for b in range(256)]


def make_tokenizer(spec: str, train_texts: Iterable[str] | None = None, *, bos: str | None = None,
                   eos: str | None = None):
  """`byte`, `bpe:N` (trained on `train_texts`) or the path of a tokenizer.json."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("bpe:"):
    try:
      n = int(spec[4:])
    except ValueError:
      n = 0
    if n < 260:
      raise DataError(f"--tokenizer {spec}: the BPE vocabulary must be an integer >= 260 (256 bytes, "
                      "2 specials, merges)")
    return HFTokenizer.train_bpe(train_texts or [], n)
  if spec.endswith(".json"):
    if not os.path.isfile(spec):
      raise DataError(f"--tokenizer {spec}: no such file")
    return HFTokenizer.from_file(spec, bos=bos, eos=eos)
  raise DataError(f"--tokenizer {spec!r} is not allowed; allowed: byte|bpe:N|FILE.json")


def load_tokenizer(directory: str, meta: dict | None = None):
  """The tokenizer a prepared directory (or a run directory holding a tokenizer.json) was made with."""
  meta = meta or read_meta(directory)
  t = meta["tokenizer"]
  if t["kind"] == "byte":
    return ByteTokenizer()
  tok = HFTokenizer.from_file(os.path.join(directory, TOKENIZER_FILE), kind=t["kind"])
  tok.bos_id, tok.eos_id = t["bos_id"], t["eos_id"]
  return tok


# -- reading a corpus -----------------------------------------------------------------------------


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


# -- preparing a directory ------------------------------------------------------------------------


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


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
      s["sha256"] = _sha256(os.path.join(self.directory, s["file"]))
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
  from tqdm import tqdm

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


# -- reading a prepared directory -----------------------------------------------------------------


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


class TextData:
  """A prepared directory's splits as memory maps; windows are drawn from one split."""

  def __init__(self, directory: str):
    self.directory = directory
    self.meta = meta = read_meta(directory)
    self.vocab_size = int(meta["tokenizer"]["vocab_size"])
    dtype = np.dtype(meta["dtype"])
    self.maps: dict[str, list[np.ndarray]] = {}
    for split in SPLITS:
      arrays = []
      for shard in meta["splits"][split]["shards"]:
        path = os.path.join(directory, shard["file"])
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size != shard["tokens"] * dtype.itemsize:
          raise DataError(f"{path} is missing or truncated ({size} bytes, expected "
                          f"{shard['tokens'] * dtype.itemsize}); prepare the corpus again")
        if shard["tokens"]:
          arrays.append(np.memmap(path, dtype=dtype, mode="r"))
      self.maps[split] = arrays
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

  def window(self, rng: np.random.Generator, length: int, split: str) -> np.ndarray:
    """length + 1 consecutive tokens (int32) from a random place in `split` (shards weighted by size)."""
    arrays = [a for a in self.maps[split] if len(a) > length]
    sizes = np.array([len(a) - length for a in arrays], np.float64)
    a = arrays[0] if len(arrays) == 1 else arrays[int(rng.choice(len(arrays), p=sizes / sizes.sum()))]
    start = int(rng.integers(0, len(a) - length))
    return np.asarray(a[start:start + length + 1], np.int32)


def verify(directory: str) -> dict:
  """Recompute every shard's sha256 and compare with meta.json; DataError on the first mismatch."""
  meta = read_meta(directory)
  TextData(directory)  # sizes
  for split in SPLITS:
    for shard in meta["splits"][split]["shards"]:
      if _sha256(os.path.join(directory, shard["file"])) != shard["sha256"]:
        raise DataError(f"{directory}/{shard['file']}: checksum mismatch; prepare the corpus again")
  return meta


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="tokenise text files into a prepared corpus directory")
  p.add_argument("--input", action="append", required=True, help="file or glob (repeatable); "
                 ".jsonl files give one document per line from its 'text' field")
  p.add_argument("--out", required=True, help="directory to create")
  p.add_argument("--tokenizer", default="byte", help="byte | bpe:N | FILE.json (default byte)")
  p.add_argument("--lines", action="store_true", help="one document per line of plain-text files")
  p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out (default 0.05)")
  p.add_argument("--seed", type=int, default=0, help="seed of the document split")
  p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
  p.add_argument("--bos", default=None, help="start-of-document token of a FILE.json tokenizer")
  p.add_argument("--eos", default=None, help="end-of-document token of a FILE.json tokenizer")
  v = sub.add_parser("verify", help="check a prepared directory's shards against meta.json")
  v.add_argument("directory")
  args = parser.parse_args(argv)
  try:
    if args.command == "verify":
      meta = verify(args.directory)
      print(f"{args.directory}: ok ({meta['splits']['train']['tokens']} train, "
            f"{meta['splits']['val']['tokens']} val tokens)")
      return 0
    if args.shard_tokens < 2:
      raise DataError(f"--shard-tokens {args.shard_tokens} is not allowed; allowed: >= 2")
    meta = prepare(args.input, args.out, tokenizer=args.tokenizer, lines=args.lines,
                   val_fraction=args.val_fraction, seed=args.seed, shard_tokens=args.shard_tokens,
                   bos=args.bos, eos=args.eos)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sp = meta["splits"]
  print(f"{args.out}: vocabulary {meta['tokenizer']['vocab_size']} ({meta['tokenizer']['kind']}); "
        f"train {sp['train']['documents']} documents, {sp['train']['tokens']} tokens; "
        f"val {sp['val']['documents']} documents, {sp['val']['tokens']} tokens")
  return 0


if __name__ == "__main__":
  sys.exit(main())
