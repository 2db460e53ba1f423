"""The fixed-point evaluation of one run: load a trained run (or a model at initialisation), capture
its trajectory, analyse fixed points, measure accuracy against iterations, write fixed_points.json/.md
and plots, log to W&B (through `eval.driver`)."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from tqdm import tqdm

from configs.recurrence import max_recurrence
from eval import plots
from eval.capture import Capture
from eval.driver import Evaluation, eval_batch, eval_batches, iterations_of, open_evaluation
from eval.fixed_points import FixedPointReport, analyze_stream
from eval.summary import compare_stage_metrics, markdown, summary_fields, text_summary_fields
from rundir.config import is_text, resolve
from rundir.run import open_run
from rundir.workdir import RunDirError, path, write_json_atomic

N_PCA_TOKENS = 4


def with_text_data(cfg: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
  """`cfg` evaluated on held-out windows of the prepared corpus at `path` (`--data`); a run that did
  not train on text gets windows of min(256, model.max_len) tokens and no longer test windows."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if cfg.task.name != "text":
    cfg.task.train_length = min(256, cfg.model.max_len)
    cfg.task.test_lengths = ()
  cfg.task.name, cfg.task.path, cfg.task.min_train_length = "text", path, 0
  return cfg


def load_params(cfg: Any, workdir: str, init: bool) -> tuple[Any, dict, int]:
  """(graphdef, params, step) of `rundir.run.open_run`: the newest checkpoint, or the model at
  initialisation (step 0), sharded onto the run's mesh."""
  run = open_run(workdir, cfg=cfg, init=init)
  return run.graphdef, run.params, run.step


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, *, init: bool = False,
             iterations: int | None = None, batch_size: int | None = None, chunk: int | None = None,
             thresholds: dict | None = None, log_wandb: bool = True, progress: bool = True,
             predictions: dict | None = None, compare: str | None = None,
             formats: tuple[str, ...] = plots.FORMATS, ev: Evaluation | None = None) -> dict:
  """Evaluate one run; returns the summary fields (also written to fixed_points.json).
  Unset arguments come from the config's `eval` section. `predictions`, when given, is filled with
  {size: the [R, B, S] predictions behind that size's accuracy curve} (a sweep trial hands them on to
  the halting evaluation, which uses the same batches). A text run is measured on held-out windows
  of its corpus: loss and bits per byte against iterations instead of accuracy, the PCA tokens
  labelled with their text, and, with `compare` (a control run's directory, e.g. a feedforward
  model), that run's stage metrics beside this one's. `formats`: the plots' (eval.plots.save).
  `ev`: the run already opened (`eval.suite`)."""
  cfg = resolve(cfg)
  R = iterations_of(cfg, iterations)
  if R < 3:
    raise RunDirError(f"--iterations={R}: the analysis needs at least 3 iterations")
  control = compare_stage_metrics(compare) if compare else None
  ev = ev or open_evaluation(cfg, workdir, init=init)
  text = is_text(cfg)
  capture = Capture(ev.run.graphdef, ev.run.params, chunk=chunk or cfg.eval.chunk, seed=cfg.train.seed,
                    token_bytes=ev.task.data.token_bytes if text else None, mesh=ev.run.mesh)
  train_batch = eval_batch(ev.task, cfg, cfg.task.train_length, batch_size or cfg.eval.batch_size)
  batches = eval_batches(cfg, ev.task)
  bar = tqdm(total=(2 + len(batches)) * R, desc="eval", unit="iter", disable=not progress,
             dynamic_ncols=True)
  report, points = analyse(capture, train_batch, R, thresholds, bar)
  starts = cfg.eval.path_starts
  path_check = capture.path_independence(train_batch, R, starts, cfg.train.seed) if starts else None
  curves, text_curves = {}, {}
  for n, batch in batches.items():
    curve = capture.accuracy_curve(batch, R)
    curves[n] = curve["per_position"] if text else curve["exact_match"]
    if text:
      text_curves[n] = {k: curve[k] for k in ("loss", "bits_per_byte", "per_position")}
    if predictions is not None:
      predictions[n] = curve["predictions"]
    bar.update(R)
  bar.close()
  summary = (text_summary_fields(report, text_curves, cfg) if text else
             summary_fields(report, curves, cfg.task.train_length))
  if path_check:
    summary.update({f"fp/path/{k}": v for k, v in path_check.items()})
  if ev.main:
    pca_tokens = None
    if text:  # the PCA plot's tokens: the last N_PCA_TOKENS of the first analysed window
      tok = ev.run.tokenizer or ev.task.data.tokenizer()
      pca_tokens = [tok.token_text(int(i)) for i in train_batch["inputs"][0, -N_PCA_TOKENS:]]
    plot_paths = write_outputs(ev, summary, report, points, curves, text_curves, control, pca_tokens,
                               R=R, batch_size=batch_size or cfg.eval.batch_size, formats=formats)
    if log_wandb:
      _publish(ev, summary, report, plot_paths, curves)
  return summary


