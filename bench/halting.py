"""Adaptive halting on a trained run: `eval.halting.evaluate_halting`, then a bench/RESULTS.md section
with the summary, the targets met or missed, and the comparison with the KL rule.

  python -m bench.halting --workdir runs/NAME [--iterations R] [--slots P] [--repeats 3]
      [--section halting] [--title TEXT] [--reuse] [--dry-run]

Targets (at <= 0.5 points exact-match drop against fixed inference at R_fixed): the fixed-point
criterion uses >= 40% fewer block iterations per token than R_fixed, comes within 10% of the oracle's
mean iterations, and runs >= 1.5x faster in wall time. `--reuse` formats the run's newest halting.json
as it is (written by an earlier `python -m eval halting` on the same machine) instead of measuring again.
"""

from __future__ import annotations

import json
from typing import Any

from bench.results import command, intro, parser, record, table
from eval.halting import evaluate_halting
from eval.halting_rows import DEFAULT_GRIDS, ratio
from rundir.outputs import latest
from rundir.run import load_run_config

TARGET_SAVED, TARGET_ORACLE, TARGET_SPEEDUP = 0.40, 0.10, 1.5


def _f(x: Any, fmt: str = ".3f") -> str:
  return "—" if x is None else format(x, fmt)


def targets(s: dict) -> list[tuple[str, str, bool | None]]:
  """(target, measured, met) for the issue's three targets; met is None without a qualifying threshold."""
  if s["threshold"] is None:
    return [(t, "no fixed_point threshold within 0.5 points", None) for t in (
        "≥ 40% fewer iterations than R_fixed", "within 10% of the oracle's mean iterations",
        "≥ 1.5× wall speedup")]
  ratio = s["mean_iterations"] / s["oracle_mean_iterations"]
  speed = s["wall_speedup"]
  floor = s.get("oracle_floor_mean_iterations")
  floor_text = "" if floor is None else (
      f"; the oracle itself, kept from exiting at iteration 1 as every real criterion is, would use "
      f"{floor:.2f} ({floor / s['oracle_mean_iterations']:.2f}×)")
  return [("≥ 40% fewer iterations than R_fixed", f"{s['iterations_saved_fraction']:.1%} fewer "
           f"({s['mean_iterations']:.2f} vs {s['R_fixed']})", s["iterations_saved_fraction"] >= TARGET_SAVED),
          ("within 10% of the oracle's mean iterations", f"{s['mean_iterations']:.2f} vs oracle "
           f"{s['oracle_mean_iterations']:.2f} ({ratio:.2f}×){floor_text}", ratio <= 1 + TARGET_ORACLE),
          ("≥ 1.5× wall speedup", f"{_f(speed, '.2f')}× per-sequence exit, "
           f"{_f(s['wall_speedup_batch'], '.2f')}× one batch loop", speed is not None and
           speed >= TARGET_SPEEDUP)]


def _row_cells(r: dict, fixed: dict, R_fixed: int, lengths: list[str]) -> list[str]:
  drop = 100 * (fixed["exact_match"] - r["exact_match"])
  per_len = " / ".join(f"{r['lengths'][n]['exact_match']:.3f}" for n in lengths)
  loops = " / ".join(str(r["lengths"][n]["loop_iterations"]) for n in lengths)
  return [r["criterion"], r["threshold"], f"{r['mean_iterations']:.2f}", r["max_iterations"],
          f"{r['exact_match']:.4f} ({per_len})", f"{drop:+.2f}", f"{1 - r['mean_iterations'] / R_fixed:.1%}",
          loops, f"{1 - r['flops'] / fixed['flops']:.1%}", _f(ratio(fixed["wall_s"], r["wall_s"]), ".2f"),
          _f(ratio(fixed["wall_s"], r.get("batch_wall_s")), ".2f")]


def huginn(result: dict) -> str:
  """The KL rule at Huginn's own threshold 5e-4, when it was measured."""
  row = next((r for r in result["rows"] if r["criterion"] == "kl" and r["threshold"] == 5e-4), None)
  if row is None:
    return ""
  drop = 100 * (result["fixed"]["exact_match"] - row["exact_match"])
  return (f" At Huginn's 5e-4 it exits after {row['mean_iterations']:.2f} iterations per token with a "
          f"{drop:+.2f}-point drop.")


