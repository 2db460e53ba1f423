"""One evaluation: load a trained run (or a model at initialisation), capture its trajectory, analyse
fixed points, measure accuracy against iterations, write fixed_points.json/.md and plots, log to W&B."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from eval import plots
from rundir import outputs
from eval.capture import Capture
from eval.fixed_points import FixedPointReport, analyze_stream
from rundir import distributed
from rundir.checkpoint import saved_steps
from rundir.config import is_text, resolve
from rundir.logger import MetricsLogger
from configs.recurrence import max_recurrence
from rundir.run import open_run
from tasks.synthetic import make_batch, task_of
from rundir.workdir import RunDirError, check_compatible, path, read_json, read_status, write_json_atomic

N_PCA_TOKENS = 4


def default_iterations(cfg: Any) -> int:
  """max(128, 4 x the training maximum)."""
  return max(128, 4 * max_recurrence(cfg.train))


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


def evaluate(cfg: ml_collections.ConfigDict, workdir: str, *, init: bool = False,
             iterations: int | None = None, batch_size: int | None = None, chunk: int | None = None,
             thresholds: dict | None = None, log_wandb: bool = True, progress: bool = True,
             predictions: dict | None = None, compare: str | None = None) -> dict:
  """Evaluate one run; returns the summary fields (also written to fixed_points.json).
  Unset arguments come from the config's `eval` section. `predictions`, when given, is filled with
  {size: the [R, B, S] predictions behind that size's accuracy curve} (a sweep trial hands them on to
  the halting evaluation, which uses the same batches). A text run is measured on held-out windows
  of its corpus: loss and bits per byte against iterations instead of accuracy, the PCA tokens
  labelled with their text, and, with `compare` (a control run's directory, e.g. a feedforward
  model), that run's stage metrics beside this one's."""
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
  if init and path(workdir).is_dir():
    check_compatible(workdir, cfg.to_dict())
  text = is_text(cfg)
  control = compare_stage_metrics(compare) if compare else None
  run = open_run(workdir, cfg=cfg, init=init)
  graphdef, params, step = run.graphdef, run.params, run.step
  main = jax.process_index() == 0  # with several processes, each evaluates; process 0 writes
  if main:
    path(workdir).mkdir(parents=True, exist_ok=True)
    if init and not (path(workdir) / "config.json").exists():
      write_json_atomic(path(workdir) / "config.json", cfg.to_dict())
  task = task_of(cfg)
  capture = Capture(graphdef, params, chunk=chunk, seed=cfg.train.seed,
                    token_bytes=task.data.token_bytes if text else None, mesh=run.mesh)

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
  starts = cfg.eval.path_starts
  path_check = capture.path_independence(train_batch, R, starts, cfg.train.seed) if starts else None
  curves, text_curves = {}, {}
  for n in (cfg.task.train_length, *cfg.task.test_lengths):
    curve = capture.accuracy_curve(batch_of(n, cfg.train.eval_batch_size), R)
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
  if not main:
    return summary
  pca_tokens = None
  if text:  # the PCA plot's tokens: the last N_PCA_TOKENS of the first analysed window
    tok = run.tokenizer or task.data.tokenizer()
    pca_tokens = [tok.token_text(int(i)) for i in train_batch["inputs"][0, -N_PCA_TOKENS:]]
  outdir = outputs.output_dir(workdir, step, "fixed_points.json")  # eval/STEP/, never overwritten
  plot_paths = plots.all_plots(report, np.concatenate(points), curves, cfg.task.train_length,
                               os.path.join(outdir, "plots"), labels=pca_tokens)
  if text:
    plot_paths["loss"] = plots.loss_curves({n: c["loss"] for n, c in text_curves.items()},
                                           os.path.join(outdir, "plots", "loss.png"),
                                           cfg.task.train_length, max_recurrence(cfg.train))
  if control is not None:
    plot_paths["stage_depth"] = plots.stage_by_depth(report, control,
                                                     os.path.join(outdir, "plots", "stage_depth.png"))
  result = {"summary": summary, "step": step, "init": init, "iterations": R, "batch_size": batch_size,
            "curve_batch_size": cfg.train.eval_batch_size, "report": report.to_dict(),
            "accuracy_curves": {str(n): c.tolist() for n, c in curves.items()}}
  if text:
    result["loss_curves"] = {str(n): {k: v.tolist() for k, v in c.items()} for n, c in text_curves.items()}
    result["pca_tokens"] = pca_tokens
  if control is not None:
    result["compare"] = control
  write_json_atomic(path(outdir) / "fixed_points.json", result)
  (path(outdir) / "fixed_points.md").write_text(markdown(summary, report, cfg, step, init))
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
    from rundir.workdir import write_status
    write_status(workdir, "done", wandb_run_id=logger.run.id, step=0)
  logger.run.finish()
