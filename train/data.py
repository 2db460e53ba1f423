"""Text corpora for training: tokenise once into flat token shards, then read random windows.

  python -m train.data prepare --input 'texts/*.txt' [--input more.jsonl] [--lines] \
      [--tokenizer byte|bpe:N|FILE.json] [--val-fraction 0.05] [--seed 0] --out DIR
  python -m train.data verify DIR       # re-checks every shard's size and sha256 against meta.json

The format is described in tasks/text.py; the preparation in tasks/corpus.py.
"""

from __future__ import annotations

import argparse
import sys

from tasks import DataError
from tasks.corpus import prepare
from tasks.text import verify


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
