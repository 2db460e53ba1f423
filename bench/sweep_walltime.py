"""Wall time of whole sweeps (train + evaluate + report for every trial) and trials per hour.

  python -m bench.sweep_walltime [--sweeps smoke,default] [--parallel 1] [--keep DIR]
      [--trials NAME,NAME] [--no-cache] [--note "..."] [--dry-run]

Each sweep runs from scratch with W&B offline, as `make run` does, in a temporary directory, or in
DIR/SWEEP (which must not exist yet) with `--keep`, to read its report afterwards. `--trials` runs only
those trials of the sweep (a subset, to compare settings on a busy machine); `--no-cache` turns JAX's
persistent compilation cache off (JAX_ENABLE_COMPILATION_CACHE=false), so that every trial compiles
its programs itself. Besides the wall time it records the CPU time of the trials (user + system,
all processes) and the machine's load average before and after, since a shared machine's wall time
depends on the others' work.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench.results import intro, parser, record, table
from sweeps.status import trial_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def run(sweep: str, parallel: int, keep: str | None = None, trials: list[str] | None = None,
        cache: bool = True) -> dict:
  if keep and os.path.exists(os.path.join(keep, sweep)):
    sys.exit(f"error: {os.path.join(keep, sweep)} exists; --keep needs a fresh directory")
  with tempfile.TemporaryDirectory() as scratch:
    tmp = keep or scratch
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": tmp}
    if not cache:
      env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    load0, cpu0, start = os.getloadavg()[0], _cpu_s(), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sweeps", "--config", f"configs/sweeps/{sweep}.py",
                          "--workdir", tmp, f"--parallel={parallel}"]
                         + [f"--trial={t}" for t in trials or ()], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall, cpu, load1 = time.perf_counter() - start, _cpu_s() - cpu0, os.getloadavg()[0]
    index = json.load(open(os.path.join(tmp, sweep, "sweep.json")))
    names = trials or [t["name"] for t in index["trials"]]
    statuses = [trial_record(os.path.join(tmp, sweep, n))["status"] for n in names]
  return {"sweep": sweep, "wall_s": wall, "cpu_s": cpu, "trials": len(statuses),
          "done": statuses.count("done"), "exit": out.returncode, "cache": cache,
          "load": f"{load0:.1f} → {load1:.1f}", "subset": bool(trials),
          "what": what_trials_do([t["config"] for t in index["trials"] if t["name"] in names])}


def what_trials_do(configs: list[dict]) -> str:
  """One sentence on what the sweep's trials run, from their configs."""
  trained = [c for c in configs if c["train"]["steps"] > 0]
  halting = [c for c in trained if c["eval"]["halting"]]
  vmapped = [c for c in configs if c["train"]["steps"] == 0 and c["eval"].get("vmap_trials")]
  parts = [f"{len(trained)} of the {len(configs)} trials train" if 0 < len(trained) < len(configs) else
           "every trial trains" if trained else "every trial is a random-init control (no training)",
           "each evaluates its fixed points"]
  if halting:
    parts.append(f"{'every trained trial' if len(halting) == len(trained) else f'{len(halting)} trials'} "
                 "measures adaptive halting (`eval.halting`)")
  if vmapped:
    parts.append(f"{len(vmapped)} random-init controls run vmapped in groups (`eval.vmap_trials`)")
  return "; ".join(parts) + "."


def main() -> None:
  p = parser(__doc__, sweeps="smoke,default", parallel=1,
             keep=(None, "run in DIR/SWEEP and keep it (default: a temporary dir)"),
             trials=(None, "comma-separated trial names: run only these"))
  p.add_argument("--no-cache", action="store_true", help="without JAX's persistent compilation cache")
  args = p.parse_args()
  trials = args.trials.split(",") if args.trials else None
  rows = []
  for sweep in args.sweeps.split(","):
    row = run(sweep, args.parallel, args.keep, trials, cache=not args.no_cache)
    print(row, flush=True)
    rows.append(row)
  for r in rows:  # one section per sweep and setting, so that each keeps its figures
    what = (f"{r['trials']} of its trials" if r["subset"] else "all trials") + (
        ", compilation cache off" if not r["cache"] else "")
    cmd = (f"python -m bench.sweep_walltime --sweeps {r['sweep']} --parallel {args.parallel}"
           + (f" --trials {args.trials}" if trials else "") + (" --no-cache" if not r["cache"] else ""))
    lines = [f"## Sweep wall time: `{r['sweep']}` ({what}), --parallel {args.parallel}", "",
             intro(cmd, f"; load average {r['load']} (start → end). {r['what'][0].upper() + r['what'][1:]}"
                   " CPU time: user + system of all the sweep's processes.", args.note), "",
             *table(["sweep", "trials (done)", "wall time", "CPU time", "trials per hour", "exit status"],
                    [[r["sweep"], f"{r['trials']} ({r['done']})", f"{r['wall_s'] / 60:.1f} min",
                      f"{r['cpu_s'] / 60:.1f} min", f"{3600 * r['trials'] / r['wall_s']:.0f}", r["exit"]]])]
    name = f"sweep_walltime_{r['sweep']}_p{args.parallel}" + ("_subset" if trials else "") + (
        "_nocache" if not r["cache"] else "")
    record(name, lines, args.dry_run)


if __name__ == "__main__":
  main()
