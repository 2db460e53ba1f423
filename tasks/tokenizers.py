"""Tokenizers of text corpora: UTF-8 bytes, or a Hugging Face `tokenizers` tokenizer (trained BPE or a
tokenizer.json), each with the UTF-8 byte length of every token id (for bits per byte)."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from tasks import DataError

TOKENIZER_FILE = "tokenizer.json"
# Names of end- and start-of-document tokens in common tokenizer files (first match wins).
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<|im_end|>")
BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|im_start|>")


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
