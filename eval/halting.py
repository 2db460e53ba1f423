"""Adaptive halting, evaluated: sweep each criterion of `looped_models.halting` over a threshold grid
against fixed-iteration inference and the oracle, on one eval batch per length; write halting.json
and plots/halting_pareto.png, log them to the run's W&B run.

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

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from configs.errors import ConfigError
from looped_models.halting import CRITERIA, DECODING_CRITERIA, LOOP_CRITERIA, halt_loop, validate
from looped_models.flops import pass_flops
from rundir.config import is_text
from looped_models.sharding import place, to_host
from tasks.metrics import accuracy_counts, fractions
from tasks.synthetic import make_batch, task_of

DEFAULT_GRIDS: dict[str, tuple] = {
    "fixed_point": (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4),
    "kl": (1e-2, 1e-3, 5e-4, 1e-4, 1e-5),
    "cosine": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
    "argmax_stable": (1, 2, 3, 5, 8),
    "entropy": (1e-1, 1e-2, 1e-3, 1e-4),
}
MODES = ("full", "trial")  # what evaluate_halting runs and times (see there)
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


def inference_flops(m: Any, batch: int, seq: int, *, iterations: int, loop_rows: int | None = None,
                    decode_each: bool = False) -> float:
  """Forward FLOPs of one batch: prelude and final decode of `batch` sequences, and `iterations` block
  iterations over `loop_rows` rows (default: the batch), each with a decode when `decode_each`."""
  f = pass_flops(m, seq)
  loop_rows = batch if loop_rows is None else loop_rows
  per_iter = f.iteration + (f.decode if decode_each else 0)
  return float(batch * seq * (f.prelude + f.decode) + iterations * loop_rows * seq * per_iter)


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
    return _row("oracle", None, {n: {"preds": trajectories[n][-1], "exit": exit_of(exits[n])}
                                 for n in batches}, batches)["mean_iterations"]

  oracle = _row("oracle", None, {n: {"preds": trajectories[n][-1], "exit": exits[n]} for n in batches},
                batches)
  oracle["causal_mean_iterations"] = mean_of(lambda e: np.maximum.accumulate(e, axis=1))
  oracle["floor_mean_iterations"] = mean_of(lambda e: np.maximum(e, 2))
  oracle["share_exit_at_1"] = float(np.mean(np.concatenate(
      [exits[n][batches[n]["mask"] > 0] for n in batches]) == 1))
  return oracle


class Runner:
  """Jitted inference of one model: the full trajectory's predictions, fixed r, and halting. With
  `mesh` (the parameters' mesh, `rundir.run.open_run`), token batches are split over its data axes
  where they divide (`eval.capture.place`); `host` brings any result back whole to every process."""

  def __init__(self, graphdef: nnx.GraphDef, params: dict, R: int, seed: int, mesh: Mesh | None = None):
    self.params, self.mesh, key = params, mesh, jax.random.key(seed)

    def trajectory(params, tokens_BS):
      model = nnx.merge(graphdef, params)
      ctx = model.context(tokens_BS.shape[1])
      e_BSD = model.encode(tokens_BS, ctx)

      def body(s_BSD, _):
        s_BSD, _, _ = model.block_step(s_BSD, e_BSD, ctx)
        return s_BSD, model.decode(s_BSD, ctx).argmax(-1).astype(np.int32)
      return jax.lax.scan(body, model.initial_state(e_BSD, key), None, length=R)[1]

    def fixed(params, tokens_BS, *, r):
      return nnx.merge(graphdef, params)(tokens_BS, r, key=key).logits_BSV

    def halting(params, tokens_BS, threshold, *, criterion, slots):
      model = nnx.merge(graphdef, params)
      return halt_loop(model, tokens_BS, criterion=criterion, threshold=threshold, max_iters=R, key=key,
                       slots=slots)

    self._trajectory = jax.jit(trajectory)
    self._fixed = jax.jit(fixed, static_argnames=("r",))
    self._halting = jax.jit(halting, static_argnames=("criterion", "slots"))

  def place(self, tokens_BS: np.ndarray) -> jax.Array:
    return place({"tokens": tokens_BS}, self.mesh)["tokens"] if self.mesh else jax.device_put(tokens_BS)

  @staticmethod
  def host(tree: Any) -> Any:
    """A result (array or tuple of arrays) as numpy, whole, on every process."""
    return jax.tree.map(to_host, tree)

  def trajectory(self, tokens_BS: np.ndarray) -> np.ndarray:
    """Predictions after each of the R iterations, [R, B, S] (unfrozen, for curves and the oracle)."""
    return to_host(self._trajectory(self.params, self.place(tokens_BS)))

  def fixed(self, tokens_BS: np.ndarray, r: int, rows: int | None = None) -> Callable[[], Any]:
    """Fixed inference at r iterations, the whole batch at once or `rows` sequences per call."""
    if rows is None or rows >= len(tokens_BS):
      whole = self.place(tokens_BS)
      return lambda: self._fixed(self.params, whole, r=r)
    parts = [self.place(tokens_BS[i:i + rows]) for i in range(0, len(tokens_BS), rows)]
    return lambda: [self._fixed(self.params, p, r=r) for p in parts]

  def halting(self, tokens_BS: np.ndarray, criterion: str, threshold: float,
              slots: int | None = None) -> Callable[[], Any]:
    thr = np.float32(threshold)
    slots = None if slots is not None and slots >= len(tokens_BS) else slots  # the same loop: one compile
    tokens = self.place(tokens_BS)
    return lambda: self._halting(self.params, tokens, thr, criterion=criterion, slots=slots)


def median_time(call: Callable[[], Any], repeats: int) -> float | None:
  """Median seconds of `repeats` calls of an already compiled and warmed-up `call` (None if 0)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) if times else None