def analyse(capture: Capture, batch: dict, R: int, thresholds: dict | None, bar: Any
            ) -> tuple[FixedPointReport, np.ndarray]:
  """The streamed fixed-point analysis of R iterations on `batch`, and a few tokens' full
  trajectories for the PCA plot ([R, k, N_PCA_TOKENS, D], kept from the first pass)."""
  points: list[np.ndarray] = []

  def replay():
    keep = not points
    for st, att in capture.chunks(batch, R, attention=True)():
      bar.update(len(st))
      if keep:
        points.append(st[:, :, 0, -N_PCA_TOKENS:, :])
      yield st, att

  report = analyze_stream(replay, **(thresholds or {}))
  return report, np.concatenate(points)


def write_outputs(ev: Evaluation, summary: dict, report: FixedPointReport, points: np.ndarray,
                  curves: dict, text_curves: dict, control: dict | None, pca_tokens: list | None, *,
                  R: int, batch_size: int, formats: tuple[str, ...] = plots.FORMATS) -> dict[str, str]:
  """fixed_points.json and .md, and the plots, under eval/STEP/ (never overwritten); the plots' paths."""
  cfg = ev.cfg
  outdir = ev.output_dir("fixed_points.json")
  plot_paths = plots.all_plots(report, points, curves, cfg.task.train_length,
                               os.path.join(outdir, "plots"), labels=pca_tokens, formats=formats)
  if text_curves:
    plot_paths["loss"] = plots.loss_curves({n: c["loss"] for n, c in text_curves.items()},
                                           os.path.join(outdir, "plots", "loss.png"),
                                           cfg.task.train_length, max_recurrence(cfg.train),
                                           formats=formats)
  if control is not None:
    plot_paths["stage_depth"] = plots.stage_by_depth(report, control,
                                                     os.path.join(outdir, "plots", "stage_depth.png"),
                                                     formats=formats)
  result = {"summary": summary, "step": ev.step, "init": ev.init, "iterations": R,
            "batch_size": batch_size, "curve_batch_size": cfg.train.eval_batch_size,
            "report": report.to_dict(), "accuracy_curves": {str(n): c.tolist() for n, c in curves.items()}}
  if is_text(cfg):
    result["loss_curves"] = {str(n): {k: v.tolist() for k, v in c.items()} for n, c in text_curves.items()}
    result["pca_tokens"] = pca_tokens
  if control is not None:
    result["compare"] = control
  write_json_atomic(path(outdir) / "fixed_points.json", result)
  (path(outdir) / "fixed_points.md").write_text(markdown(summary, report, cfg, ev.step, ev.init))
  return plot_paths


def _publish(ev: Evaluation, summary: dict, report: FixedPointReport, plot_paths: dict,
             curves: dict) -> None:
  """Into the trial's own W&B run (resumed by id) or, for a random-init control, a new eval run."""
  layers = [[l.layer + 1, l.converged, l.converged_at, l.final_change, l.contraction_rate]
            for l in report.layers]
  tables = {"fp/layers": (["layer", "converged", "converged_at", "final_change", "contraction_rate"],
                          layers),
            "acc/curves": (["size", "iterations", "exact_match"],
                           [[n, t + 1, float(a)] for n, acc in curves.items() for t, a in enumerate(acc)])}
  ev.publish(tables=tables, images={f"fp/plots/{name}": p for name, p in plot_paths.items()},
             summary=summary)
