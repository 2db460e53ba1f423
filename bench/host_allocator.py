"""The reference configuration's train step with glibc's default allocator settings and with the
framework's (rundir/host.py), each in its own process, in alternating rounds.

  python -m bench.host_allocator [--rounds 2] [--repeats 8] [--warmup 3]

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

from rundir.host import ENV


def child(repeats: int, warmup: int) -> None:
  import resource
  import time

  import jax

  from bench.reference_speed import batch_of, reference_config, train_caller
  c = reference_config()
  call = train_caller(c, batch_of(c.model.vocab_size))
  for _ in range(warmup):
    jax.block_until_ready(call())
  seconds, faults = [], []
  for _ in range(repeats):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    jax.block_until_ready(call())
    seconds.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  print(json.dumps({"seconds": seconds, "faults": faults}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--repeats", type=int, default=8)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--note", default="", help="a sentence on the machine's state, for RESULTS.md")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return child(args.repeats, args.warmup)
  from bench.results import machine, write_section
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
          f"Machine: {machine()}. `python -m bench.host_allocator --rounds {args.rounds} --repeats "
          f"{args.repeats} --warmup {args.warmup}`: one process per allocator setting and round, "
          f"alternating; medians over all timed calls. {args.note}".rstrip(), "",
          "| allocator | seconds per step | minor page faults per step | speed |",
          "| --- | --- | --- | --- |",
          f"| glibc defaults (`{ENV}=system`) | {med['system'][0]:.3f} | {med['system'][1]:,.0f} | 1.00× |",
          f"| one arena, no mmap, no trim (rundir/host.py) | {med['tuned'][0]:.3f} | "
          f"{med['tuned'][1]:,.0f} | {med['system'][0] / med['tuned'][0]:.2f}× |", "",
          f"Per-round medians (s): {rounds}."]
  write_section("host_allocator", "\n".join(body))


if __name__ == "__main__":
  main()