def section(result: dict, title: str, cmd: str) -> str:
  s, fixed, oracle = result["summary"], result["fixed"], result["oracle"]
  lengths = [str(n) for n in result["lengths"]]
  kl = s["kl_best"]
  fixed_per_len = " / ".join(f"{fixed['lengths'][n]['exact_match']:.3f}" for n in lengths)
  lines = [f"## Adaptive halting: {title}", "",
           intro(cmd, f" (median of {result['repeats']} timed calls per setting after an untimed "
                 f"compile/warm-up call that gives the accuracy and iterations; wall times on a shared CPU "
                 f"are noisy)."), "",
           f"Mix of all lengths ({', '.join(lengths)}; {result['batch_size']} sequences each). Halting cap "
           f"R = {s['R']}; R_fixed = {s['R_fixed']} (smallest r reaching the best exact match on length "
           f"{result['longest_test_length']}); fixed inference at R_fixed: exact match "
           f"{fixed['exact_match']:.4f} ({fixed_per_len}),"
           f" {fixed['wall_s']:.3f} s (whole batch {_f(fixed.get('batch_wall_s'))} s, "
           f"{s['slots']} sequences per call {_f(fixed.get('chunked_wall_s'))} s). Oracle: mean "
           f"{oracle['mean_iterations']:.2f}, max {oracle['max_iterations']} iterations, exact match "
           f"{oracle['exact_match']:.4f} (the predictions at R); "
           f"{oracle.get('share_exit_at_1', 0):.1%} of its "
           f"tokens exit at iteration 1, which no real criterion can (it compares with the previous "
           f"iteration); in causal order (running maximum over positions) its mean would be "
           f"{_f(oracle.get('causal_mean_iterations'), '.2f')}; with no exit before iteration 2 it would be "
           f"{_f(oracle.get('floor_mean_iterations'), '.2f')}. Halting runs in causal order (a token exits "
           f"once every earlier one has) with per-sequence exit ({s['slots']} sequences in flight, "
           f"continuous batching); the batch-loop column runs each whole batch until its slowest token.", "",
           f"Summary (best fixed_point threshold within {s['max_drop_points']} points): "
           + (f"ε = {s['threshold']}: {s['mean_iterations']:.2f} iterations per token (max "
              f"{s['max_iterations']}), {s['iterations_saved_fraction']:.1%} fewer than R_fixed, accuracy "
              f"drop {s['accuracy_drop_points']:+.2f} points, FLOPs {s['flops_saved_fraction']:.1%} fewer, "
              f"wall {_f(s['wall_speedup'], '.2f')}× (per-sequence exit, {s['slots']} slots) and "
              f"{_f(s['wall_speedup_batch'], '.2f')}× (one loop per batch)."
              if s["threshold"] is not None else "none."), "",
           *table(["target", "measured", "met"], [[name, measured, "—" if met is None else (
               "yes" if met else "no")] for name, measured, met in targets(s)])]
  lines += ["", "KL rule (Huginn): " + (
      f"best threshold within {s['max_drop_points']} points {kl['threshold']}: {kl['mean_iterations']:.2f} "
      f"iterations per token ({kl['iterations_saved_fraction']:.1%} fewer than R_fixed), drop "
      f"{kl['accuracy_drop_points']:+.2f} points, FLOPs {kl['flops_saved_fraction']:.1%} fewer, wall "
      f"{_f(kl['wall_speedup'], '.2f')}× (per-sequence) / {_f(kl['wall_speedup_batch'], '.2f')}× (batch "
      f"loop); it decodes every iteration, so each of its iterations costs more than a fixed-point one."
      if kl["threshold"] is not None else f"no KL threshold on the grid stays within {s['max_drop_points']} "
      "points.") + huginn(result), "",
            "Every setting (exact match on the mix, then per length; drop in points against fixed at "
            "R_fixed; loop steps per length with per-sequence exit; speedups against the fixed "
            "baseline):", "",
            *table(["criterion", "threshold", "mean it.", "max it.", "exact match", "drop", "it. saved",
                    "loop steps", "FLOPs saved", "wall × (per-seq)", "wall × (batch loop)"],
                   [_row_cells(r, fixed, s["R_fixed"], lengths) for r in result["rows"]])]
  return "\n".join(lines)


def main() -> None:
  p = parser(__doc__, "halting", note=False, iterations=int, slots=int, repeats=3, title=None,
             reuse=False, kl_grid=("1e-2,1e-3,5e-4,1e-4,1e-5,1e-6,1e-7,1e-8",
                                   "KL thresholds (the default grid extended down to 1e-8 for the comparison)"))
  p.add_argument("--workdir", required=True)
  args = p.parse_args()
  cfg = load_run_config(args.workdir)
  if args.reuse:
    result = json.load(open(latest(args.workdir, "halting.json")))
  else:
    grids = {**DEFAULT_GRIDS, "kl": tuple(float(x) for x in args.kl_grid.split(","))}
    result = evaluate_halting(cfg, args.workdir, grids=grids, iterations=args.iterations,
                              slots=args.slots, repeats=args.repeats)
  m = cfg.model
  title = args.title or (f"({m.n_prelude}, {m.block_size}⊗r, {m.n_coda}), injection {m.injection}, norm "
                         f"{m.norm}, d={m.d_model}, `{cfg.task.name}` trained {cfg.train.steps} steps")
  cmd = command("bench.halting", args, "workdir", "iterations", "slots", "repeats", "kl_grid")
  record(args.section, [section(result, title, cmd)], args.dry_run)
  print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
  main()
