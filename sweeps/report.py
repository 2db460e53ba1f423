"""The sweep report, built from disk alone: runs/SWEEP/report.md and a self-contained report.html.

  python -m sweeps report runs/SWEEP

Per trial: its axes, status, regime, degeneracy cosine, final per-layer change, converged_at, accuracy
at every size with its best iteration count, wall time. Per block size: a regime grid of injection x
norm with agreement across seeds. Overlaid convergence and extrapolation curves grouped by each axis.
Where trials measured adaptive halting (`eval.halting`, on by default), a table of its savings.
"""

from __future__ import annotations

import base64
import collections
import html
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.workdir import RunDirError, read_json  # noqa: E402

REGIME_COLORS = {"cyclic": "#2a9d8f", "degenerate": "#e9c46a", "orbit": "#8e7dbe", "slider": "#f4a261",
                 "divergent": "#e63946", "unconverged": "#adb5bd", "failed": "#343a40",
                 "diverged": "#e63946", "pending": "#ffffff", "running": "#ffffff"}
GRID_AXES = ("model.block_size", "model.injection", "model.norm")
HALTING_NOTE = ("Per trial, on a mix of all sizes: fixed inference at R_fixed (the fewest iterations "
                "reaching the best exact match on the longest size) against per-token exit once every "
                "block layer has settled, at the ε with the fewest iterations whose exact match is within "
                "0.5 points of it; "
                "the oracle exits once the prediction never changes again (causal: in position order). "
                "Wall × is the measured speedup with per-sequence exit.")


