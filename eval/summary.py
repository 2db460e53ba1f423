"""The fixed-point evaluation's summary: flat W&B-filterable fields (fp/*, acc/*, val/*), the
markdown page (fixed_points.md), and a control run's stage metrics to compare against."""

from __future__ import annotations

from typing import Any

import numpy as np

from configs.recurrence import max_recurrence
from eval.fixed_points import FixedPointReport
from rundir import outputs
from rundir.config import is_text
from rundir.workdir import RunDirError, path, read_json


def plateau(acc_R: np.ndarray, tol: float = 1e-9) -> int:
  """The iteration count (1-based) from which accuracy no longer changes up to R."""
  changed = np.nonzero(np.abs(acc_R - acc_R[-1]) > tol)[0]
  return int(changed[-1]) + 2 if len(changed) else 1


def summary_fields(report: FixedPointReport, curves: dict[int, np.ndarray], train_length: int) -> dict:
  """Flat, W&B-filterable summary: fp/* for the analysis, acc/* for the curves."""
  out: dict[str, Any] = {"fp/regime": report.regime,
                         "fp/degeneracy_min_cosine": report.degeneracy_min_cosine,
                         "fp/iterations": report.num_iterations}
  out.update({f"fp/tokens/{k}": v for k, v in report.token_classes.items()})
  out["fp/all_layers_converged"] = all(l.converged for l in report.layers)
  for l in report.layers:
    out[f"fp/layer{l.layer + 1}/converged"] = l.converged
    out[f"fp/layer{l.layer + 1}/converged_at"] = l.converged_at
    out[f"fp/layer{l.layer + 1}/final_change"] = l.final_change
    out[f"fp/layer{l.layer + 1}/contraction_rate"] = l.contraction_rate
  for n, acc in curves.items():
    best = int(np.argmax(acc))
    out[f"acc/len{n}/final"] = float(acc[-1])
    out[f"acc/len{n}/best"] = float(acc[best])
    out[f"acc/len{n}/best_iters"] = best + 1
    out[f"acc/len{n}/plateau_iters"] = plateau(acc)
  out["acc/train_length"] = train_length
  return out


def text_summary_fields(report: FixedPointReport, curves: dict[int, dict], cfg: Any) -> dict:
  """Flat summary of a text run: fp/* for the analysis, val/* for the held-out loss against
  iterations 1..R at the training window (nats per token, bits per byte)."""
  out = summary_fields(report, {}, cfg.task.train_length)
  r_train = max_recurrence(cfg.train)
  for n, c in curves.items():
    prefix = "val/" if n == cfg.task.train_length else f"val/len{n}/"
    loss, bpb = c["loss"], c["bits_per_byte"]
    best = int(np.nanargmin(loss))
    out[f"{prefix}best_loss"] = float(loss[best])
    out[f"{prefix}best_iters"] = best + 1
    out[f"{prefix}best_bits_per_byte"] = float(bpb[best])
    out[f"{prefix}final_loss"] = float(loss[-1])
    for r in sorted({1, r_train, 2 * r_train, 4 * r_train}):
      if r <= len(loss):
        out[f"{prefix}iters{r}/loss"] = float(loss[r - 1])
        out[f"{prefix}iters{r}/bits_per_byte"] = float(bpb[r - 1])
  out["val/train_recurrence"] = r_train
  return out


def compare_stage_metrics(workdir: str) -> dict:
  """The stage metrics of a control run (e.g. a feedforward model) at its first iteration, one value
  per layer, from its newest evaluation's fixed_points.json: {"run", "colsum_concentration": [k],
  ...}."""
  found = outputs.latest(workdir, "fixed_points.json") if path(workdir).is_dir() else None
  record = read_json(found) if found else None
  if record is None:
    raise RunDirError(f"--compare {workdir}: no fixed_points.json there (evaluate that run first)")
  series = record["report"]["series"]
  out: dict[str, Any] = {"run": workdir}
  for name in ("colsum_concentration", "sink_rate", "mixing", "residual_norm"):
    if series.get(name) is not None:
      out[name] = series[name][0]
  return out


def markdown(summary: dict, report: FixedPointReport, cfg: Any, step: int, init: bool,
             plots: bool = True) -> str:
  m = cfg.model
  lines = [f"# Fixed points: **{report.regime}**", "",
           f"{'Random-init control' if init else f'Trained model at step {step}'}: "
           f"({m.n_prelude}, {m.block_size}⊗R, {m.n_coda}), injection `{m.injection}`, norm "
           f"`{m.norm}`/{m.norm_type}, d={m.d_model}, task `{cfg.task.name}`; R = {report.num_iterations}.",
           "", f"- degeneracy (min cos between layer fixed points): {report.degeneracy_min_cosine:.4f}",
           *([f"- path independence: from {summary['fp/path/starts']} random initial states, "
              f"{summary['fp/path/same_point']:.2%} of the tokens end at the point they reach from "
              f"the model's own (min cos {summary['fp/path/min_cosine']:.4f})"]
             if "fp/path/starts" in summary else []),
           "- tokens at the last block layer: " + ", ".join(
               f"{k} {v:.2%}" for k, v in report.token_classes.items()), "",
           "| layer | converged | converged_at | final change | contraction rate |",
           "| --- | --- | --- | --- | --- |"]
  for l in report.layers:
    rate = "—" if l.contraction_rate is None else f"{l.contraction_rate:.3f}"
    lines.append(f"| {l.layer + 1} | {'yes' if l.converged else 'no'} | {l.converged_at} | "
                 f"{l.final_change:.2e} | {rate} |")
  sizes = sorted(k for k in summary if k.startswith("acc/len") and k.endswith("/final"))
  lines += ["", "| size | exact match at R | best | best iterations | stops changing after |",
            "| --- | --- | --- | --- | --- |"] if sizes or is_text(cfg) else []
  for key in sizes:
    n = key.split("/")[1]
    lines.append(f"| {n[3:]} | {summary[key]:.3f} | {summary[f'acc/{n}/best']:.3f} | "
                 f"{summary[f'acc/{n}/best_iters']} | {summary[f'acc/{n}/plateau_iters']} |")
  if is_text(cfg):
    lines = lines[:-2] + [
        f"Held-out loss (nats per token) against iterations; the model trained at up to "
        f"{summary['val/train_recurrence']}:", "", "| iterations | loss | bits per byte |",
        "| --- | --- | --- |"]
    for key in sorted((k for k in summary if k.startswith("val/iters") and k.endswith("/loss")),
                      key=lambda k: int(k.split("/")[1][5:])):
      r = key.split("/")[1][5:]
      lines.append(f"| {r} | {summary[key]:.4f} | {summary[f'val/iters{r}/bits_per_byte']:.4f} |")
    lines.append(f"| best ({summary['val/best_iters']}) | {summary['val/best_loss']:.4f} | "
                 f"{summary['val/best_bits_per_byte']:.4f} |")
  lines += ["", "Thresholds: " + ", ".join(f"{k}={v}" for k, v in report.thresholds.items())]
  if plots:
    lines += ["", "Plots: " + ", ".join(f"[{p}](plots/{p}.png)" for p in (
        "convergence", "distance", "attention_similarity", "trajectory_pca", "stage_metrics",
        "accuracy"))]
  return "\n".join(lines) + "\n"
