"""The pod presets compiled for the TPU slices they name (python -m train.aot), trial by trial.

  .venv-tpu/bin/python -m bench.aot_presets [--preset configs/sweeps/tpu_pod.py]
      [--topologies v5e-256,v5p-128] [--trials NAME,...] [--vocab 65536] [--set KEY=VALUE,...]
      [--section aot_presets] [--dry-run]

For each topology and each trial of the preset (or the named ones), the training step is compiled
for the slice (no TPU attached: libtpu in .venv-tpu, make tpu-setup) and the row gives the mesh, the
HBM per chip it needs against the chip's, the model TFLOPs per step, the roofline bounds on tokens/s
per chip and MFU, and the compile time on this machine. A row that does not fit says which setting
to change and by how much. The section is rewritten with every run's rows (one preset per run).
"""

from __future__ import annotations

from train import tpu

tpu.compile_only_environment()  # before JAX starts: compile on this machine's CPU

import ast  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

from bench.results import intro, parser, record, table  # noqa: E402
from sweeps.expand import expand, load_sweep_module  # noqa: E402
from train import aot  # noqa: E402

HEADER = ["preset", "slice", "trial", "mesh (data×fsdp×tensor)", "HBM per chip (GiB)", "fits",
          "TFLOPs / step", "tokens/s/chip ≤", "MFU ≤", "compile (s)"]


def advice(cfg, report: dict) -> str:
  """What to change so that a training step that does not fit would: more micro-batches (the
  activations shrink with the micro-batch) while they divide each device's rows, else a smaller batch."""
  p = report["programs"]["train_step"]
  hbm, fixed = report["hbm_bytes_per_chip"], p["argument_bytes"]
  if fixed >= hbm:
    return "the state alone exceeds the chip: use more FSDP (mesh.fsdp) or a larger slice"
  factor = math.ceil(p["temp_bytes"] / (0.9 * hbm - fixed)) if 0.9 * hbm > fixed else None
  rows = cfg.train.batch_size // (report["mesh"]["data"] * report["mesh"]["fsdp"])
  accum = cfg.train.grad_accum * (factor or 1)
  while accum <= rows and rows % accum:
    accum += 1
  if factor and accum <= rows:
    return f"train.grad_accum={accum} (from {cfg.train.grad_accum})"
  return f"train.batch_size={cfg.train.batch_size // (factor or 2)} or model.remat=True"


def main() -> None:
  args = parser(__doc__, "aot_presets", preset="configs/sweeps/tpu_pod.py",
                topologies="v5e-256,v5p-128", trials="", vocab=65536,
                set=("", "config overrides KEY=VALUE,... (values as Python literals)")).parse_args()
  module = load_sweep_module(args.preset)
  base = module.get_config()
  base.model.vocab_size = args.vocab  # the corpus need not be here
  for item in filter(None, args.set.split(",")):
    key, value = item.split("=", 1)
    section, name = key.split(".")
    base[section][name] = ast.literal_eval(value)
  trials = [t for t in expand(base, module) if not args.trials or t.name in args.trials.split(",")]
  rows, notes = [], []
  name = os.path.basename(args.preset)
  for topology in args.topologies.split(","):
    for t in trials:
      print(f"{name} {t.name} on {topology} ...", flush=True)
      try:
        report = aot.preflight(t.config, topology, which=("train_step",))
      except aot.ConfigError as e:
        rows.append([name, topology, t.name, "-", "-", "does not shard", "-", "-", "-", "-"])
        notes.append(f"- {name} {t.name} on {topology}: {e}")
        print(notes[-1], flush=True)
        continue
      p = report["programs"]["train_step"]
      mesh = "×".join(str(v) for v in report["mesh"].values())
      gib = f"{p['total_bytes'] / tpu.GiB:.1f} of {report['hbm_bytes_per_chip'] / tpu.GiB:.0f}"
      bound = lambda k, f: "-" if p[k] is None else f.format(p[k])
      rows.append([name, topology, t.name, mesh, gib, "yes" if p["fits"] else "**no**",
                   f"{p['flops'] * report['chips'] / 1e12:.1f}",
                   bound("tokens_per_s_per_chip_upper_bound", "{:,.0f}"),
                   bound("mfu_upper_bound", "{:.0%}"), f"{p['compile_s']:.0f}"])
      if not p["fits"]:
        notes.append(f"- {name} {t.name} on {topology} does not fit: "
                     f"{advice(aot.compile_config(t.config), report)}")
      print(rows[-1], flush=True)
  lines = [f"## Pod presets compiled ahead of time for TPU slices: {name}"
           + (f" with {args.set}" if args.set else ""), "",
           intro(f".venv-tpu/bin/python -m bench.aot_presets --preset {args.preset} "
                 f"--topologies {args.topologies} --vocab {args.vocab}"
                 + (f" --trials {args.trials}" if args.trials else "")
                 + (f" --set {args.set}" if args.set else ""),
                 " (each trial's training step compiled by XLA's TPU compiler for the slice, no TPU "
                 "attached; HBM is the compiler's per-chip total, TFLOPs the model's per step at the "
                 "mean recurrence, the bounds a roofline: see train/aot.py).", args.note), "",
           *table(HEADER, rows), *([""] + notes if notes else [])]
  record(args.section, lines, args.dry_run)


if __name__ == "__main__":
  main()
