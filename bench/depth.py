"""Depth that pays, and per-token exit that turns it into decode speed, on a run trained on a corpus
with classes (e.g. configs/lm_reasoning.py on `make reasoning`): `eval.depth.compare`, written as
JSON, three figures and a bench/RESULTS.md section.

  python -m bench.depth --workdir runs/reasoning --out depth.json [--windows 256] [--prose 32]
      [--iterations 16] [--batch-sizes 1,8] [--cache exact] [--grids 'fixed_point=1e-2,1e-3;kl=1e-4']
      [--section depth] [--dry-run]

The JSON holds at least {"r_small", "fixed": {"answer_accuracy", "tokens_per_s": {"1", "8"}},
"adaptive": {"criterion", "threshold", "answer_accuracy", "mean_iterations", "tokens_per_s"}}
(tokens/s keyed by batch size), and every criterion's grid on the calibration half with its chosen
threshold on the held-out half. Figures beside the JSON: `*_accuracy.png` (answer accuracy against
fixed iterations, one line per step count, longer problems than trained dashed),
`*_iterations.png` (mean iterations per token by class and step count, fixed R_small, the
adaptive setting and the oracle), `*_pareto.png` (answer accuracy against mean iterations for
every criterion's thresholds, calibration half).
"""

from __future__ import annotations

import json
import os

import numpy as np

from bench.results import command, intro, parser, record, table
from eval import plots
from eval.classes import plot_accuracy
from eval.depth import compare
from eval.halting_rows import check_grids
from rundir.run import open_run
from rundir.workdir import path
from tasks.text import TextData


def plot_iterations(rec: dict, png: str) -> str:
  """Mean iterations per token by class: fixed R_small, the adaptive setting and the oracle."""
  fixed, adaptive = rec["fixed"]["by_class"], (rec["adaptive"] or {}).get("by_class", {})
  names = list(fixed)
  x = np.arange(len(names))
  fig, ax = plots.plt.subplots(figsize=(7, 3.5))
  ax.bar(x - 0.2, [fixed[n] for n in names], 0.4, label=f"fixed R_small = {rec['r_small']}",
         color="0.7")
  if adaptive:
    a = rec["adaptive"]
    ax.bar(x + 0.2, [adaptive.get(n, np.nan) for n in names], 0.4,
           label=f"exit {a['criterion']}:{a['threshold']:g}")
  ax.set_xticks(x, [n.replace("answer_", "answer, ") + (" steps" if n.startswith("answer") else "")
                    for n in names], rotation=30, ha="right")
  ax.set(title="Block iterations per token by class (held-out half)", ylabel="mean iterations")
  ax.legend()
  return plots.save(fig, png, formats=("png",))


def plot_pareto(rec: dict, png: str) -> str:
  """Answer accuracy against mean iterations per token, every criterion's grid (calibration)."""
  fig, ax = plots.plt.subplots(figsize=(6, 4))
  crits = list(rec["criteria"])
  for c, color in zip(crits, plots.colors(len(crits))):
    rows = sorted(rec["criteria"][c]["grid"], key=lambda r: r["mean_iterations"])
    ax.plot([r["mean_iterations"] for r in rows], [r["answer_accuracy"] for r in rows], "o-",
            color=color, label=c, ms=3)
  cal = rec["fixed"]["calibration"]
  ax.plot([cal["mean_iterations"]], [cal["answer_accuracy"]], "k*", ms=10,
          label=f"fixed R_small = {rec['r_small']}")
  ax.set(title="Exit criteria on the calibration half", xlabel="mean iterations per token",
         ylabel="answer accuracy (%)")
  ax.legend(fontsize=7)
  return plots.save(fig, png, formats=("png",))


def speed(x: float | None) -> str:
  return "—" if x is None else f"{x:,.0f}"


