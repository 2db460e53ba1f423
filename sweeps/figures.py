"""The sweep report's figures: the regime grids as coloured tables, and one line per trial against
iterations (convergence, extrapolation). PNG and SVG (eval.plots.save); path=None returns the figure."""

from __future__ import annotations

import collections
from typing import Any, Callable

import numpy as np

from eval.plots import LINESTYLES, colors, plt, save
from sweeps.records import DARK, REGIME_COLORS, SEED, cell_axes, cells, fmt, value_of

MAX_TRIAL_LINES = 64  # beyond this a figure with one line per trial is not drawn (nor readable)


def plot_grids(grids: dict, file: str | None) -> Any:
  """The regime grids (sweeps.tables.regime_grids) as coloured tables: the cell's colour is its most
  common regime, its text the agreement across seeds; a legend names the colours."""
  n = len(grids)
  cols = min(n, 3)
  nrows = (n + cols - 1) // cols
  fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows + 0.6), squeeze=False)
  seen = set()
  for ax, (title, g) in zip(axes.flat, grids.items()):
    ax.grid(False)
    for i, inj in enumerate(g["injections"]):
      for j, norm in enumerate(g["norms"]):
        counter = g["cells"].get((inj, norm), collections.Counter())
        top = counter.most_common(1)[0][0] if counter else "pending"
        seen.add(top)
        ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=REGIME_COLORS.get(top, "#FFFFFF"),
                                   edgecolor="white", lw=2))
        text = "\n".join(f"{v} {c}/{sum(counter.values())}" for v, c in counter.most_common())
        ax.text(j + 0.5, i + 0.5, text or "—", ha="center", va="center", fontsize=7.5,
                color="white" if top in DARK else "black")
    ax.set_xlim(0, len(g["norms"]))
    ax.set_ylim(len(g["injections"]), 0)
    ax.set_xticks(np.arange(len(g["norms"])) + 0.5, [str(x) for x in g["norms"]])
    ax.set_yticks(np.arange(len(g["injections"])) + 0.5, [str(x) for x in g["injections"]])
    ax.set(title=title, xlabel="norm", ylabel="injection")
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  handles = [plt.Rectangle((0, 0), 1, 1, facecolor=REGIME_COLORS[r], edgecolor="0.6")
             for r in REGIME_COLORS if r in seen]
  fig.legend(handles, [r for r in REGIME_COLORS if r in seen], loc="lower center", ncol=len(handles),
             title="regime (most common across seeds)", frameon=False)
  fig.suptitle("Regime per cell (agreement across seeds)")
  fig.tight_layout(rect=(0, 0.1, 1, 1))
  return save(fig, file)


def _cell_label(key: tuple, axes: list[str]) -> str:
  return "-".join(fmt(v, "g") for v, a in zip(key, axes) if a != axes[0]) or "all"


def _panels(rows: list[dict], series: Callable[[dict], Any]) -> dict[Any, dict[tuple, list]]:
  """{value of the first swept axis: {cell: [(seed, the trial's series)]}} over trials that have one."""
  axes = cell_axes(rows)
  panels: dict[Any, dict[tuple, list]] = {}
  for key, members in cells(rows).items():
    for r in members:
      y = series(r)
      if y is not None:
        panels.setdefault(key[0] if axes else None, {}).setdefault(key, []).append(
            (value_of(r, SEED), np.asarray(y, float)))
  return panels


def plot_trials(rows: list[dict], series: Callable[[dict], Any], ylabel: str, title: str, log: bool,
                path: str | None) -> Any:
  """One line per trial, one panel per value of the first swept axis: a colour per cell, a line
  style per seed, and a legend naming every trial. None when no trial has the series, or more than
  MAX_TRIAL_LINES do (e.g. the regime map: its phase diagram is the figure to read)."""
  axes = cell_axes(rows)
  seeds = list(dict.fromkeys(value_of(r, SEED) for r in rows))
  panels = _panels(rows, series)
  if not panels or sum(len(ys) for p in panels.values() for ys in p.values()) > MAX_TRIAL_LINES:
    return None
  n = len(panels)
  fig, grid = plt.subplots(1, n, figsize=(4.8 * n, 4.4), squeeze=False, sharey=True)
  for ax, (value, curves) in zip(grid[0], panels.items()):
    for (key, ys), color in zip(curves.items(), colors(len(curves))):
      for seed, y in ys:
        x = np.arange(1, len(y) + 1)
        y = np.where(np.isfinite(y) & ((y > 0) | (not log)), y, np.nan)
        label = _cell_label(key, axes) + (f", seed {seed}" if len(seeds) > 1 else "")
        ax.plot(x, y, lw=1, alpha=0.9, color=color, label=label,
                linestyle=LINESTYLES[seeds.index(seed) % len(LINESTYLES)])
    ax.set(title=f"{axes[0].split('.')[-1]} = {fmt(value, 'g')}" if axes else title,
           xlabel="iteration t (log)", xscale="log")
    if log:
      ax.set_yscale("log")
    ax.legend(loc="best", fontsize=6, title="trial", title_fontsize=7,
              ncol=2 if sum(len(v) for v in curves.values()) > 10 else 1)
  grid[0][0].set_ylabel(ylabel)
  fig.suptitle(title)
  return save(fig, path)


def last_layer_change(r: dict):
  """A trial's successive change of its last block layer, per iteration."""
  fp = r["fp"]
  if not fp:
    return None
  sc = fp["report"]["series"]["successive_change"]
  return [row[-1] if row[-1] is not None else np.nan for row in sc]


def longest_curve(r: dict):
  """A trial's exact match at its longest test size, per iteration."""
  fp = r["fp"]
  if not fp or not fp.get("accuracy_curves"):
    return None
  return fp["accuracy_curves"][max(fp["accuracy_curves"], key=int)]


def loss_curve(r: dict):
  """A text trial's held-out loss against iterations (its training window)."""
  fp = r["fp"]
  if not fp or not fp.get("loss_curves"):
    return None
  return fp["loss_curves"][min(fp["loss_curves"], key=int)]["loss"]
