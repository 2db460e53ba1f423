"""Phase diagrams of a sweep over init scale: per injection x norm cell, the majority regime across
seeds (colour) and its agreement (number, and shade) against the hidden-weight std (x) and every
other swept key (y: embedding std, width, ...), with a reference table (e.g. a paper's) marked.

  data = phase_data(rows)            # rows as sweeps.records.load gives them; None without init_std
  plot_phase(data, "report_phase.png", reference={("concat", "pre"): "cyclic", ...})
  header, body = reference_table(data, PAPER_RANDOM_INIT)  # how many boxes agree with the table

`model.init_std = 0` means 1/sqrt(fan_in) (configs/base.py); it is drawn as the first column.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

import numpy as np

from eval.plots import plt, save
from sweeps.records import DARK, REGIME_COLORS, cell_axes, value_of, verdict

X_KEY = "model.init_std"
PANEL_KEYS = ("model.injection", "model.norm")
# Blayney et al. 2026's random-init table (12-layer block), the cells of it recorded here; "not
# converged" stands for any regime but cyclic and degenerate. The report marks them on its diagram.
PAPER_RANDOM_INIT = {("concat", "pre"): "cyclic", ("concat", "peri"): "not converged"}


def agrees(regime: str | None, reference: str) -> bool:
  """Whether a measured regime matches a reference table's entry ("not converged": anything that
  did not converge, trials that did not finish excepted)."""
  if reference == "not converged":
    return regime in ("orbit", "slider", "divergent", "unconverged")
  return regime == reference


def _label(value: Any) -> str:
  return "1/√fan_in" if value == 0 else f"{value:g}" if isinstance(value, float) else str(value)


def phase_data(rows: list[dict]) -> dict | None:
  """{"x": init stds (0 first), "y": tuples of the other swept keys' values, "y_keys", "panels":
  {(injection, norm): {"majority": [[regime]] (y by x), "agree": [[(count, seeds)]]}}}, or None
  when the sweep does not vary model.init_std. Ties go to the regime first seen."""
  axes = cell_axes(rows)
  if X_KEY not in axes:
    return None
  y_keys = [a for a in axes if a not in (X_KEY, *PANEL_KEYS)]
  xs = sorted({value_of(r, X_KEY) for r in rows}, key=lambda v: (v != 0, v))
  ys = list(dict.fromkeys(tuple(value_of(r, k) for k in y_keys) for r in rows))
  counts: dict[tuple, dict[tuple, collections.Counter]] = collections.defaultdict(
      lambda: collections.defaultdict(collections.Counter))
  for r in rows:
    panel = tuple(value_of(r, k) for k in PANEL_KEYS)
    y = tuple(value_of(r, k) for k in y_keys)
    counts[panel][(y, value_of(r, X_KEY))][verdict(r)] += 1
  panels = {}
  for panel, cells in counts.items():
    majority = [[None] * len(xs) for _ in ys]
    agree = [[(0, 0)] * len(xs) for _ in ys]
    for (y, x), counter in cells.items():
      regime, n = counter.most_common(1)[0]
      i, j = ys.index(y), xs.index(x)
      majority[i][j], agree[i][j] = regime, (n, sum(counter.values()))
    panels[panel] = {"majority": majority, "agree": agree}
  return {"x": xs, "y": ys, "y_keys": y_keys, "panels": panels}


def reference_table(data: dict, reference: Mapping[tuple, str], label: str = "paper"
                    ) -> tuple[list[str], list[list[str]]]:
  """Per injection x norm panel of `data` that `reference` names: the reference's regime, how many
  of the panel's boxes (init std x other swept keys) have a majority regime that `agrees` with it,
  the init stds at which every box agrees, and the majority regimes counted over the boxes. Panels
  the sweep did not run are left out (an empty body when none matches)."""
  header = ["injection × norm", label, "boxes that agree", "init_std where all agree",
            "majority regimes (boxes)"]
  body = []
  for (inj, norm), ref in reference.items():
    panel = data["panels"].get((inj, norm))
    if panel is None:
      continue
    grid = panel["majority"]
    ok = [[regime is not None and agrees(regime, ref) for regime in row] for row in grid]
    n_ok, n_boxes = sum(map(sum, ok)), sum(r is not None for row in grid for r in row)
    columns = [_label(x) for j, x in enumerate(data["x"]) if all(row[j] for row in ok)]
    counts = collections.Counter(r for row in grid for r in row if r is not None)
    order = sorted(counts, key=lambda r: (-counts[r], list(REGIME_COLORS).index(r)
                                          if r in REGIME_COLORS else len(REGIME_COLORS)))
    body.append([f"{inj} + {norm}", ref, f"{n_ok}/{n_boxes}", ", ".join(columns) or "none",
                 ", ".join(f"{r} {counts[r]}" for r in order)])
  return header, body


def plot_phase(data: dict, path: str | None, reference: Mapping[tuple, str] | None = None,
               reference_label: str = "paper") -> Any:
  """One panel per injection x norm cell: the majority regime's colour, lighter where the seeds
  disagree, with "n/N" in each box; a reference regime per panel is named in its title and drawn
  as its frame colour. PNG and SVG (eval.plots.save); path=None returns the figure."""
  panels = data["panels"]
  injections = list(dict.fromkeys(p[0] for p in panels))
  norms = list(dict.fromkeys(p[1] for p in panels))
  xs, ys = data["x"], data["y"]
  w, h = 0.55 * len(xs) + 1.8, 0.4 * len(ys) + 1.6
  fig, axes = plt.subplots(len(injections), len(norms), squeeze=False, layout="constrained",
                           figsize=(max(w * len(norms), 6.5), h * len(injections) + 1.4))
  seen = set()
  for a, inj in enumerate(injections):
    for b, norm in enumerate(norms):
      ax = axes[a][b]
      ax.grid(False)
      panel = panels.get((inj, norm))
      for i in range(len(ys)):
        for j in range(len(xs)):
          regime = panel["majority"][i][j] if panel else None
          n, N = panel["agree"][i][j] if panel else (0, 0)
          color = REGIME_COLORS.get(regime or "pending", "#FFFFFF")
          seen.add(regime)
          ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=color, alpha=0.35 + 0.65 * (n / N if N else 0),
                                     edgecolor="white", lw=1.5))
          ax.text(j + 0.5, i + 0.5, f"{n}/{N}" if N else "—", ha="center", va="center", fontsize=7,
                  color="white" if regime in DARK and N and n == N else "black")
      ax.set_xlim(0, len(xs))
      ax.set_ylim(len(ys), 0)
      ax.set_xticks(np.arange(len(xs)) + 0.5, [_label(x) for x in xs], rotation=45, fontsize=7)
      ax.set_yticks(np.arange(len(ys)) + 0.5, [", ".join(_label(v) for v in y) for y in ys], fontsize=7)
      ref = (reference or {}).get((inj, norm))
      ax.set_title(f"{inj} + {norm}" + (f" ({reference_label}: {ref})" if ref else ""), fontsize=9)
      if ref:
        for spine in ax.spines.values():
          spine.set(visible=True, color=REGIME_COLORS.get(ref, "#000000"), linewidth=3)
      ax.set_xlabel("hidden-weight std (init_std)", fontsize=8)
      if b == 0:
        ax.set_ylabel(", ".join(k.split(".")[-1] for k in data["y_keys"]) or "—", fontsize=8)
  seen.discard(None)
  order = [r for r in REGIME_COLORS if r in seen]
  handles = [plt.Rectangle((0, 0), 1, 1, facecolor=REGIME_COLORS[r], edgecolor="0.6") for r in order]
  fig.legend(handles, order, loc="outside lower center", ncol=max(len(order), 1), frameon=False,
             fontsize=8, title="majority regime of the seeds (n/N agree; lighter: they disagree)",
             title_fontsize=8)
  fig.suptitle("Regime against init scale, per injection × norm")
  return save(fig, path)