SUMMED = ("flops", "wall_s", "batch_flops", "batch_wall_s", "chunked_wall_s")


def _row(criterion: str, threshold: Any, per_len: dict[int, dict], batches: dict[int, dict]) -> dict:
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


def _cut(a: np.ndarray, which: str, axis: int = 0) -> np.ndarray:
  """The first (calibration) or second (held out) half of `a` along its sequence axis."""
  B = a.shape[axis]
  rows = slice(0, B // 2) if which == "calibration" else slice(B // 2, None)
  return a[(slice(None),) * axis + (rows,)]


def half(tree: dict[int, dict], which: str) -> dict[int, dict]:
  """Per length, one half of every per-sequence array ([B, ...]) of the batch (see `_cut`);
  whole-batch figures (wall time, FLOPs) are left out."""
  return {n: {k: _cut(v, which) for k, v in d.items() if isinstance(v, np.ndarray) and v.ndim >= 1}
          for n, d in tree.items()}


def with_halves(row: dict, per_len: dict[int, dict], batches: dict[int, dict]) -> dict:
  """`row` plus its accuracy and iterations on each half (row["calibration"], row["held_out"])."""
  for which in HALVES:
    h = _row(row["criterion"], row["threshold"], half(per_len, which), half(batches, which))
    row[which] = {k: h[k] for k in ("exact_match", "per_position", "mean_iterations", "max_iterations")}
  return row


def metric_of(cfg: Any) -> str:
  """The accuracy halting is judged by: exact match, or next-token accuracy on text."""
  return "per_position" if is_text(cfg) else "exact_match"


def _eval_batches(cfg: Any) -> dict[int, dict]:
  """One eval batch per length (the training length and every test length), as the evaluator's."""
  task = task_of(cfg)
  make = lambda n: make_batch(task, seed=cfg.train.seed, step=0, batch_size=cfg.train.eval_batch_size,
                              min_length=n, max_length=n, stream=1)
  return {n: {k: v for k, v in make(n).items() if k != "lengths"}
          for n in (cfg.task.train_length, *cfg.task.test_lengths)}


def ratio(a: float | None, b: float | None) -> float | None:
  """a / b, or None when either is missing (an untimed setting) or zero."""
  return a / b if a and b else None


def _figures(row: dict | None, fixed: dict, oracle: dict, R_fixed: int, metric: str) -> dict:
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
          **_figures(fp, fixed, oracle, R_fixed, metric),
          "kl_best": _figures(kl, fixed, oracle, R_fixed, metric)}


def flat_summary(summary: dict) -> dict[str, Any]:
  """W&B-style flat fields: halting/R_fixed, halting/mean_iterations, ..., halting/kl/..."""
  out = {f"halting/{k}": v for k, v in summary.items() if not isinstance(v, dict)}
  out.update({f"halting/kl/{k}": v for k, v in summary["kl_best"].items()})
  return out


