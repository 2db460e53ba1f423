"""Compile time of the train step at r = 4 and r = 64 (the block is a scan, so it should not grow with r).

  python -m bench.compile_time [--recurrences 4,64] [--repeats 2] [--section compile_time] [--dry-run]

The model of `bench.reference_speed` (d = 256, (2, 4⊗r, 2), batch 8 × 256); the step is lowered and
compiled (never run) as the trainer compiles it: a traced number of iterations up to r. The values of r
are compiled in interleaved rounds and the fastest of each is kept (on a shared machine the load only
ever adds time).
"""

from __future__ import annotations

import time

from bench.reference_speed import batch_of, reference_config, train_caller
from bench.results import command, intro, parser, record, table


def main() -> None:
  args = parser(__doc__, "compile_time", recurrences="4,64", repeats=2).parse_args()
  c = reference_config()
  batch = batch_of(c.model.vocab_size)
  rs = [int(r) for r in args.recurrences.split(",")]
  train_caller(c, batch, rs[0])  # the first compile also pays for process-wide warm-up
  times = {r: float("inf") for r in rs}
  for _ in range(args.repeats):
    for r in rs:
      t0 = time.perf_counter()
      train_caller(c, batch, r)
      times[r] = min(times[r], time.perf_counter() - t0)
      print(f"r = {r}: {time.perf_counter() - t0:.1f} s", flush=True)
  lines = ["## Train-step compile time against r (reference configuration)", "",
           intro(command("bench.compile_time", args, "recurrences", "repeats"),
                 f" (lower + compile + initialise, after one untimed compile; the fastest of "
                 f"{args.repeats} interleaved rounds).", args.note), "",
           *table(["r", "compile (s)"], [[r, f"{t:.1f}"] for r, t in times.items()]),
           "", f"r = {rs[-1]} over r = {rs[0]}: {times[rs[-1]] / times[rs[0]]:.2f} (target ≤ 1.3)."]
  record(args.section, lines, args.dry_run)


if __name__ == "__main__":
  main()
