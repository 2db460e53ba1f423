"""Wall time of whole sweeps (train + evaluate + report for every trial) and trials per hour.

  python -m bench.sweep_walltime [--sweeps smoke,default] [--parallel 1] [--keep DIR]

Each sweep runs from scratch with W&B offline, as `make run` does, in a temporary directory, or in
DIR/SWEEP (which must not exist yet) with `--keep`, to read its report afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.results import machine, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(sweep: str, parallel: int, keep: str | None = None) -> dict:
  if keep and os.path.exists(os.path.join(keep, sweep)):
    sys.exit(f"error: {os.path.join(keep, sweep)} exists; --keep needs a fresh directory")
  with tempfile.TemporaryDirectory() as scratch:
    tmp = keep or scratch
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": tmp}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sweeps", "--config", f"configs/sweeps/{sweep}.py",
                          "--workdir", tmp, f"--parallel={parallel}"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    index = json.load(open(os.path.join(tmp, sweep, "sweep.json")))
    statuses = [json.load(open(os.path.join(tmp, sweep, t["name"], "trial.json")))["status"]
                for t in index["trials"]]
  return {"sweep": sweep, "wall_s": wall, "trials": len(statuses), "done": statuses.count("done"),
          "exit": out.returncode}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--sweeps", default="smoke,default")
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--keep", default=None, help="run in DIR/SWEEP and keep it (default: a temporary dir)")
  args = p.parse_args()
  rows = []
  for sweep in args.sweeps.split(","):
    row = run(sweep, args.parallel, args.keep)
    print(row, flush=True)
    rows.append(row)
  for r in rows:  # one section per sweep, so that sweeps measured separately keep their figures
    lines = [f"## Sweep wall time: `{r['sweep']}` (train + evaluate + report), --parallel {args.parallel}",
             "", f"Machine: {machine()}. `python -m bench.sweep_walltime --sweeps {r['sweep']} "
             f"--parallel {args.parallel}`. Each trial trains, evaluates its fixed points and, with "
             f"`eval.halting` (the default), what adaptive halting saves.", "",
             "| sweep | trials (done) | wall time | trials per hour | exit status |",
             "| --- | --- | --- | --- | --- |",
             f"| {r['sweep']} | {r['trials']} ({r['done']}) | {r['wall_s'] / 60:.1f} min | "
             f"{3600 * r['trials'] / r['wall_s']:.0f} | {r['exit']} |"]
    write_section(f"sweep_walltime_{r['sweep']}_p{args.parallel}", "\n".join(lines))


if __name__ == "__main__":
  main()
