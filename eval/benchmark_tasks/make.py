"""`python -m eval.benchmark_tasks.make --data data/shakespeare`: the data files of the project's own
benchmark tasks (`python -m eval benchmarks`), written beside their YAML in eval/benchmark_tasks/.

Both are built from the held-out plays of the prepared Shakespeare corpus (`make shakespeare`: the
val split, the two plays its seeded shuffle holds out of training), deterministically (seed 0), so
the committed JSONL files can be made again and compared:

- `shakespeare_next_line.jsonl`: a few lines of a play (speaker names included) as the context; the
  true next line among 3 distractors, other spoken lines of the held-out plays of about the same
  length (within 15 %, at least 100 lines away), so that a model must know what follows rather
  than which line is shorter;
- `random_bytes_choice.jsonl`: the same kind of context; the true next line (short, ASCII) among 3
  strings of as many random printable ASCII bytes (0x20-0x7e). A model trained on text scores near
  1, one at initialisation near chance (1/4): a check that the bridge scores what the model knows.

Every line: {"context", "choices", "answer" (the index of the true line), "play", "line"}.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
from absl import flags

from rundir.cli import run
from tasks import DataError
from tasks.text import TextData

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
CHOICES = 4
_SPEAKER = re.compile(r"^\s*(?:[A-Z][\w'&,-]*\s*)+\.\s*$")  # "BOYET. ", "First Musician."

_DATA = flags.DEFINE_string("data", "data/shakespeare", "The prepared Shakespeare corpus (make "
                            "shakespeare); its val split is read.")
_OUT = flags.DEFINE_string("out", HERE, "Where to write the JSONL files.")
_NEXT_LINE = flags.DEFINE_integer("next-line-items", 200, "Items of shakespeare_next_line.")
_RANDOM = flags.DEFINE_integer("random-bytes-items", 100, "Items of random_bytes_choice.")


def held_out_documents(data: str) -> list[str]:
  """The documents of the corpus's val split (between each BOS and EOS), as text."""
  if not os.path.isfile(os.path.join(data, "meta.json")):
    raise DataError(f"--data {data} holds no prepared corpus (make shakespeare)")
  corpus = TextData(data)
  if "val" not in corpus.maps or not corpus.tokens("val"):
    raise DataError(f"--data {data} has no held-out (val) documents")
  tok = corpus.tokenizer()
  ids = np.concatenate([np.asarray(a) for a in corpus.maps["val"]])
  ends = np.flatnonzero(ids == tok.eos_id)
  docs, start = [], 0
  for end in ends:
    doc = ids[start:end]
    docs.append(tok.decode(doc[1:] if tok.bos_id is not None and len(doc) and doc[0] == tok.bos_id
                           else doc))
    start = end + 1
  return docs


def spoken(line: str) -> bool:
  """A line of speech: not a speaker's name, a stage direction or a heading."""
  text = line.strip()
  return (bool(text) and not _SPEAKER.match(line) and not text.startswith(("[", "ACT", "SCENE"))
          and any(c.islower() for c in text))


def context_before(lines: list[str], i: int, max_chars: int = 300, min_lines: int = 3) -> str | None:
  """The lines before line i (at least `min_lines` non-empty ones, at most `max_chars`), each
  ended by a newline; None where there are not enough."""
  picked, chars, nonempty = [], 0, 0
  for j in range(i - 1, -1, -1):
    if chars + len(lines[j]) + 1 > max_chars:
      break
    picked.append(lines[j])
    chars += len(lines[j]) + 1
    nonempty += bool(lines[j].strip())
  if nonempty < min_lines:
    return None
  return "".join(line + "\n" for line in reversed(picked)).lstrip("\n")


def candidates(docs: list[str], lo: int, hi: int, ascii_only: bool = False) -> list[tuple]:
  """(play, line index, the line, its context) of every spoken line of lo..hi characters."""
  out = []
  for d, doc in enumerate(docs):
    lines = [line.rstrip() for line in doc.splitlines()]
    for i, line in enumerate(lines):
      if not (spoken(line) and lo <= len(line) <= hi) or (ascii_only and not line.isascii()):
        continue
      context = context_before(lines, i)
      if context:
        out.append((d, i, line, context))
  return out


def item(rng: np.random.Generator, truth: tuple, distractors: list[str]) -> dict:
  """One multiple-choice line: the true line at a random place among the distractors."""
  play, i, line, context = truth
  answer = int(rng.integers(CHOICES))
  choices = list(distractors)
  choices.insert(answer, line)
  return {"context": context, "choices": choices, "answer": answer, "play": play, "line": i}


def next_line_items(docs: list[str], n: int, seed: int = SEED) -> list[dict]:
  """`n` items of shakespeare_next_line (see the module docstring)."""
  rng = np.random.default_rng(seed)
  pool = candidates(docs, 20, 70)
  lines = [(d, i, line) for d, i, line, _ in pool]
  out = []
  for k in rng.permutation(len(pool))[:n]:
    d, i, line, _ = pool[k]
    near = [x for x in lines if abs(len(x[2]) - len(line)) <= max(3, 0.15 * len(line))
            and x[2] != line and (x[0] != d or abs(x[1] - i) >= 100)]
    if len({x[2] for x in near}) < CHOICES - 1:
      continue
    picked: list[str] = []
    for j in rng.permutation(len(near)):
      if near[j][2] not in picked:
        picked.append(near[j][2])
      if len(picked) == CHOICES - 1:
        break
    out.append(item(rng, pool[k], picked))
  return out


def random_bytes_items(docs: list[str], n: int, seed: int = SEED + 1) -> list[dict]:
  """`n` items of random_bytes_choice (see the module docstring)."""
  rng = np.random.default_rng(seed)
  pool = candidates(docs, 16, 32, ascii_only=True)
  out = []
  for k in rng.permutation(len(pool))[:n]:
    size = len(pool[k][2])
    picked = [bytes(rng.integers(0x20, 0x7f, size).astype(np.uint8)).decode("ascii")
              for _ in range(CHOICES - 1)]
    out.append(item(rng, pool[k], picked))
  return out


def write_jsonl(file: str, items: list[dict]) -> str:
  """Write the items, one JSON object a line; returns the file's sha256."""
  text = "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in items)
  with open(file, "w", encoding="utf-8") as f:
    f.write(text)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def main(argv: list[str]) -> int:
  del argv
  docs = held_out_documents(_DATA.value)
  os.makedirs(_OUT.value, exist_ok=True)
  for name, items in (("shakespeare_next_line", next_line_items(docs, _NEXT_LINE.value)),
                      ("random_bytes_choice", random_bytes_items(docs, _RANDOM.value))):
    file = os.path.join(_OUT.value, f"{name}.jsonl")
    digest = write_jsonl(file, items)
    print(f"{file}: {len(items)} items, sha256 {digest}")
  return 0


if __name__ == "__main__":
  run(main)
