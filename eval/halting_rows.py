"""The halting evaluation's figures: threshold grids, per-setting rows aggregated over lengths, the
oracle, calibration and held-out halves, the threshold chosen per criterion, and the summary
(definitions: eval/halting.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from configs.errors import ConfigError
from looped_models.halting import LOOP_CRITERIA, validate
from rundir.config import is_text
from tasks.metrics import accuracy_counts, fractions

DEFAULT_GRIDS: dict[str, tuple] = {
    "fixed_point": (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4),
    "kl": (1e-2, 1e-3, 5e-4, 1e-4, 1e-5),
    "cosine": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
    "argmax_stable": (1, 2, 3, 5, 8),
    "entropy": (1e-1, 1e-2, 1e-3, 1e-4),
}
MAX_DROP_POINTS = 0.5  # accuracy drop (percentage points) still counted as "no loss"
SUMMARY_FIGURES = ("iterations_saved_fraction", "accuracy_drop_points", "oracle_mean_iterations",
                   "mean_iterations", "wall_speedup")  # the figures the issue asks for, per criterion
FIGURE_KEYS = ("threshold", *SUMMARY_FIGURES, "wall_speedup_batch", "max_iterations", "exact_match",
               "accuracy", "flops_saved_fraction", "flops_saved_fraction_batch")


def check_grids(grids: dict | None) -> dict[str, tuple]:
  """The grids to sweep (DEFAULT_GRIDS when None), every threshold validated; ConfigError if bad."""
  grids = DEFAULT_GRIDS if grids is None else grids
  for criterion, values in grids.items():
    if criterion not in LOOP_CRITERIA:
      raise ConfigError("halting.grids", criterion, LOOP_CRITERIA,
                        reason="the oracle is always evaluated" if criterion == "oracle" else None)
    for v in values:
      validate(criterion, v, 2)
  return {c: tuple(v) for c, v in grids.items()}


def oracle_exits(preds_RBS: np.ndarray) -> np.ndarray:
  """[B, S] 1-based first iteration after which the prediction never changes again within R."""
  changed_RBS = preds_RBS[1:] != preds_RBS[:-1]          # entry t-1: changed at iteration t+1
  R = preds_RBS.shape[0]
  last = R - 2 - np.argmax(changed_RBS[::-1], axis=0)    # index into changed of the last change
  return np.where(changed_RBS.any(0), last + 2, 1).astype(np.int32)


def oracle_row(trajectories: dict[int, np.ndarray], batches: dict[int, dict]) -> dict:
  """The oracle's row from the unfrozen predictions [R, B, S] per length, with its mean in causal
  order, with no exit before iteration 2 (`floor_mean_iterations`), and its share of exits at 1."""
  exits = {n: oracle_exits(trajectories[n]) for n in batches}

  def mean_of(exit_of) -> float:
    return row_of("oracle", None, {n: {"preds": trajectories[n][-1], "exit": exit_of(exits[n])}
                                 for n in batches}, batches)["mean_iterations"]

  oracle = row_of("oracle", None, {n: {"preds": trajectories[n][-1], "exit": exits[n]} for n in batches},
                batches)
  oracle["causal_mean_iterations"] = mean_of(lambda e: np.maximum.accumulate(e, axis=1))
  oracle["floor_mean_iterations"] = mean_of(lambda e: np.maximum(e, 2))
  oracle["share_exit_at_1"] = float(np.mean(np.concatenate(
      [exits[n][batches[n]["mask"] > 0] for n in batches]) == 1))
  return oracle


SUMMED = ("flops", "wall_s", "batch_flops", "batch_wall_s", "chunked_wall_s")


def row_of(criterion: str, threshold: Any, per_len: dict[int, dict], batches: dict[int, dict]) -> dict:
  """Aggregate one setting over lengths: per_len[n] = {"preds", "exit", and per-length figures}."""
  counts = {k: 0 for k in ("seq_right", "seq_count", "pos_right", "pos_count")}
  ex_sum = ex_n = ex_all = n_all = ex_max = 0
  lengths = {}
  for n, r in per_len.items():
    b = batches[n]
    c = {k: int(v) for k, v in accuracy_counts(r["preds"], b["targets"], b["mask"]).items()}
    on, ex = b["mask"] > 0, r["exit"]
    ex_sum, ex_n = ex_sum + int(ex[on].sum()), ex_n + int(on.sum())
    ex_all, n_all = ex_all + int(ex.sum()), n_all + ex.size
    ex_max = max(ex_max, int(ex[on].max()) if on.any() else 0)
    counts = {k: counts[k] + c[k] for k in counts}
    lengths[str(n)] = {**fractions(c), "mean_iterations": float(ex[on].mean()) if on.any() else None,
                       **{k: v for k, v in r.items() if k not in ("preds", "exit")}}
  row = {"criterion": criterion, "threshold": threshold, **fractions(counts),
         "mean_iterations": ex_sum / max(ex_n, 1), "max_iterations": ex_max,
         "mean_iterations_all": ex_all / max(n_all, 1)}
  for key in SUMMED:
    values = [r.get(key) for r in per_len.values()]
    if any(key in r for r in per_len.values()):
      row[key] = None if None in values else float(sum(values))
  return {**row, "lengths": lengths}


HALVES = ("calibration", "held_out")


def cut(a: np.ndarray, which: str, axis: int = 0) -> np.ndarray:
  """The first (calibration) or second (held out) half of `a` along its sequence axis."""
  B = a.shape[axis]
  rows = slice(0, B // 2) if which == "calibration" else slice(B // 2, None)
  return a[(slice(None),) * axis + (rows,)]


def half(tree: dict[int, dict], which: str) -> dict[int, dict]:
  """Per length, one half of every per-sequence array ([B, ...]) of the batch (see `_cut`);
  whole-batch figures (wall time, FLOPs) are left out."""
  return {n: {k: cut(v, which) for k, v in d.items() if isinstance(v, np.ndarray) and v.ndim >= 1}
          for n, d in tree.items()}


def with_halves(row: dict, per_len: dict[int, dict], batches: dict[int, dict]) -> dict:
  """`row` plus its accuracy and iterations on each half (row["calibration"], row["held_out"])."""
  for which in HALVES:
    h = row_of(row["criterion"], row["threshold"], half(per_len, which), half(batches, which))
    row[which] = {k: h[k] for k in ("exact_match", "per_position", "mean_iterations", "max_iterations")}
  return row


def metric_of(cfg: Any) -> str:
  """The accuracy halting is judged by: exact match, or next-token accuracy on text."""
  return "per_position" if is_text(cfg) else "exact_match"


def ratio(a: float | None, b: float | None) -> float | None:
  """a / b, or None when either is missing (an untimed setting) or zero."""
  return a / b if a and b else None


def figures(row: dict | None, fixed: dict, oracle: dict, R_fixed: int, metric: str) -> dict:
  """The summary figures of one halting row against the fixed baseline (None when no row): accuracy
  (`metric`) and iterations on the held-out half, wall time and FLOPs of the whole batch."""
  if row is None:
    return {k: None for k in FIGURE_KEYS} | {"oracle_mean_iterations": oracle["held_out"]["mean_iterations"]}
  held, fixed_held = row["held_out"], fixed["held_out"]
  return {"threshold": row["threshold"],
          "iterations_saved_fraction": 1.0 - held["mean_iterations"] / R_fixed,
          "accuracy_drop_points": 100.0 * (fixed_held[metric] - held[metric]),
          "oracle_mean_iterations": oracle["held_out"]["mean_iterations"],
          "mean_iterations": held["mean_iterations"],
          "wall_speedup": ratio(fixed["wall_s"], row.get("wall_s")),
          "wall_speedup_batch": ratio(fixed["wall_s"], row.get("batch_wall_s")),
          "max_iterations": held["max_iterations"], "exact_match": held["exact_match"],
          "accuracy": held[metric],
          "flops_saved_fraction": 1.0 - row["flops"] / fixed["flops"],
          "flops_saved_fraction_batch": (1.0 - row["batch_flops"] / fixed["flops"]
                                         if row.get("batch_flops") is not None else None)}


def best_within(rows: list[dict], criterion: str, fixed: dict, max_drop: float = MAX_DROP_POINTS,
                metric: str = "exact_match") -> dict | None:
  """The row of `criterion` with the fewest mean iterations whose accuracy (`metric`) on the mix is
  within `max_drop` points of the fixed baseline (ties: the lower accuracy drop), or None; judged on
  the calibration half."""
  cal = lambda r: r["calibration"]
  ok = [r for r in rows if r["criterion"] == criterion
        and 100.0 * (cal(fixed)[metric] - cal(r)[metric]) <= max_drop + 1e-9]
  return min(ok, key=lambda r: (cal(r)["mean_iterations"], -cal(r)[metric])) if ok else None


def summarize(rows: list[dict], fixed: dict, oracle: dict, R: int, R_fixed: int, slots: int,
              metric: str = "exact_match") -> dict:
  """halting.json's `summary`: the best fixed_point threshold within MAX_DROP_POINTS, and `kl_best`."""
  fp = best_within(rows, "fixed_point", fixed, metric=metric)
  kl = best_within(rows, "kl", fixed, metric=metric)
  return {"criterion": "fixed_point", "R": R, "R_fixed": R_fixed, "max_drop_points": MAX_DROP_POINTS,
          "slots": slots, "chosen_on": "calibration", "reported_on": "held_out", "metric": metric,
          "fixed_accuracy": fixed["held_out"][metric],
          "fixed_exact_match": fixed["held_out"]["exact_match"], "fixed_wall_s": fixed["wall_s"],
          "oracle_causal_mean_iterations": oracle["held_out"]["causal_mean_iterations"],
          "oracle_floor_mean_iterations": oracle["held_out"]["floor_mean_iterations"],
          **figures(fp, fixed, oracle, R_fixed, metric),
          "kl_best": figures(kl, fixed, oracle, R_fixed, metric)}


def flat_summary(summary: dict) -> dict[str, Any]:
  """W&B-style flat fields: halting/R_fixed, halting/mean_iterations, ..., halting/kl/..."""
  out = {f"halting/{k}": v for k, v in summary.items() if not isinstance(v, dict)}
  out.update({f"halting/kl/{k}": v for k, v in summary["kl_best"].items()})
  return out
