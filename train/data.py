"""Text corpora for training: tokenise once into flat token shards, then read random windows.

  python -m train.data prepare --input 'texts/*.txt' [--input more.jsonl] [--lines] \
      [--tokenizer byte|bpe:N|FILE.json] [--val-fraction 0.05] [--seed 0] --out DIR \
      [--synthetic var_chain:hops=1-8,extrapolate=9-12 [--synthetic-ratio 0.5]]
  python -m train.data verify DIR       # re-checks every shard's size and sha256 against meta.json

The format is described in tasks/text.py; the preparation in tasks/corpus.py; the generated
problems of `--synthetic` and their per-token classes in tasks/reasoning.py. Bad input: one line on
stderr, exit status 2 (rundir/cli.py).
"""

from __future__ import annotations

from absl import flags

from rundir.cli import command, require, run
from tasks import DataError
from tasks.corpus import prepare
from tasks.text import verify

COMMANDS = {"prepare": [], "verify": ["DIR"]}

_INPUT = flags.DEFINE_multi_string("input", None, "prepare: file or glob (repeatable); .jsonl files "
                                   "give one document per line from its 'text' field.")
_OUT = flags.DEFINE_string("out", None, "prepare: the directory to create.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "prepare: byte | bpe:N | FILE.json.")
_LINES = flags.DEFINE_bool("lines", False, "prepare: one document per line of plain-text files.")
_VAL_FRACTION = flags.DEFINE_float("val-fraction", 0.05, "prepare: share of documents held out.")
_SEED = flags.DEFINE_integer("seed", 0, "prepare: seed of the document split.")
_SHARD_TOKENS = flags.DEFINE_integer("shard-tokens", 1 << 28, "prepare: tokens per shard file.")
_BOS = flags.DEFINE_string("bos", None, "prepare: start-of-document token of a FILE.json tokenizer.")
_EOS = flags.DEFINE_string("eos", None, "prepare: end-of-document token of a FILE.json tokenizer.")
_SYNTHETIC = flags.DEFINE_string("synthetic", None, "prepare: generated problems mixed into the "
                                 "prose, FAMILY[:KEY=VALUE,...], e.g. var_chain:hops=1-8,"
                                 "extrapolate=9-12 (tasks/reasoning.py); adds per-token classes.")
_SYNTHETIC_RATIO = flags.DEFINE_float("synthetic-ratio", None, "prepare: share of the text that is "
                                      "problems, 0 <= r < 1 (default 0.5).")


def main(argv: list[str]) -> int:
  name, args = command(argv, COMMANDS)
  if name == "verify":
    meta = verify(args[0])
    print(f"{args[0]}: ok ({meta['splits']['train']['tokens']} train, "
          f"{meta['splits']['val']['tokens']} val tokens)")
    return 0
  require(_INPUT, _OUT)
  if _SHARD_TOKENS.value < 2:
    raise DataError(f"--shard-tokens {_SHARD_TOKENS.value} is not allowed; allowed: >= 2")
  meta = prepare(_INPUT.value, _OUT.value, tokenizer=_TOKENIZER.value, lines=_LINES.value,
                 val_fraction=_VAL_FRACTION.value, seed=_SEED.value, shard_tokens=_SHARD_TOKENS.value,
                 bos=_BOS.value, eos=_EOS.value, synthetic=_SYNTHETIC.value,
                 synthetic_ratio=_SYNTHETIC_RATIO.value)
  sp = meta["splits"]
  splits = [f"{s} {sp[s]['documents']} documents, {sp[s]['tokens']} tokens"
            + (f" ({sp[s]['problems']} problems)" if "problems" in sp[s] else "") for s in sp]
  print(f"{_OUT.value}: vocabulary {meta['tokenizer']['vocab_size']} ({meta['tokenizer']['kind']}); "
        + "; ".join(splits))
  return 0


if __name__ == "__main__":
  run(main)
