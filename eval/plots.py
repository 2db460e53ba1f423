"""Figures of one evaluation, in one style (matplotlib, Agg): titles, axis labels with units, a legend or
a colour bar on every multi-series figure, the Okabe-Ito colour-blind-safe palette. Each function
writes PNG and SVG side by side (its `formats`) and returns the PNG's path (or, given path=None, the
figure)."""

from __future__ import annotations

import itertools
import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rundir.workdir import path as store_path  # noqa: E402

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
# Paul Tol's "muted" scheme, also colour-blind safe, for figures with more than 8 series.
MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
         "#AA4499", "#555555")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FORMATS = ("png", "svg")  # the default `formats`; a sweep trial asks for PNG only: SVG costs ~1 s a figure
SIMILARITY_ITERATIONS = 8  # Blayney et al. show the attention similarity over the first 8 loops
STAGE_SERIES = (("colsum_concentration", "ColSum concentration C", "C (0 uniform … 1 one column)"),
                ("sink_rate", "Sink rate", "share of heads"),
                ("mixing", "Mixing (mean row entropy)", "entropy (nats)"),
                ("residual_norm", "Residual-stream norm", "‖X‖ (per token)"))
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "svg.fonttype": "none", "axes.prop_cycle": matplotlib.cycler(color=PALETTE)}
plt.rcParams.update(STYLE)


def save(fig, path: str | None, formats: Sequence[str] = FORMATS) -> Any:
  """Write `path` (PNG) and the same figure in the other `formats` beside it, close the figure and
  return `path`; with `path=None`, return the figure itself (to inspect it). A figure made with a
  layout engine (e.g. layout="constrained") keeps it; the others get tight_layout."""
  if fig.get_layout_engine() is None:
    fig.tight_layout()
  if path is None:
    return fig
  for fmt in formats:  # through etils.epath: a local folder or gs://
    with store_path(os.path.splitext(path)[0] + "." + fmt).open("wb") as f:
      fig.savefig(f, format=fmt, dpi=150)
  plt.close(fig)
  return path


_save = save  # the name other modules import


def colors(n: int) -> list[str]:
  """n colour-blind-safe colours (Okabe-Ito up to 8, Tol's muted scheme up to 10, then repeated)."""
  base = PALETTE if n <= len(PALETTE) else MUTED
  return [base[i % len(base)] for i in range(n)]


def line_styles(n: int) -> list[dict[str, Any]]:
  """n distinct (colour, line style) pairs: the palette first, then again with the next line style."""
  return [{"color": c, "linestyle": ls} for ls, c in itertools.islice(
      itertools.product(LINESTYLES, PALETTE), n)]


def _positive(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=float)
  return np.where(np.isfinite(x) & (x > 0), x, np.nan)


def _per_layer(report, rel_Rk, cos_Rk, ylabel: str, title: str, path: str,
               formats: Sequence[str] = FORMATS) -> str:
  """One panel per block layer, log scale: relative norm (solid) and 1 − cos (dashed) over iterations."""
  k = report.block_size
  fig, axes = plt.subplots(1, k, figsize=(min(3.2 * k, 16), 3.2), sharey=True, squeeze=False)
  t = np.arange(1, report.num_iterations + 1)
  for l, ax in enumerate(axes[0]):
    ax.semilogy(t, _positive(np.asarray(rel_Rk)[:, l]), color=PALETTE[0], label="relative norm")
    ax.semilogy(t, _positive(np.asarray(cos_Rk)[:, l]), "--", color=PALETTE[1], label="1 − cos")
    ax.set(title=f"layer ℓ = {l + 1}", xlabel="iteration t")
    ax.legend(loc="best")
  axes[0][0].set_ylabel(ylabel)
  fig.suptitle(title)
  return save(fig, path, formats)


def convergence(report, path: str, *, formats: Sequence[str] = FORMATS) -> str:
  """Per-layer successive change ‖X_t − X_{t−1}‖/‖X_t‖ and 1 − cos, log scale, one panel per layer."""
  return _per_layer(report, report.successive_change, report.successive_cos,
                    "successive change (relative, log)", f"Convergence per block layer — regime "
                    f"{report.regime}", path, formats)


def distance_to_fixed_point(report, path: str, *, formats: Sequence[str] = FORMATS) -> str:
  return _per_layer(report, report.distance_to_fixed, report.distance_cos,
                    "distance to X*_ℓ = X_ℓ,R (relative, log)",
                    "Distance to the approximate fixed point per block layer", path, formats)