def section(rec: dict, cmd: str, title: str) -> str:
  fixed, a = rec["fixed"], rec["adaptive"]
  acc = rec["accuracy_by_iterations"]
  first = next(iter(acc["splits"].values()))["answer_accuracy"]["all"]
  lines = [f"## Depth that pays: {title}", "", intro(cmd), "",
           f"Answer accuracy (mean over step counts, held-out problems) at fixed R = 1..{rec['iterations']}: "
           + ", ".join(f"{v:.1f}" for v in first) + f". R_small = {rec['r_small']} (the fewest "
           f"iterations within 1 point of the best); at R = 2: {first[1]:.1f}, at R_small: "
           f"{first[rec['r_small'] - 1]:.1f}.", ""]
  rows = [["fixed R_small", "—", f"{fixed['answer_accuracy']:.1f}", f"{fixed['mean_iterations']:.2f}",
           *[speed(fixed["tokens_per_s"].get(b)) for b in rec["batch_sizes"]], "1.00×"]]
  for c, v in rec["criteria"].items():
    h = v["held_out"]
    if h is None:
      rows.append([c, "none within tolerance", "—", "—", *["—"] * len(rec["batch_sizes"]), "—"])
      continue
    rows.append([c, f"{v['threshold']:g}", f"{h['answer_accuracy']:.1f}", f"{h['mean_iterations']:.2f}",
                 *[speed(h["tokens_per_s"]) if b == rec["batch_sizes"][-1] else "—"
                   for b in rec["batch_sizes"]],
                 f"{fixed['flops'] / h['flops']:.2f}×" if h["flops"] else "—"])
  lines += [f"Decoding {rec['windows']['problem']} held-out problem windows and {rec['windows']['prose']} "
            f"prose windows, teacher forced, cache `{rec['cache']}`; thresholds chosen on the "
            f"calibration half (fewest iterations within {rec['tolerance_points']} point of fixed "
            "R_small's answer accuracy there), figures of the held-out half:", "",
            *table(["setting", "threshold", "answer acc. (%)", "mean it.",
                    *[f"tokens/s, batch {b}" for b in rec["batch_sizes"]], "FLOPs saved ×"], rows), ""]
  if a:
    ratios = {b: a["tokens_per_s"][b] / fixed["tokens_per_s"][b] for b in a["tokens_per_s"]}
    lines.append(f"Adaptive (the criterion with the fewest calibration iterations): `{a['criterion']}:"
                 f"{a['threshold']:g}`, {a['mean_iterations']:.2f} iterations per token against "
                 f"{rec['r_small']}, answer accuracy {a['answer_accuracy']:.1f} against "
                 f"{fixed['answer_accuracy']:.1f}; decode tokens/s "
                 + ", ".join(f"batch {b}: {speed(a['tokens_per_s'][b])} vs {speed(fixed['tokens_per_s'][b])}"
                             f" ({ratios[b]:.2f}×)" for b in ratios) + ".")
  else:
    lines.append("No criterion keeps answer accuracy within tolerance on the calibration half.")
  lines += ["", "Mean iterations per token by class (held-out half): "
            + "; ".join(f"{k}: fixed {v:.1f}" + (f", adaptive {a['by_class'][k]:.2f}" if a and k in
                                                 a["by_class"] else "")
                        for k, v in fixed["by_class"].items())
            + f"; oracle mean at R_small {fixed['oracle_mean_iterations']:.2f}."]
  return "\n".join(lines)


def main() -> None:
  p = parser(__doc__, "depth", note=False, out=None, windows=256, prose=32, iterations=16,
             cache="exact", title="", grids=("", "CRITERION=T1,T2;... (default: every criterion's "
                                             "grid of eval/halting_rows.py)"),
             **{"batch-sizes": "1,8"})
  p.add_argument("--workdir", required=True)
  args = p.parse_args()
  if args.out and path(args.out).exists():
    raise SystemExit(f"error: --out {args.out} exists; it is not overwritten (choose another name)")
  grids = None
  if args.grids:
    grids = {c: tuple(float(t) for t in ts.split(",")) for c, _, ts in
             (item.partition("=") for item in args.grids.split(";"))}
  grids = check_grids(grids)
  run = open_run(args.workdir)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  rec = compare(run, TextData(run.cfg.task.path), windows=args.windows, prose=args.prose,
                iterations=args.iterations, batch_sizes=batch_sizes, cache=args.cache, grids=grids)
  rec["batch_sizes"] = [str(b) for b in batch_sizes]
  out = args.out or os.path.join(args.workdir, f"depth_{run.step}.json")
  stem = os.path.splitext(out)[0]
  with open(out, "w") as f:
    json.dump(rec, f, indent=1)
  plot_accuracy({**rec["accuracy_by_iterations"], "r_small": rec["r_small"]}, stem + "_accuracy.png")
  plot_iterations(rec, stem + "_iterations.png")
  plot_pareto(rec, stem + "_pareto.png")
  cmd = command("bench.depth", args, "workdir", "windows", "prose", "iterations", "cache", "grids")
  title = args.title or f"`{run.cfg.task.path}`, step {run.step}"
  record(args.section, [section(rec, cmd, title)], args.dry_run)
  print(f"see {out}")


if __name__ == "__main__":
  main()