def _get(cfg: dict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node.get(part, {}) if isinstance(node, dict) else {}
  return None if node == {} else node


def load(sweep_dir: str) -> tuple[dict, list[dict]]:
  """(sweep.json, one record per trial with its trial/config/fixed_points data)."""
  index = read_json(os.path.join(sweep_dir, "sweep.json"))
  if index is None:
    raise RunDirError(f"{sweep_dir} holds no sweep.json: not a sweep directory")
  rows = []
  for t in index["trials"]:
    tdir = os.path.join(sweep_dir, t["name"])
    trial = read_json(os.path.join(tdir, "trial.json")) or {"status": "pending"}
    fp = read_json(os.path.join(tdir, "fixed_points.json"))
    halting = read_json(os.path.join(tdir, "halting.json"))
    cfg = read_json(os.path.join(tdir, "config.json")) or t.get("config") or {}
    rows.append({"name": t["name"], "overrides": t["overrides"], "trial": trial, "config": cfg,
                 "fp": fp, "summary": (fp or {}).get("summary", {}),
                 "halting": (halting or {}).get("summary")})
  return index, rows


def verdict(row: dict) -> str:
  status = row["trial"].get("status", "pending")
  if status == "done" and row["summary"]:
    return row["summary"]["fp/regime"]
  return status


def _fmt(v: Any, spec: str = ".3f") -> str:
  if v is None:
    return "—"
  if isinstance(v, float):
    return format(v, spec)
  return str(v)


def _pct(v: float | None) -> str:
  return "—" if v is None else f"{100 * v:.1f}%"


def trial_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
  axes = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
  sizes = sorted({int(k.split("/")[1][3:]) for r in rows for k in r["summary"]
                  if k.startswith("acc/len") and k.endswith("/best")})
  header = ([a.split(".")[-1] for a in axes] + ["status", "regime", "degeneracy cos",
            "final change / layer", "converged_at / layer"] +
            [f"acc@{n} (best it.)" for n in sizes] + ["wall (s)"])
  body = []
  for r in rows:
    s = r["summary"]
    k = _get(r["config"], "model.block_size") or 0
    changes = " ".join(_fmt(s.get(f"fp/layer{l}/final_change"), ".1e") for l in range(1, k + 1))
    conv = " ".join(_fmt(s.get(f"fp/layer{l}/converged_at")) for l in range(1, k + 1))
    accs = [f"{_fmt(s.get(f'acc/len{n}/best'))} ({_fmt(s.get(f'acc/len{n}/best_iters'))})"
            if s else "—" for n in sizes]
    status = r["trial"].get("status", "pending")
    if r["trial"].get("error"):
      status += f": {r['trial']['error']}"
    body.append([_fmt(r["overrides"].get(a), "g") for a in axes] +
                [status, verdict(r) if s else "—", _fmt(s.get("fp/degeneracy_min_cosine"), ".4f"),
                 changes or "—", conv or "—"] + accs + [_fmt(r["trial"].get("wall_s"), ".1f")])
  return header, body


HALTING_HEADER = ["regime", "R_fixed", "acc. at R_fixed", "best ε", "it./token (max)",
                  "oracle (causal)", "it. saved", "acc. drop (pts)", "FLOPs saved", "wall ×"]


def halting_table(rows: list[dict]) -> list[list[str]]:
  """One line per trial with halting.json: the best fixed_point threshold within the allowed accuracy
  drop against fixed inference at R_fixed (eval/halting.py), and what it saves."""
  body = []
  for r in rows:
    h = r["halting"]
    if not h:
      continue
    body.append([r["name"], verdict(r), _fmt(h["R_fixed"]), _fmt(h["fixed_exact_match"]),
                 _fmt(h["threshold"], "g") if h["threshold"] is not None else "none within "
                 f"{h['max_drop_points']:g} pts",
                 f"{_fmt(h['mean_iterations'], '.2f')} ({_fmt(h['max_iterations'])})",
                 f"{_fmt(h['oracle_mean_iterations'], '.2f')} "
                 f"({_fmt(h['oracle_causal_mean_iterations'], '.2f')})",
                 _pct(h["iterations_saved_fraction"]), _fmt(h["accuracy_drop_points"], "+.2f"),
                 _pct(h["flops_saved_fraction"]), _fmt(h["wall_speedup"], ".2f")])
  return body


def regime_grids(rows: list[dict]) -> dict[Any, dict]:
  """{block size: {"injections", "norms", "cells": {(inj, norm): Counter of verdicts}}}."""
  grids: dict[Any, dict] = {}
  for r in rows:
    k, inj, norm = (_get(r["config"], a) if r["config"] else r["overrides"].get(a) for a in GRID_AXES)
    g = grids.setdefault(k, {"injections": [], "norms": [], "cells": collections.defaultdict(collections.Counter)})
    if inj not in g["injections"]:
      g["injections"].append(inj)
    if norm not in g["norms"]:
      g["norms"].append(norm)
    g["cells"][(inj, norm)][verdict(r)] += 1
  return grids


def cell_text(counter: collections.Counter) -> str:
  n = sum(counter.values())
  return ", ".join(f"{v} {c}/{n}" for v, c in counter.most_common())


def _plot_grids(grids: dict, path: str) -> str:
  fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.6), squeeze=False)
  for ax, (k, g) in zip(axes[0], sorted(grids.items(), key=lambda kv: str(kv[0]))):
    for i, inj in enumerate(g["injections"]):
      for j, norm in enumerate(g["norms"]):
        counter = g["cells"].get((inj, norm), collections.Counter())
        top = counter.most_common(1)[0][0] if counter else "pending"
        ax.add_patch(plt.Rectangle((j, i), 1, 1, color=REGIME_COLORS.get(top, "#ffffff"), ec="white"))
        share = f"{counter[top]}/{sum(counter.values())}" if counter else ""
        ax.text(j + 0.5, i + 0.5, f"{top}\n{share}", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(g["norms"]))
    ax.set_ylim(len(g["injections"]), 0)
    ax.set_xticks(np.arange(len(g["norms"])) + 0.5, g["norms"])
    ax.set_yticks(np.arange(len(g["injections"])) + 0.5, g["injections"])
    ax.set(title=f"block size k={k}", xlabel="norm", ylabel="injection")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_grouped(rows: list[dict], axis: str, series, ylabel: str, log: bool, path: str) -> str | None:
  groups = collections.defaultdict(list)
  for r in rows:
    value = _get(r["config"], axis) if r["config"] else r["overrides"].get(axis)
    y = series(r)
    if y is not None and value is not None:
      groups[value].append((r["name"], np.asarray(y, dtype=float)))
  if not groups:
    return None
  fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False, sharey=True)
  for ax, (value, curves) in zip(axes[0], sorted(groups.items(), key=lambda kv: str(kv[0]))):
    for _, y in curves:
      x = np.arange(1, len(y) + 1)
      ax.plot(x, np.where(np.isfinite(y) & ((y > 0) | (not log)), y, np.nan), lw=0.9, alpha=0.7)
    ax.set(title=f"{axis.split('.')[-1]} = {value}", xlabel="iteration")
    if log:
      ax.set_yscale("log")
  axes[0][0].set_ylabel(ylabel)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _last_layer_change(r: dict):
  fp = r["fp"]
  if not fp:
    return None
  sc = fp["report"]["series"]["successive_change"]
  return [row[-1] if row[-1] is not None else np.nan for row in sc]


def _longest_curve(r: dict):
  fp = r["fp"]
  if not fp or not fp.get("accuracy_curves"):
    return None
  return fp["accuracy_curves"][max(fp["accuracy_curves"], key=int)]