def attention_similarity(report, path: str, iterations: int = SIMILARITY_ITERATIONS, *,
                         formats: Sequence[str] = FORMATS) -> str:
  """The (layer, iteration)² cosine similarity of attention maps over the first `iterations`
  iterations (iteration-major: one block of k rows per iteration)."""
  k = report.block_size
  T = max(1, min(iterations, report.num_iterations))
  sim = np.asarray(report.attention_similarity, dtype=float)[:T * k, :T * k]
  fig, ax = plt.subplots(figsize=(5.2, 4.6))
  im = ax.imshow(sim, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
  ticks = np.arange(T) * k + (k - 1) / 2
  ax.set_xticks(ticks, [str(t + 1) for t in range(T)])
  ax.set_yticks(ticks, [str(t + 1) for t in range(T)])
  for edge in np.arange(1, T) * k - 0.5:
    ax.axhline(edge, color="white", lw=0.4)
    ax.axvline(edge, color="white", lw=0.4)
  ax.grid(False)
  ax.set(xlabel=f"iteration t (k = {k} layers each)", ylabel=f"iteration t (k = {k} layers each)",
         title=f"Attention similarity, first {T} iterations")
  fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity of attention maps")
  return save(fig, path, formats)


def trajectory_pca(points_RkND: np.ndarray, path: str, labels: Sequence[str] | None = None, *,
                   formats: Sequence[str] = FORMATS) -> str:
  """PCA (of directions) of a few tokens' states through layers and iterations; the iteration is the
  colour (with its colour bar), the block layer the marker, and each token is labelled at its end
  (`labels`: one string per token, e.g. its decoded text; default "token i"). A cycle over layers
  shows as a loop."""
  R, k, N, D = points_RkND.shape
  if labels is not None and len(labels) != N:
    raise ValueError(f"labels: {len(labels)} given for {N} tokens")
  labels = list(labels) if labels is not None else [f"token {n + 1}" for n in range(N)]
  x = points_RkND.reshape(-1, D).astype(np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)  # direction, as the analysis
  x = np.nan_to_num(x - x.mean(0))
  _, sv, vt = np.linalg.svd(x, full_matrices=False)
  share = sv ** 2 / max(float(np.sum(sv ** 2)), 1e-30)
  y = (x @ vt[:2].T).reshape(R, k, N, 2)
  fig, ax = plt.subplots(figsize=(6.2, 4.8))
  norm = matplotlib.colors.Normalize(1, max(R, 2))
  for n in range(N):
    path_2 = y[:, :, n].reshape(R * k, 2)
    ax.plot(path_2[:, 0], path_2[:, 1], color="0.75", lw=0.6, zorder=1)
    for l in range(k):
      ax.scatter(y[:, l, n, 0], y[:, l, n, 1], c=np.arange(1, R + 1), cmap="viridis", norm=norm,
                 marker=MARKERS[l % len(MARKERS)], s=14, zorder=2, edgecolors="none",
                 label=f"layer ℓ = {l + 1}" if n == 0 else None)
    end = y[-1, k - 1, n]
    ax.annotate(labels[n], end, xytext=(6, 6 + 9 * (n % 3)), textcoords="offset points", fontsize=7.5,
                arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5},
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "0.7", "lw": 0.4, "alpha": 0.85})
  sm = matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis")
  fig.colorbar(sm, ax=ax, fraction=0.046, label="iteration t")
  if k > 1:
    leg = ax.legend(title="marker", loc="best")
    for handle in leg.legend_handles:
      handle.set_color("0.3")
  ax.set(xlabel=f"PC 1 ({share[0]:.0%} of variance)",
         ylabel=f"PC 2 ({share[1] if len(share) > 1 else 0:.0%} of variance)",
         title=f"Trajectories of {N} tokens through {R} iterations × {k} layers")
  return save(fig, path, formats)


def _series(source: Any, name: str) -> np.ndarray | None:
  values = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
  return None if values is None else np.asarray(values, dtype=float)


def stage_metrics(report, path: str, compare: Any = None, compare_label: str = "control", *,
                  formats: Sequence[str] = FORMATS) -> str:
  """ColSum concentration, sink rate, mixing and residual norm against the iteration t, one line per
  block layer ℓ (by recurrence and by layer). `compare`: another run's metrics (a FixedPointReport,
  or a mapping with the same [R, k] series) overlaid dashed as a control."""
  k = report.block_size
  fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
  styles = line_styles(k)
  for ax, (name, title, unit) in zip(axes.flat, STAGE_SERIES):
    values = _series(report, name)
    if values is not None:
      values = values.reshape(len(values), -1)
      for l in range(values.shape[1]):
        ax.plot(np.arange(1, len(values) + 1), values[:, l], color=styles[l]["color"], lw=1.2,
                label=f"layer ℓ = {l + 1}")
    other = _series(compare, name) if compare is not None else None
    if other is not None:
      other = other.reshape(len(other), -1)
      for l in range(other.shape[1]):
        ax.plot(np.arange(1, len(other) + 1), other[:, l], color=styles[l % k]["color"], lw=1,
                ls="--", alpha=0.7, label=f"ℓ = {l + 1}, {compare_label}")
    ax.set(title=title, ylabel=unit)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="best", ncol=2 if compare is not None else 1)
  for ax in axes[1]:
    ax.set_xlabel("iteration t")
  fig.suptitle("Stages of inference by iteration and block layer"
               + (f" (dashed: {compare_label})" if compare is not None else ""))
  return save(fig, path, formats)


