"""Adaptive halting, evaluated: sweep each criterion of `looped_models.halting` over a threshold grid
against fixed-iteration inference and the oracle, on one eval batch per length; write halting.json
and plots/halting_pareto.png, log them to the run's W&B run. The entry point is here; the runner is
in eval/halting_runner.py, the figures in eval/halting_rows.py, the outputs in eval/halting_report.py.

Definitions (all on the mix of all lengths: the training length and every test length, one batch of
`train.eval_batch_size` sequences each, counts aggregated over lengths):
- R, the halting cap: `eval.iterations` or max(128, 4 x the training maximum);
- calibration and held out: the first half of each eval batch's sequences chooses (R_fixed, and each
  criterion's threshold in the summary), the second half is what the summary reports (accuracy, mean
  iterations), so no threshold is scored on the data that chose it; wall times and FLOPs are of the
  whole batch (`rows` also keep whole-batch accuracy, for the Pareto plot);
- accuracy: exact match on the synthetic tasks; on text (`task.name=text`), where a whole window is
  never exactly right, next-token accuracy (`per_position`); `summary.metric` names it, and the
  summary's accuracy figures (`fixed_accuracy`, `accuracy`, `accuracy_drop_points`) are in it;
- R_fixed: the smallest r <= R whose accuracy on the longest test length (calibration half) equals
  the best over 1..R (what a user without halting must run for every input); the baseline is fixed
  inference at R_fixed;
- mean / max iterations: of the per-token exit iterations over the scored (masked) positions;
  `mean_iterations_all` averages over every position;
- oracle (evaluation only): from an unfrozen run of R iterations, a token exits at the first iteration
  after which its prediction never changes again within R (its prediction is the one at R); it may
  exit at 1, which no real criterion can (`share_exit_at_1`); `floor_mean_iterations`: its exits
  raised to at least 2, the oracle's mean if, like every real criterion, it could not exit at 1;
  `causal_mean_iterations`: the exits raised to the running maximum over positions, the oracle bound
  for causal-order exit;
- two ways to run a batch, both measured: per-sequence exit (the rows' and the summary's figures),
  `slots` sequences in flight with continuous batching (`looped_models.halting`); and one loop over
  the whole batch until its slowest token is done (`batch_*` figures, and `batch`: its accuracy and
  iterations, the same up to rounding: a different batch shape can move a criterion value sitting on
  the threshold by one ulp, hence `batch.exit_agreement`);
- FLOPs (forward, as run): 2 x parameters x tokens for every matmul layer application, plus 4 x S x d
  per token and layer for the attention scores and mixing (the full masked S x S matrix is computed);
  one prelude and one final decode (coda + unembedding) per sequence, and the block iterations really
  run (loop steps x rows in the loop), each with a decode for the criteria that decode in the loop;
- wall time: per length, jit-compiled and warmed up by the untimed run that gives the figures above,
  then the median of `repeats` timed calls (`block_until_ready`), summed over lengths. The fixed
  baseline takes the faster of the whole batch at once and `slots` sequences per call, each timed
  before and after the halting settings (the faster kept: a shared machine's load drifts, and the
  baseline gets the benefit of the doubt). That is `mode="full"` (`python -m eval halting`); a sweep
  trial (`halting_summary`, `mode="trial"`) runs per-sequence exit only and times just the settings
  its summary reports (untimed rows: wall_s None) against the whole batch at once, timed once.
"""


from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from configs.errors import ConfigError
from eval.driver import Evaluation, eval_batches, iterations_of, open_evaluation
from eval.halting_report import write_outputs
from eval.halting_rows import (DEFAULT_GRIDS, HALVES, SUMMED, best_within, check_grids, cut,
                               flat_summary, half, metric_of, oracle_row, row_of, summarize,
                               with_halves)
from eval.halting_runner import Runner, median_time
from eval.plots import FORMATS
from looped_models.flops import forward_flops
from looped_models.halting import CRITERIA, DECODING_CRITERIA
from rundir.config import resolve
from tasks.metrics import accuracy_counts, fractions