def evaluate_halting(cfg: ml_collections.ConfigDict, workdir: str, *, grids: dict | None = None,
                     iterations: int | None = None, slots: int | None = None, repeats: int = 3,
                     mode: str = "full", trajectories: dict | None = None, log_wandb: bool = True,
                     progress: bool = True) -> dict:
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
  `eval.evaluate.evaluate(predictions=...)` collects them, instead of running them again."""
  from tqdm import tqdm

  from eval.evaluate import default_iterations
  from rundir.run import open_run
  from rundir import distributed
  from rundir.config import resolve
  from rundir.workdir import path as store_path, write_json_atomic

  grids = check_grids(grids)
  if mode not in MODES:
    raise ConfigError("halting.mode", mode, MODES)
  full = mode == "full"
  for key, value, low in (("halting.repeats", repeats, 0), ("halting.slots", slots, 1)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
      raise ConfigError(key, value, allowed=f"an integer >= {low}")
  cfg = resolve(cfg)
  R = iterations or cfg.eval.iterations or default_iterations(cfg)
  if isinstance(R, bool) or not isinstance(R, int) or R < 2:
    raise ConfigError("halting.iterations", R, allowed="an integer >= 2")
  slots = min(slots or max(1, cfg.train.eval_batch_size // 8), cfg.train.eval_batch_size)
  distributed.initialize(cfg.distributed)
  run = open_run(workdir, cfg=cfg)  # sharded onto the run's mesh; each process computes its rows
  step, m, batches = run.step, cfg.model, _eval_batches(cfg)
  runner = Runner(run.graphdef, run.params, R, cfg.train.seed, mesh=run.mesh)
  bar = tqdm(total=len(batches) * (2 + sum(len(v) for v in grids.values())), desc="halting", unit="run",
             disable=not progress, dynamic_ncols=True)

  given, trajectories = trajectories or {}, {}
  for n, b in batches.items():
    trajectories[n] = given[n] if n in given else runner.trajectory(b["inputs"])
    if trajectories[n].shape != (R, *b["inputs"].shape):
      raise ValueError(f"trajectory of length {n}: shape {trajectories[n].shape}, expected "
                       f"{(R, *b['inputs'].shape)} (R iterations of the eval batch)")
    bar.update()
  metric = metric_of(cfg)
  longest = max(cfg.task.test_lengths or (cfg.task.train_length,))
  b = half(batches, "calibration")[longest]
  acc_R = np.array([fractions(accuracy_counts(_cut(p, "calibration"), b["targets"], b["mask"]))[metric]
                    for p in trajectories[longest]])
  R_fixed = int(np.argmax(acc_R)) + 1
  curve = [_row("fixed", r, {n: {"preds": trajectories[n][r - 1], "exit": np.full(bb["inputs"].shape, r)}
                             for n, bb in batches.items()}, batches)[metric]
           for r in range(1, R + 1)]
  oracle = oracle_row(trajectories, batches)
  for which in HALVES:
    oracle[which] = oracle_row({n: _cut(t, which, axis=1) for n, t in trajectories.items()},
                               half(batches, which))

  # Fixed inference at R_fixed, the whole batch at once (and, in full mode, `slots` rows per call):
  # compiled and warmed up here, timed below.
  fixed_len, fixed_calls = {}, {}
  for n, b in batches.items():
    whole = runner.fixed(b["inputs"], R_fixed)
    logits = runner.host(jax.block_until_ready(whole()))
    fixed_len[n] = {"preds": logits.argmax(-1), "loop_iterations": R_fixed,
                    "exit": np.full(b["inputs"].shape, R_fixed),
                    "flops": inference_flops(m, *b["inputs"].shape, iterations=R_fixed),
                    "wall_s": None, "batch_wall_s": None}
    fixed_calls[n] = {"batch_wall_s": whole}
    if full:
      fixed_calls[n]["chunked_wall_s"] = chunked = runner.fixed(b["inputs"], R_fixed, rows=slots)
      jax.block_until_ready(chunked())
      fixed_len[n]["chunked_wall_s"] = None
    bar.update()

  # Every setting once: predictions, exits, loop iterations, FLOPs (and its compile and warm-up).
  settings = []  # (row, its per-length figures, per length {figure: the call to time for it})
  for criterion, values in grids.items():
    each = criterion in DECODING_CRITERIA
    for thr in values:
      per_len, batch_len, calls = {}, {}, {}
      for n, b in batches.items():
        B, S = b["inputs"].shape
        per_seq = runner.halting(b["inputs"], criterion, thr, slots)
        out = runner.host(jax.block_until_ready(per_seq()))
        loop = int(out.iterations)
        per_len[n] = {"preds": np.asarray(out.logits_BSV).argmax(-1), "exit": np.asarray(out.exit_BS),
                      "loop_iterations": loop, "wall_s": None,
                      "flops": inference_flops(m, B, S, iterations=loop, loop_rows=min(slots, B),
                                               decode_each=each)}
        calls[n] = {"wall_s": per_seq}
        if full:  # one loop over the whole batch (the same call when slots >= B)
          whole_call = per_seq if slots >= B else runner.halting(b["inputs"], criterion, thr)
          whole = out if slots >= B else runner.host(jax.block_until_ready(whole_call()))
          per_len[n].update(batch_loop_iterations=int(whole.iterations), batch_wall_s=None,
                            batch_flops=inference_flops(m, B, S, iterations=int(whole.iterations),
                                                        decode_each=each))
          batch_len[n] = {"preds": np.asarray(whole.logits_BSV).argmax(-1),
                          "exit": np.asarray(whole.exit_BS),
                          "exit_agreement": float((per_len[n]["exit"] == np.asarray(whole.exit_BS)).mean())}
          calls[n]["batch_wall_s"] = whole_call
        bar.update()
      row = with_halves(_row(criterion, thr, per_len, batches), per_len, batches)
      if full:
        batch = _row(criterion, thr, batch_len, batches)
        row["batch"] = {k: batch[k] for k in ("exact_match", "per_position", "mean_iterations",
                                              "max_iterations")}
        row["batch"]["exit_agreement"] = float(np.mean([r["exit_agreement"] for r in batch_len.values()]))
      settings.append((row, per_len, calls))
  rows = [row for row, _, _ in settings]

  # Wall times. Full mode times the fixed baseline before and after the halting settings (the faster
  # kept: a shared machine's load drifts, and the baseline gets the benefit of the doubt).
  fixed = with_halves(_row("fixed", R_fixed, fixed_len, batches), fixed_len, batches)
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
    again = _row(row["criterion"], row["threshold"], per_len, batches)
    row.update({k: again[k] for k in (*SUMMED, "lengths") if k in again})
  if full:
    time_fixed()
  fixed = with_halves(_row("fixed", R_fixed, fixed_len, batches), fixed_len, batches)
  bar.close()

  summary = summarize(rows, fixed, oracle, R, R_fixed, slots, metric)
  result = {"summary": summary, "step": step, "R": R, "R_fixed": R_fixed, "slots": slots,
            "repeats": repeats, "mode": mode,
            "batch_size": cfg.train.eval_batch_size, "lengths": list(batches),
            "longest_test_length": longest, "grids": {c: list(v) for c, v in grids.items()},
            "fixed": fixed, "oracle": oracle, "rows": rows, "fixed_curve": curve,
            "criteria": list(CRITERIA)}
  if jax.process_index() != 0:
    return result
  from rundir.outputs import output_dir
  outdir = output_dir(workdir, step, "halting.json")  # eval/STEP/: a trial's and the CLI's never collide
  store_path(outdir).joinpath("plots").mkdir(parents=True, exist_ok=True)
  plot = pareto_plot(rows, fixed, oracle, curve, os.path.join(outdir, "plots", "halting_pareto.png"),
                     metric)
  write_json_atomic(os.path.join(outdir, "halting.json"), result)
  if log_wandb:
    _log_wandb(cfg, workdir, summary, rows, plot, step)
  return result


TRIAL_GRIDS = {"fixed_point": DEFAULT_GRIDS["fixed_point"]}  # what a sweep trial's summary needs


def halting_summary(cfg: ml_collections.ConfigDict, workdir: str, *, grids: dict | None = None,
                    repeats: int = 3, **kwargs: Any) -> dict[str, Any]:
  """For a sweep trial: `evaluate_halting` over the fixed_point grid, per-sequence exit only, timing
  just the fixed baseline and the best threshold (so that a trial stays cheap); returns the flat
  `halting/...` summary fields."""
  return flat_summary(evaluate_halting(cfg, workdir, grids=grids or TRIAL_GRIDS, repeats=repeats,
                                       mode="trial", **kwargs)["summary"])


def pareto_plot(rows: list[dict], fixed: dict, oracle: dict, curve: list[float], path: str,
                metric: str = "exact_match") -> str:
  """Accuracy (`metric`) on the mix against mean iterations per token: one line per criterion, the
  oracle, and fixed-iteration inference at every r (R_fixed marked)."""
  from eval.plots import _save, plt

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
  return _save(fig, path)


def _log_wandb(cfg: Any, workdir: str, summary: dict, rows: list[dict], plot: str, step: int) -> None:
  """Into the run's own W&B run, resumed by the id in status.json; nothing when W&B is disabled."""
  if cfg.wandb.mode == "disabled":
    return
  import wandb

  from rundir.logger import MetricsLogger
  from rundir.workdir import read_status

  status = read_status(workdir) or {}
  logger = MetricsLogger(workdir, cfg.wandb, cfg.to_dict(), status.get("wandb_run_id"), jsonl=False)
  if logger.run is None:
    return
  cols = ["criterion", "threshold", "mean_iterations", "max_iterations", "exact_match",
          "per_position", "flops", "wall_s", "batch_flops", "batch_wall_s"]
  table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
  logger.run.log({"halting/plots/pareto": wandb.Image(plot), "halting/rows": table},
                 step=max(step, logger.run.step))
  logger.run.summary.update({k: v for k, v in flat_summary(summary).items() if v is not None})
  logger.run.finish()