def stage_by_depth(report, control: Mapping[str, Any], path: str | None,
                   iterations: int = SIMILARITY_ITERATIONS, *, formats: Sequence[str] = FORMATS) -> Any:
  """The stage metrics along the unrolled depth — block layer ℓ of iteration t at depth (t−1)·k + ℓ,
  the first `iterations` iterations — beside a control run's layers at its first iteration (e.g. a
  feedforward model: does the looped model repeat the feedforward stages in every iteration?)."""
  k = report.block_size
  fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
  for ax, (name, title, unit) in zip(axes.flat, STAGE_SERIES):
    values = _series(report, name)
    if values is not None:
      values = np.asarray(values, float).reshape(len(values), -1)[:iterations]
      depth = np.arange(1, values.size + 1)
      ax.plot(depth, values.reshape(-1), color=PALETTE[0], lw=1.2, marker=".", ms=3,
              label=f"looped (k = {k}), iterations 1–{len(values)}")
      for t in range(1, len(values)):
        ax.axvline(t * k + 0.5, color="0.85", lw=0.6)
    other = control.get(name)
    if other is not None:
      other = np.asarray(other, float).reshape(-1)
      ax.plot(np.arange(1, len(other) + 1), other, color=PALETTE[5], lw=1.2, ls="--", marker="x",
              ms=3, label=f"control ({len(other)} layers)")
    ax.set(title=title, ylabel=unit)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="best")
  for ax in axes[1]:
    ax.set_xlabel("depth (layer applications; grey lines: iteration boundaries)")
  fig.suptitle("Stages of inference along depth: looped model against the control")
  return save(fig, path, formats)


def accuracy_curves(curves: dict[int, np.ndarray], path: str, train_length: int, *,
                    formats: Sequence[str] = FORMATS) -> str:
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for (n, acc), st in zip(sorted(curves.items()), line_styles(len(curves))):
    ax.plot(np.arange(1, len(acc) + 1), acc, color=st["color"],
            label=f"size {n}" + (" (train)" if n == train_length else ""))
  ax.set(xlabel="iterations r (log)", ylabel="exact match (share of sequences)", ylim=(-0.02, 1.02),
         xscale="log", title="Accuracy against iterations (extrapolation)")
  ax.legend(title="problem size")
  return save(fig, path, formats)


def loss_curves(curves: dict[int, np.ndarray], path: str, train_length: int, train_recurrence: int, *,
                formats: Sequence[str] = FORMATS) -> str:
  """Held-out loss against iterations 1..R (text): does the model extrapolate in depth?"""
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for (n, loss), st in zip(sorted(curves.items()), line_styles(len(curves))):
    ax.plot(np.arange(1, len(loss) + 1), loss, color=st["color"],
            label=f"window {n}" + (" (train)" if n == train_length else ""))
  ax.axvline(train_recurrence, color="0.5", linestyle=":", label=f"training maximum ({train_recurrence})")
  ax.set(xlabel="iterations r (log)", ylabel="held-out loss (nats per token)", xscale="log",
         title="Held-out loss against iterations (extrapolation in depth)")
  ax.legend(title="window (tokens)")
  return save(fig, path, formats)


def all_plots(report, points_RkND, curves, train_length: int, outdir: str, *,
              labels: Sequence[str] | None = None, compare: Any = None,
              similarity_iterations: int = SIMILARITY_ITERATIONS,
              formats: Sequence[str] = FORMATS) -> dict[str, str]:
  store_path(outdir).mkdir(parents=True, exist_ok=True)
  out_path = lambda name: os.path.join(outdir, f"{name}.png")
  out = {"convergence": convergence(report, out_path("convergence"), formats=formats),
         "distance": distance_to_fixed_point(report, out_path("distance"), formats=formats),
         "trajectory_pca": trajectory_pca(points_RkND, out_path("trajectory_pca"), labels=labels,
                                          formats=formats),
         "stage_metrics": stage_metrics(report, out_path("stage_metrics"), compare=compare,
                                        formats=formats),
         "accuracy": accuracy_curves(curves, out_path("accuracy"), train_length, formats=formats)}
  if report.attention_similarity is not None:
    out["attention_similarity"] = attention_similarity(
        report, out_path("attention_similarity"), similarity_iterations, formats=formats)
  return out
