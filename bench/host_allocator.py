"""The reference configuration's train step with glibc's default allocator settings and with the
framework's (rundir/host.py), each in its own process, in alternating rounds.

  python -m bench.host_allocator [--rounds 2] [--repeats 8] [--warmup 3] [--dry-run]

Each process compiles the train step of bench/reference_speed.py, runs `--warmup` calls, then times
`--repeats` calls and counts the minor page faults of each. Writes the medians to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from bench.reference_speed import batch_of, interleaved, reference_config, train_caller
from bench.results import command, intro, parser, record, table
from rundir.host import ENV


def child(repeats: int, warmup: int) -> None:
  c = reference_config()
  seconds, faults = interleaved({"train": train_caller(c, batch_of(c.model.vocab_size))}, repeats,
                                warmup, medians=False)
  print(json.dumps({"seconds": seconds["train"], "faults": faults["train"]}))


def main() -> None:
  args = parser(__doc__, "host_allocator", rounds=2, repeats=8, warmup=3,
                child=(False, argparse.SUPPRESS)).parse_args()
  if args.child:
    return child(args.repeats, args.warmup)
  runs = {"system": [], "tuned": []}
  for r in range(args.rounds):
    for allocator in runs:
      out = subprocess.run([sys.executable, "-m", "bench.host_allocator", "--child", "--repeats",
                            str(args.repeats), "--warmup", str(args.warmup)], check=True, text=True,
                           capture_output=True, env={**os.environ, ENV: allocator}).stdout
      runs[allocator].append(json.loads(out.strip().splitlines()[-1]))
      print(allocator, f"round {r + 1}:", runs[allocator][-1], flush=True)
  med = {a: (float(np.median([s for run in v for s in run["seconds"]])),
             float(np.median([f for run in v for f in run["faults"]]))) for a, v in runs.items()}
  rounds = "; ".join(f"{a} " + ", ".join(f"{np.median(run['seconds']):.2f}" for run in v)
                     for a, v in runs.items())
  body = ["## Host allocator: the reference train step (r = 8, batch 8 × 256, float32)", "",
          intro(command("bench.host_allocator", args, "rounds", "repeats", "warmup"),
                ": one process per allocator setting and round, alternating; medians over all timed "
                "calls.", args.note), "",
          *table(["allocator", "seconds per step", "minor page faults per step", "speed"],
                 [[f"glibc defaults (`{ENV}=system`)", f"{med['system'][0]:.3f}",
                   f"{med['system'][1]:,.0f}", "1.00×"],
                  ["one arena, no mmap, no trim (rundir/host.py)", f"{med['tuned'][0]:.3f}",
                   f"{med['tuned'][1]:,.0f}", f"{med['system'][0] / med['tuned'][0]:.2f}×"]]), "",
          f"Per-round medians (s): {rounds}."]
  record(args.section, body, args.dry_run)


if __name__ == "__main__":
  main()
