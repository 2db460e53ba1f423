"""PNG plots of one evaluation (matplotlib, Agg backend). Each function writes one file and returns its path."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _positive(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=float)
  return np.where(np.isfinite(x) & (x > 0), x, np.nan)


def _per_layer(report, rel_Rk, cos_Rk, ylabel: str, title: str, legend: str, path: str) -> str:
  """One line per block layer on a log scale: relative norm (solid) and 1 - cos (dashed)."""
  fig, ax = plt.subplots(figsize=(6.4, 4))
  t = np.arange(report.num_iterations)
  for l in range(report.block_size):
    line, = ax.semilogy(t, _positive(rel_Rk[:, l]), label=f"layer {l + 1}")
    ax.semilogy(t, _positive(cos_Rk[:, l]), "--", color=line.get_color(), alpha=0.6)
  ax.set(xlabel="iteration t", ylabel=ylabel, title=title)
  ax.legend(title=legend, fontsize=8)
  return _save(fig, path)


def convergence(report, path: str) -> str:
  """Per-layer successive change (relative norm, solid; 1 - cos, dashed) on a log scale."""
  return _per_layer(report, report.successive_change, report.successive_cos, "successive change",
                    f"Convergence — {report.regime}", "solid ‖Δ‖/‖X‖, dashed 1−cos", path)


def distance_to_fixed_point(report, path: str) -> str:
  return _per_layer(report, report.distance_to_fixed, report.distance_cos, "distance to X*_ℓ = X_ℓ,R",
                    "Distance to the approximate fixed point", "solid ‖X−X*‖/‖X*‖, dashed 1−cos", path)


def attention_similarity(report, path: str) -> str:
  """The (iteration, layer)² cosine similarity of attention maps, iteration-major."""
  fig, ax = plt.subplots(figsize=(5.2, 4.6))
  im = ax.imshow(report.attention_similarity, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
  ticks = np.arange(0, report.num_iterations, max(1, report.num_iterations // 8)) * report.block_size
  ax.set_xticks(ticks, ticks // report.block_size)
  ax.set_yticks(ticks, ticks // report.block_size)
  ax.set(xlabel="iteration (layers within)", ylabel="iteration (layers within)",
         title="Attention similarity (layer, iteration)²")
  fig.colorbar(im, ax=ax, fraction=0.046)
  return _save(fig, path)


def trajectory_pca(points_RkND: np.ndarray, path: str) -> str:
  """PCA of a few tokens' states through layers and iterations; a cycle over layers shows as a loop."""
  R, k, N, D = points_RkND.shape
  x = points_RkND.reshape(-1, D).astype(np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)  # direction, as the analysis
  x = np.nan_to_num(x - x.mean(0))
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  y = (x @ vt[:2].T).reshape(R, k, N, 2)
  fig, ax = plt.subplots(figsize=(5.6, 4.6))
  colors = plt.cm.viridis(np.linspace(0, 1, R))
  for n in range(N):
    path_2 = y[:, :, n].reshape(R * k, 2)
    ax.plot(path_2[:, 0], path_2[:, 1], color="0.8", lw=0.6, zorder=1)
    ax.scatter(path_2[:, 0], path_2[:, 1], c=np.repeat(colors, k, axis=0), s=8, zorder=2)
    for l in range(k):
      ax.annotate(f"ℓ{l + 1}", y[-1, l, n], fontsize=7)
  ax.set(xlabel="PC 1", ylabel="PC 2", title=f"Trajectories of {N} tokens (colour: iteration)")
  return _save(fig, path)


def stage_metrics(report, path: str) -> str:
  """ColSum concentration, sink rate, mixing and residual norm over depth t*k + ℓ."""
  fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), sharex=True)
  depth = np.arange(report.num_iterations * report.block_size)
  series = [("ColSum concentration", report.colsum_concentration), ("sink rate", report.sink_rate),
            ("mixing (row entropy)", report.mixing), ("residual norm", report.residual_norm)]
  for ax, (name, values) in zip(axes.flat, series):
    if values is not None:
      ax.plot(depth, np.asarray(values).reshape(-1), lw=1)
    ax.set(title=name)
  for ax in axes[1]:
    ax.set_xlabel("depth (iteration × k + layer)")
  return _save(fig, path)


def accuracy_curves(curves: dict[int, np.ndarray], path: str, train_length: int) -> str:
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for n, acc in sorted(curves.items()):
    ax.plot(np.arange(1, len(acc) + 1), acc, label=f"size {n}" + (" (train)" if n == train_length else ""))
  ax.set(xlabel="iterations", ylabel="exact match", ylim=(-0.02, 1.02), xscale="log",
         title="Accuracy against iterations")
  ax.legend(fontsize=8)
  return _save(fig, path)


def loss_curves(curves: dict[int, np.ndarray], path: str, train_length: int, train_recurrence: int) -> str:
  """Held-out loss against iterations 1..R (text): does the model extrapolate in depth?"""
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for n, loss in sorted(curves.items()):
    ax.plot(np.arange(1, len(loss) + 1), loss,
            label=f"window {n}" + (" (train)" if n == train_length else ""))
  ax.axvline(train_recurrence, color="0.5", linestyle=":", label=f"training maximum ({train_recurrence})")
  ax.set(xlabel="iterations", ylabel="held-out loss (nats per token)", xscale="log",
         title="Held-out loss against iterations")
  ax.legend(fontsize=8)
  return _save(fig, path)


def all_plots(report, points_RkND, curves, train_length: int, outdir: str) -> dict[str, str]:
  os.makedirs(outdir, exist_ok=True)
  out = {"convergence": convergence(report, os.path.join(outdir, "convergence.png")),
         "distance": distance_to_fixed_point(report, os.path.join(outdir, "distance.png")),
         "trajectory_pca": trajectory_pca(points_RkND, os.path.join(outdir, "trajectory_pca.png")),
         "stage_metrics": stage_metrics(report, os.path.join(outdir, "stage_metrics.png")),
         "accuracy": accuracy_curves(curves, os.path.join(outdir, "accuracy.png"), train_length)}
  if report.attention_similarity is not None:
    out["attention_similarity"] = attention_similarity(report, os.path.join(outdir, "attention_similarity.png"))
  return out