def write_report(sweep_dir: str) -> dict[str, str]:
  """Write report.md, report.html and report_*.png in `sweep_dir`; returns their paths."""
  index, rows = load(sweep_dir)
  header, body = trial_table(rows)
  grids = regime_grids(rows)
  images = {"regimes": _plot_grids(grids, os.path.join(sweep_dir, "report_regimes.png"))}
  for axis in GRID_AXES:
    short = axis.split(".")[-1]
    for kind, fn, label, log in (("convergence", _last_layer_change, "successive change (last layer)", True),
                                 ("extrapolation", _longest_curve, "exact match, longest size", False)):
      p = _plot_grouped(rows, axis, fn, label, log, os.path.join(sweep_dir, f"report_{kind}_by_{short}.png"))
      if p:
        images[f"{kind} by {short}"] = p
  counts = collections.Counter(r["trial"].get("status", "pending") for r in rows)
  md = [f"# Sweep `{index['sweep']}`", "",
        f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ".", "",
        "## Regimes by injection × norm", ""]
  for k, g in sorted(grids.items(), key=lambda kv: str(kv[0])):
    md += [f"### block size k = {k}", "", "| injection \\ norm | " + " | ".join(g["norms"]) + " |",
           "| --- |" + " --- |" * len(g["norms"])]
    for inj in g["injections"]:
      md.append(f"| {inj} | " + " | ".join(cell_text(g["cells"].get((inj, n), collections.Counter()))
                                           for n in g["norms"]) + " |")
    md.append("")
  md += ["## Trials", "", "| trial | " + " | ".join(header) + " |", "|" + " --- |" * (len(header) + 1)]
  md += [f"| {r['name']} | " + " | ".join(c.replace("|", "/") for c in cells) + " |"
         for r, cells in zip(rows, body)]
  halting = halting_table(rows)
  if halting:
    md += ["", "## Adaptive halting (fixed_point criterion)", "", HALTING_NOTE, "",
           "| trial | " + " | ".join(HALTING_HEADER) + " |", "|" + " --- |" * (len(HALTING_HEADER) + 1)]
    md += ["| " + " | ".join(cells) + " |" for cells in halting]
  md += ["", "## Figures", ""] + [f"![{name}]({os.path.basename(p)})" for name, p in images.items()]
  md_path = os.path.join(sweep_dir, "report.md")
  with open(md_path, "w") as f:
    f.write("\n".join(md) + "\n")
  html_path = os.path.join(sweep_dir, "report.html")
  with open(html_path, "w") as f:
    f.write(_html(index["sweep"], grids, header, body, rows, images, counts, halting))
  return {"md": md_path, "html": html_path, **images}


def _html(sweep, grids, header, body, rows, images, counts, halting) -> str:
  e = html.escape
  parts = [f"<!doctype html><meta charset='utf-8'><title>Sweep {e(sweep)}</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>",
           f"<h1>Sweep {e(sweep)}</h1><p>{len(rows)} trials: "
           + e(", ".join(f"{n} {s}" for s, n in counts.most_common())) + "</p><h2>Regimes</h2>"]
  for k, g in sorted(grids.items(), key=lambda kv: str(kv[0])):
    parts.append(f"<h3>block size k = {e(str(k))}</h3><table><tr><th>injection \\ norm</th>"
                 + "".join(f"<th>{e(str(n))}</th>" for n in g["norms"]) + "</tr>")
    for inj in g["injections"]:
      cells = []
      for n in g["norms"]:
        counter = g["cells"].get((inj, n), collections.Counter())
        top = counter.most_common(1)[0][0] if counter else "pending"
        cells.append(f"<td style='background:{REGIME_COLORS.get(top, '#fff')}'>{e(cell_text(counter))}</td>")
      parts.append(f"<tr><th>{e(str(inj))}</th>{''.join(cells)}</tr>")
    parts.append("</table>")
  parts.append("<h2>Trials</h2><table><tr><th>trial</th>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
  for r, cells in zip(rows, body):
    parts.append(f"<tr><td>{e(r['name'])}</td>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
  parts.append("</table>")
  if halting:
    parts.append(f"<h2>Adaptive halting (fixed_point criterion)</h2><p>{e(HALTING_NOTE)}</p><table><tr>"
                 + "".join(f"<th>{e(h)}</th>" for h in ["trial", *HALTING_HEADER]) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in halting]
    parts.append("</table>")
  parts.append("<h2>Figures</h2>")
  for name, p in images.items():
    data = base64.b64encode(open(p, "rb").read()).decode()
    parts.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
  return "\n".join(parts) + "\n"
