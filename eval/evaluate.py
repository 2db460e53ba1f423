"""One evaluation: load a trained run (or a model at initialisation), capture its trajectory, analyse
fixed points, measure accuracy against iterations, write fixed_points.json/.md and plots, log to W&B."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from configs.base import get_config as base_config
from eval import plots
from eval.capture import Capture
from eval.fixed_points import FixedPointReport, analyze_stream
from train import distributed
from train.checkpoint import Checkpointer, saved_steps
from train.config import resolve
from train.logger import MetricsLogger
from train.recurrence import max_recurrence
from train.step import abstract_model, init_model
from train.tasks import get_task, make_batch
from train.workdir import RunDirError, check_compatible, read_json, read_status, write_json_atomic

N_PCA_TOKENS = 4


def default_iterations(cfg: Any) -> int:
  """max(128, 4 x the training maximum)."""
  return max(128, 4 * max_recurrence(cfg.train))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  if not os.path.isdir(workdir):
    raise RunDirError(f"run directory {workdir} does not exist")
  stored = read_json(os.path.join(workdir, "config.json"))
  if stored is None:
    raise RunDirError(f"{workdir} holds no config.json: not a run directory")
  cfg = base_config()  # keys added since the run was made take their defaults

  def merge(node, values: dict) -> None:
    for key, value in values.items():
      if isinstance(value, dict) and key in node:
        merge(node[key], value)
      else:
        node[key] = value

  merge(cfg, stored)
  return cfg


def load_params(cfg: Any, workdir: str, init: bool) -> tuple[Any, dict, int]:
  """(graphdef, params, step): the newest checkpoint, or the model at initialisation (step 0)."""
  if init:
    graphdef, params = init_model(cfg.model, cfg.train.seed)
    return graphdef, params, 0
  if not saved_steps(workdir):
    raise RunDirError(f"{workdir} holds no checkpoint (train it first, or evaluate with --init)")
  ckpt = Checkpointer(workdir, cfg.train.keep_checkpoints)
  step = ckpt.latest_step()
  graphdef, abstract = abstract_model(cfg.model, cfg.train.seed)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # every process reads it whole
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), abstract)
  params = ckpt.restore_params(step, abstract)  # also a params-only (imported) checkpoint
  ckpt.close()
  return graphdef, params, step


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


def markdown(summary: dict, report: FixedPointReport, cfg: Any, step: int, init: bool) -> str:
  m = cfg.model
  lines = [f"# Fixed points: **{report.regime}**", "",
           f"{'Random-init control' if init else f'Trained model at step {step}'}: "
           f"({m.n_prelude}, {m.block_size}⊗R, {m.n_coda}), injection `{m.injection}`, norm "
           f"`{m.norm}`/{m.norm_type}, d={m.d_model}, task `{cfg.task.name}`; R = {report.num_iterations}.",
           "", f"- degeneracy (min cos between layer fixed points): {report.degeneracy_min_cosine:.4f}",
           "- tokens at the last block layer: " + ", ".join(
               f"{k} {v:.0%}" for k, v in report.token_classes.items()), "",
           "| layer | converged | converged_at | final change | contraction rate |",
           "| --- | --- | --- | --- | --- |"]
  for l in report.layers:
    rate = "—" if l.contraction_rate is None else f"{l.contraction_rate:.3f}"
    lines.append(f"| {l.layer + 1} | {'yes' if l.converged else 'no'} | {l.converged_at} | "
                 f"{l.final_change:.2e} | {rate} |")
  lines += ["", "| size | exact match at R | best | best iterations | stops changing after |",
            "| --- | --- | --- | --- | --- |"]
  for key in sorted(k for k in summary if k.startswith("acc/len") and k.endswith("/final")):
    n = key.split("/")[1]
    lines.append(f"| {n[3:]} | {summary[key]:.3f} | {summary[f'acc/{n}/best']:.3f} | "
                 f"{summary[f'acc/{n}/best_iters']} | {summary[f'acc/{n}/plateau_iters']} |")
  lines += ["", "Thresholds: " + ", ".join(f"{k}={v}" for k, v in report.thresholds.items()), "",
            "Plots: " + ", ".join(f"[{p}](plots/{p}.png)" for p in (
                "convergence", "distance", "attention_similarity", "trajectory_pca", "stage_metrics",
                "accuracy"))]
  return "\n".join(lines) + "\n"


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, *, init: bool = False,
             iterations: int | None = None, batch_size: int | None = None, chunk: int | None = None,
             thresholds: dict | None = None, log_wandb: bool = True, progress: bool = True,
             predictions: dict | None = None) -> dict:
  """Evaluate one run; returns the summary fields (also written to fixed_points.json).
  Unset arguments come from the config's `eval` section. `predictions`, when given, is filled with
  {size: the [R, B, S] predictions behind that size's accuracy curve} (a sweep trial hands them on to
  the halting evaluation, which uses the same batches)."""
  from tqdm import tqdm

  cfg = resolve(cfg)
  distributed.initialize(cfg.distributed)
  R = iterations or cfg.eval.iterations or default_iterations(cfg)
  batch_size = batch_size or cfg.eval.batch_size
  chunk = chunk or cfg.eval.chunk
  if R < 3:
    raise RunDirError(f"--iterations={R}: the analysis needs at least 3 iterations")
  if init and saved_steps(workdir):
    raise RunDirError(f"{workdir} holds a trained run; evaluate the random-init control elsewhere")
  if init and os.path.isdir(workdir):
    check_compatible(workdir, cfg.to_dict())
  graphdef, params, step = load_params(cfg, workdir, init)
  main = jax.process_index() == 0  # with several processes, each evaluates; process 0 writes
  if main:
    os.makedirs(workdir, exist_ok=True)
    if init and not os.path.exists(os.path.join(workdir, "config.json")):
      write_json_atomic(os.path.join(workdir, "config.json"), cfg.to_dict())
  task = get_task(cfg.task.name)
  capture = Capture(graphdef, params, chunk=chunk, seed=cfg.train.seed)

  def batch_of(n: int, size: int) -> dict:
    b = make_batch(task, seed=cfg.train.seed, step=0, batch_size=size, min_length=n,
                   max_length=n, stream=1)
    b.pop("lengths")
    return b

  train_batch = batch_of(cfg.task.train_length, batch_size)
  n_lengths = 1 + len(cfg.task.test_lengths)
  bar = tqdm(total=(2 + n_lengths) * R, desc="eval", unit="iter", disable=not progress, dynamic_ncols=True)

  points: list[np.ndarray] = []  # a few tokens' full trajectories for the PCA plot, from pass 1

  def counted(chunks):
    def replay():
      keep = not points
      for st, att in chunks():
        bar.update(len(st))
        if keep:
          points.append(st[:, :, 0, -N_PCA_TOKENS:, :])
        yield st, att
    return replay

  report = analyze_stream(counted(capture.chunks(train_batch, R, attention=True)), **(thresholds or {}))
  curves = {}
  for n in (cfg.task.train_length, *cfg.task.test_lengths):
    curve = capture.accuracy_curve(batch_of(n, cfg.train.eval_batch_size), R)
    curves[n] = curve["exact_match"]
    if predictions is not None:
      predictions[n] = curve["predictions"]
    bar.update(R)
  bar.close()

  summary = summary_fields(report, curves, cfg.task.train_length)
  if not main:
    return summary
  plot_paths = plots.all_plots(report, np.concatenate(points), curves, cfg.task.train_length,
                               os.path.join(workdir, "plots"))
  result = {"summary": summary, "step": step, "init": init, "iterations": R, "batch_size": batch_size,
            "curve_batch_size": cfg.train.eval_batch_size, "report": report.to_dict(),
            "accuracy_curves": {str(n): c.tolist() for n, c in curves.items()}}
  write_json_atomic(os.path.join(workdir, "fixed_points.json"), result)
  with open(os.path.join(workdir, "fixed_points.md"), "w") as f:
    f.write(markdown(summary, report, cfg, step, init))
  if log_wandb:
    _log_wandb(cfg, workdir, summary, report, plot_paths, curves, step, init)
  return summary


def _log_wandb(cfg, workdir, summary, report, plot_paths, curves, step, init) -> None:
  """Into the trial's own W&B run (resumed by id) or, for a random-init control, a new eval run."""
  if cfg.wandb.mode == "disabled":
    return
  import wandb
  status = read_status(workdir) or {}
  logger = MetricsLogger(workdir, cfg.wandb, cfg.to_dict(), status.get("wandb_run_id"),
                         job_type="init_control" if init else "train", jsonl=False)
  if logger.run is None:
    return
  table = wandb.Table(columns=["layer", "converged", "converged_at", "final_change", "contraction_rate"],
                      data=[[l.layer + 1, l.converged, l.converged_at, l.final_change, l.contraction_rate]
                            for l in report.layers])
  images = {f"fp/plots/{name}": wandb.Image(path) for name, path in plot_paths.items()}
  curve_rows = [[n, t + 1, float(a)] for n, acc in curves.items() for t, a in enumerate(acc)]
  logger.run.log({**images, "fp/layers": table,
                  "acc/curves": wandb.Table(columns=["size", "iterations", "exact_match"],
                                            data=curve_rows)}, step=max(step, logger.run.step))
  logger.run.summary.update({k: v for k, v in summary.items() if v is not None})
  if status.get("wandb_run_id") is None and init:
    from train.workdir import write_status
    write_status(workdir, "done", wandb_run_id=logger.run.id, step=0)
  logger.run.finish()