MODES = ("full", "trial")  # what evaluate_halting runs and times (see there)
TRIAL_GRIDS = {"fixed_point": DEFAULT_GRIDS["fixed_point"]}  # what a sweep trial's summary needs


def check_options(grids: dict | None, mode: str, repeats: int, slots: int | None) -> dict[str, tuple]:
  """The grids to sweep (see `check_grids`); ConfigError on a bad grid, mode, repeats or slots."""
  grids = check_grids(grids)
  if mode not in MODES:
    raise ConfigError("halting.mode", mode, MODES)
  for key, value, low in (("halting.repeats", repeats, 0), ("halting.slots", slots, 1)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
      raise ConfigError(key, value, allowed=f"an integer >= {low}")
  return grids


def evaluate_halting(cfg: ml_collections.ConfigDict, workdir: str, *, grids: dict | None = None,
                     iterations: int | None = None, slots: int | None = None, repeats: int = 3,
                     mode: str = "full", trajectories: dict | None = None, log_wandb: bool = True,
                     progress: bool = True, formats: tuple[str, ...] = FORMATS,
                     ev: Evaluation | None = None) -> dict:
  """Sweep every criterion over its grid on a trained run; write WORKDIR/eval/STEP/halting.json and
  plots/halting_pareto.png beside it (rundir.outputs), log to W&B; returns the whole result
  ({"summary", "rows", ...}).
  `slots`: sequences in flight for per-sequence exit (default: eval batch size / 8). Every setting
  runs once for its accuracy, iterations and FLOPs, then `mode` decides what is timed:
  - "full" (`python -m eval halting`, the benchmark): every setting, with per-sequence exit and as one
    loop over the whole batch (`batch_*` figures); the fixed baseline is the faster of the whole batch
    and `slots` rows per call, timed before and after the settings;
  - "trial" (a sweep trial, kept cheap): per-sequence exit only, timing only the summary's settings
    (the best fixed_point and KL thresholds) against the fixed baseline on the whole batch.
  `trajectories`: {length: [R, B, S] predictions of the unfrozen run} on these eval batches, as
  `eval.evaluate.evaluate(predictions=...)` collects them, instead of running them again.
  `formats`: the Pareto plot's (eval.plots.save). `ev`: the run already opened (`eval.suite`)."""
  grids = check_options(grids, mode, repeats, slots)
  full = mode == "full"
  cfg = resolve(cfg)
  R = iterations_of(cfg, iterations)
  if isinstance(R, bool) or not isinstance(R, int) or R < 2:
    raise ConfigError("halting.iterations", R, allowed="an integer >= 2")
  slots = min(slots or max(1, cfg.train.eval_batch_size // 8), cfg.train.eval_batch_size)
  ev = ev or open_evaluation(cfg, workdir)  # sharded onto the run's mesh; each process computes its rows
  batches = eval_batches(cfg, ev.task)
  runner = Runner(ev.run.graphdef, ev.run.params, R, cfg.train.seed, mesh=ev.run.mesh)
  bar = tqdm(total=len(batches) * (2 + sum(len(v) for v in grids.values())), desc="halting", unit="run",
             disable=not progress, dynamic_ncols=True)
  trajectories = unfrozen(runner, batches, trajectories or {}, R, bar)
  metric = metric_of(cfg)
  longest = max(cfg.task.test_lengths or (cfg.task.train_length,))
  R_fixed, curve, oracle = baseline(trajectories, batches, longest, metric)
  fixed_len, fixed_calls = fixed_runs(runner, batches, R_fixed, cfg.model, full, slots, bar)
  settings = run_settings(runner, grids, batches, cfg.model, full, slots, bar)
  rows = [row for row, _, _ in settings]
  fixed = time_settings(settings, fixed_len, fixed_calls, batches, R_fixed, full, repeats, metric, bar)
  bar.close()
  summary = summarize(rows, fixed, oracle, R, R_fixed, slots, metric)
  result = {"summary": summary, "step": ev.step, "R": R, "R_fixed": R_fixed, "slots": slots,
            "repeats": repeats, "mode": mode,
            "batch_size": cfg.train.eval_batch_size, "lengths": list(batches),
            "longest_test_length": longest, "grids": {c: list(v) for c, v in grids.items()},
            "fixed": fixed, "oracle": oracle, "rows": rows, "fixed_curve": curve,
            "criteria": list(CRITERIA)}
  if ev.main:
    write_outputs(ev, result, log_wandb, formats)
  return result


def unfrozen(runner: Runner, batches: dict[int, dict], given: dict, R: int, bar: Any) -> dict:
  """Per length, the [R, B, S] predictions of the unfrozen run: `given`, or run here."""
  trajectories = {}
  for n, b in batches.items():
    trajectories[n] = given[n] if n in given else runner.trajectory(b["inputs"])
    if trajectories[n].shape != (R, *b["inputs"].shape):
      raise ValueError(f"trajectory of length {n}: shape {trajectories[n].shape}, expected "
                       f"{(R, *b['inputs'].shape)} (R iterations of the eval batch)")
    bar.update()
  return trajectories


def baseline(trajectories: dict, batches: dict[int, dict], longest: int, metric: str
             ) -> tuple[int, list[float], dict]:
  """(R_fixed, chosen on the calibration half of the longest length; the fixed-r accuracy curve on
  the mix; the oracle's row, with its row on each half)."""
  b = half(batches, "calibration")[longest]
  acc_R = np.array([fractions(accuracy_counts(cut(p, "calibration"), b["targets"], b["mask"]))[metric]
                    for p in trajectories[longest]])
  R_fixed = int(np.argmax(acc_R)) + 1
  R = len(acc_R)
  curve = [row_of("fixed", r, {n: {"preds": trajectories[n][r - 1], "exit": np.full(bb["inputs"].shape, r)}
                               for n, bb in batches.items()}, batches)[metric]
           for r in range(1, R + 1)]
  oracle = oracle_row(trajectories, batches)
  for which in HALVES:
    oracle[which] = oracle_row({n: cut(t, which, axis=1) for n, t in trajectories.items()},
                               half(batches, which))
  return R_fixed, curve, oracle


def fixed_runs(runner: Runner, batches: dict[int, dict], R_fixed: int, m: Any, full: bool, slots: int,
               bar: Any) -> tuple[dict, dict]:
  """Fixed inference at R_fixed, the whole batch at once (and, in full mode, `slots` rows per call):
  compiled and warmed up here, timed by `time_settings`. (per-length figures, per-length calls)"""
  fixed_len, fixed_calls = {}, {}
  for n, b in batches.items():
    whole = runner.fixed(b["inputs"], R_fixed)
    logits = runner.host(jax.block_until_ready(whole()))
    fixed_len[n] = {"preds": logits.argmax(-1), "loop_iterations": R_fixed,
                    "exit": np.full(b["inputs"].shape, R_fixed),
                    "flops": forward_flops(m, *b["inputs"].shape, iterations=R_fixed),
                    "wall_s": None, "batch_wall_s": None}
    fixed_calls[n] = {"batch_wall_s": whole}
    if full:
      fixed_calls[n]["chunked_wall_s"] = chunked = runner.fixed(b["inputs"], R_fixed, rows=slots)
      jax.block_until_ready(chunked())
      fixed_len[n]["chunked_wall_s"] = None
    bar.update()
  return fixed_len, fixed_calls


def run_settings(runner: Runner, grids: dict, batches: dict[int, dict], m: Any, full: bool, slots: int,
                 bar: Any) -> list[tuple[dict, dict, dict]]:
  """Every setting once: predictions, exits, loop iterations, FLOPs (and its compile and warm-up).
  [(row, its per-length figures, per length {figure: the call to time for it})]"""
  settings = []
  for criterion, values in grids.items():
    for thr in values:
      per_len, batch_len, calls = {}, {}, {}
      for n, b in batches.items():
        per_len[n], batch_len[n], calls[n] = run_setting(runner, b, criterion, thr, m, full, slots)
        bar.update()
      row = with_halves(row_of(criterion, thr, per_len, batches), per_len, batches)
      if full:
        batch = row_of(criterion, thr, batch_len, batches)
        row["batch"] = {k: batch[k] for k in ("exact_match", "per_position", "mean_iterations",
                                              "max_iterations")}
        row["batch"]["exit_agreement"] = float(np.mean([r["exit_agreement"] for r in batch_len.values()]))
      settings.append((row, per_len, calls))
  return settings


def run_setting(runner: Runner, b: dict, criterion: str, thr: Any, m: Any, full: bool, slots: int
                ) -> tuple[dict, dict | None, dict]:
  """One setting on one length's batch: (per-sequence exit's figures, the whole-batch loop's
  predictions and exits (full mode), {figure: the call to time for it})."""
  B, S = b["inputs"].shape
  each = criterion in DECODING_CRITERIA
  per_seq = runner.halting(b["inputs"], criterion, thr, slots)
  out = runner.host(jax.block_until_ready(per_seq()))
  loop = int(out.iterations)
  fig = {"preds": np.asarray(out.logits_BSV).argmax(-1), "exit": np.asarray(out.exit_BS),
         "loop_iterations": loop, "wall_s": None,
         "flops": forward_flops(m, B, S, iterations=loop, loop_rows=min(slots, B), decode_each=each)}
  calls, batch = {"wall_s": per_seq}, None
  if full:  # one loop over the whole batch (the same call when slots >= B)
    whole_call = per_seq if slots >= B else runner.halting(b["inputs"], criterion, thr)
    whole = out if slots >= B else runner.host(jax.block_until_ready(whole_call()))
    fig.update(batch_loop_iterations=int(whole.iterations), batch_wall_s=None,
               batch_flops=forward_flops(m, B, S, iterations=int(whole.iterations), decode_each=each))
    batch = {"preds": np.asarray(whole.logits_BSV).argmax(-1), "exit": np.asarray(whole.exit_BS),
             "exit_agreement": float((fig["exit"] == np.asarray(whole.exit_BS)).mean())}
    calls["batch_wall_s"] = whole_call
  return fig, batch, calls


def time_settings(settings: list, fixed_len: dict, fixed_calls: dict, batches: dict[int, dict],
                  R_fixed: int, full: bool, repeats: int, metric: str, bar: Any) -> dict:
  """Wall times; returns the fixed baseline's row. Full mode times every setting, and the fixed
  baseline before and after them (the faster kept: a shared machine's load drifts, and the baseline
  gets the benefit of the doubt); trial mode only the summary's settings."""
  rows = [row for row, _, _ in settings]
  fixed = with_halves(row_of("fixed", R_fixed, fixed_len, batches), fixed_len, batches)
  chosen = rows if full else [r for r in (best_within(rows, c, fixed, metric=metric)
                                          for c in ("fixed_point", "kl")) if r]
  timed = [s for s in settings if any(s[0] is r for r in chosen)]
  bar.total += len(batches) * (1 + full + len(timed))
  bar.refresh()

  def time_fixed() -> None:
    for n, calls in fixed_calls.items():
      r = fixed_len[n]
      for key, call in calls.items():
        t = median_time(call, repeats)
        r[key] = t if r[key] is None or t is None else min(t, r[key])
      r["wall_s"] = min(r[k] for k in calls) if r["batch_wall_s"] is not None else None
      bar.update()

  time_fixed()
  for row, per_len, calls in timed:
    for n, figure_calls in calls.items():
      for key, call in figure_calls.items():
        per_len[n][key] = median_time(call, repeats)
      bar.update()
    again = row_of(row["criterion"], row["threshold"], per_len, batches)
    row.update({k: again[k] for k in (*SUMMED, "lengths") if k in again})
  if full:
    time_fixed()
  return with_halves(row_of("fixed", R_fixed, fixed_len, batches), fixed_len, batches)


def halting_summary(cfg: ml_collections.ConfigDict, workdir: str, *, grids: dict | None = None,
                    repeats: int = 3, **kwargs: Any) -> dict[str, Any]:
  """For a sweep trial: `evaluate_halting` over the fixed_point grid, per-sequence exit only, timing
  just the fixed baseline and the best threshold (so that a trial stays cheap); returns the flat
  `halting/...` summary fields."""
  return flat_summary(evaluate_halting(cfg, workdir, grids=grids or TRIAL_GRIDS, repeats=repeats,
                                       mode="trial", **kwargs)["summary"])
