"""The halting evaluation's outputs: halting.json and plots/halting_pareto.png under eval/STEP/,
and the rows, the plot and the flat summary logged once to the run's W&B run."""

from __future__ import annotations

import os

import numpy as np

from eval.driver import Evaluation
from eval.halting_rows import flat_summary
from eval.plots import FORMATS, plt, save
from looped_models.halting import LOOP_CRITERIA
from rundir.workdir import path, write_json_atomic


def write_outputs(ev: Evaluation, result: dict, log_wandb: bool,
                  formats: tuple[str, ...] = FORMATS) -> None:
  """halting.json and the Pareto plot (eval/STEP/: a trial's and the CLI's never collide), then W&B."""
  outdir = ev.output_dir("halting.json")
  path(outdir).joinpath("plots").mkdir(parents=True, exist_ok=True)
  metric = result["summary"]["metric"]
  plot = pareto_plot(result["rows"], result["fixed"], result["oracle"], result["fixed_curve"],
                     os.path.join(outdir, "plots", "halting_pareto.png"), metric, formats)
  write_json_atomic(os.path.join(outdir, "halting.json"), result)
  if log_wandb:
    cols = ["criterion", "threshold", "mean_iterations", "max_iterations", "exact_match",
            "per_position", "flops", "wall_s", "batch_flops", "batch_wall_s"]
    ev.publish(tables={"halting/rows": (cols, [[r.get(c) for c in cols] for r in result["rows"]])},
               images={"halting/plots/pareto": plot}, summary=flat_summary(result["summary"]))


def pareto_plot(rows: list[dict], fixed: dict, oracle: dict, curve: list[float], path: str,
                metric: str = "exact_match", formats: tuple[str, ...] = FORMATS) -> str:
  """Accuracy (`metric`) on the mix against mean iterations per token: one line per criterion, the
  oracle, and fixed-iteration inference at every r (R_fixed marked)."""
  fig, ax = plt.subplots(figsize=(6.8, 4.4))
  r = np.arange(1, len(curve) + 1)
  ax.plot(r, curve, color="0.6", lw=1, label="fixed r")
  ax.scatter([fixed["threshold"]], [fixed[metric]], color="0.2", marker="s", zorder=4,
             label=f"fixed at R_fixed={fixed['threshold']}")
  for criterion in LOOP_CRITERIA:
    pts = sorted((x["mean_iterations"], x[metric]) for x in rows if x["criterion"] == criterion)
    if pts:
      ax.plot(*zip(*pts), marker="o", ms=4, label=criterion)
  ax.scatter([oracle["mean_iterations"]], [oracle[metric]], marker="*", s=140, color="k",
             zorder=5, label="oracle")
  if oracle.get("causal_mean_iterations"):
    ax.scatter([oracle["causal_mean_iterations"]], [oracle[metric]], marker="*", s=140,
               facecolors="none", edgecolors="k", zorder=5, label="oracle, causal order")
  label = {"exact_match": "exact match", "per_position": "next-token accuracy"}[metric]
  ax.set(xscale="log", xlabel="mean iterations per token", ylabel=f"{label} (mix of all lengths)",
         title="Adaptive halting: accuracy against iterations")
  ax.legend(fontsize=8)
  return save(fig, path, formats)
