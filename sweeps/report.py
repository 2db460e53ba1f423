"""The sweep report, built from disk alone: runs/SWEEP/report.md and a self-contained report.html.

  python -m sweeps report runs/SWEEP

Trials are grouped into cells by every swept key except the seed (`train.seed`), and each cell
aggregates its seeds: regime agreement (`cyclic 2/3`), mean ± standard deviation of accuracy (or
validation loss), convergence iteration, degeneracy cosine and halting savings. Then per trial: its
axes, status, regime, degeneracy cosine, final per-layer change, converged_at, accuracy at every size
with its best iteration count, wall time; regime grids of injection × norm (one per value of the
other axes); where trials measured adaptive halting (`eval.halting`), a table of its savings; and the
figures (PNG and SVG; the HTML embeds the PNGs).
"""

from __future__ import annotations

import base64
import collections
import html
import os
from typing import Any

import numpy as np

from rundir import outputs
from eval.plots import LINESTYLES, colors, plt, save
from sweeps.phase import PAPER_RANDOM_INIT, phase_data, plot_phase, reference_table
from rundir.workdir import RunDirError, path, read_json

# Okabe-Ito colours for the regimes (colour-blind safe); dark cells get white text.
REGIME_COLORS = {"cyclic": "#009E73", "degenerate": "#F0E442", "orbit": "#CC79A7", "slider": "#E69F00",
                 "divergent": "#D55E00", "unconverged": "#BBBBBB", "failed": "#000000",
                 "diverged": "#D55E00", "pending": "#FFFFFF", "running": "#FFFFFF"}
DARK = ("failed", "cyclic", "divergent", "diverged")
SEED = "train.seed"
GRID_AXES = ("model.injection", "model.norm")  # rows x columns of each regime grid
HALTING_NOTE = ("Per trial, on a mix of all sizes: fixed inference at R_fixed (the fewest iterations "
                "reaching the best accuracy on the longest size: exact match, or next-token accuracy "
                "on text) against per-token exit once every block layer has settled, at the ε with the "
                "fewest iterations whose accuracy is within 0.5 points of it; "
                "the oracle exits once the prediction never changes again (causal: in position order). "
                "Wall × is the measured speedup with per-sequence exit.")
PAPER_NOTE = ("Blayney et al. 2026's regimes at random initialisation (12-layer block) for the injection × "
              "norm cells it reports, against this sweep's majority regime (over seeds) in each box of "
              "the phase diagram; \"not converged\" counts any regime but cyclic and degenerate.")


def _get(cfg: dict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node.get(part, {}) if isinstance(node, dict) else {}
  return None if node == {} else node


def _read_trial(tdir: str) -> tuple[dict | None, dict | None]:
  """(fixed_points.json, halting.json) of a trial: the newest evaluation, and the halting measured
  beside it (else the newest halting)."""
  fp_path = outputs.latest(tdir, "fixed_points.json")
  halting_path = None
  if fp_path and (path(fp_path).parent / "halting.json").exists():
    halting_path = str(path(fp_path).parent / "halting.json")
  halting_path = halting_path or outputs.latest(tdir, "halting.json")
  return (read_json(fp_path) if fp_path else None), (read_json(halting_path) if halting_path else None)


def load(sweep_dir: str) -> tuple[dict, list[dict]]:
  """(sweep.json, one record per trial with its trial/config/fixed_points data)."""
  index = read_json(path(sweep_dir) / "sweep.json")
  if index is None:
    raise RunDirError(f"{sweep_dir} holds no sweep.json: not a sweep directory")
  rows = []
  for t in index["trials"]:
    tdir = str(path(sweep_dir) / t["name"])
    trial = read_json(path(tdir) / "trial.json") or {"status": "pending"}
    fp, halting = _read_trial(tdir)
    cfg = (read_json(outputs.finished_config_path(tdir)) if path(tdir).is_dir() else None) \
        or t.get("config") or {}
    rows.append({"name": t["name"], "overrides": t["overrides"], "trial": trial, "config": cfg,
                 "fp": fp, "summary": (fp or {}).get("summary", {}),
                 "halting": (halting or {}).get("summary")})
  return index, rows


def verdict(row: dict) -> str:
  status = row["trial"].get("status", "pending")
  if status == "done" and row["summary"]:
    return row["summary"]["fp/regime"]
  return status


def value_of(row: dict, key: str) -> Any:
  """A config value of a trial: its override, else its config."""
  if key in row["overrides"]:
    return row["overrides"][key]
  return _get(row["config"], key)


def _fmt(v: Any, spec: str = ".3f") -> str:
  if v is None:
    return "—"
  if isinstance(v, float):
    return format(v, spec)
  return str(v)


def _pct(v: float | None) -> str:
  return "—" if v is None else f"{100 * v:.1f}%"


def cell_axes(rows: list[dict]) -> list[str]:
  """Every swept key except the seed, in the order the sweep names them."""
  return [k for k in dict.fromkeys(k for r in rows for k in r["overrides"]) if k != SEED]


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
  """{(value of each cell axis): the trials (seeds) of that cell}, in sweep order."""
  axes = cell_axes(rows)
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(value_of(r, a) for a in axes), []).append(r)
  return out


def convergence_iteration(row: dict) -> float | None:
  """The iteration from which every block layer has converged (None unless all have)."""
  s, k = row["summary"], _get(row["config"], "model.block_size") or 0
  its = [s.get(f"fp/layer{l}/converged_at") for l in range(1, k + 1)]
  return float(max(its)) if its and all(i is not None for i in its) else None


def cell_metrics(rows: list[dict]) -> list[tuple[str, Any, str]]:
  """The aggregated metrics: (column, fn(row) -> float | None, format)."""
  keys = sorted({k for r in rows for k in r["summary"]})
  sizes = sorted({int(k.split("/")[1][3:]) for k in keys if k.startswith("acc/len") and k.endswith("/best")})
  out: list[tuple[str, Any, str]] = [
      (f"acc@{n}", lambda r, n=n: r["summary"].get(f"acc/len{n}/best"), ".3f") for n in sizes]
  # held-out loss (text): the best over 1..R, then at each recorded iteration count, in order
  losses = sorted((k for k in keys if k.startswith("val/iters") and k.endswith("/loss")),
                  key=lambda k: int(k.split("/")[1][5:]))
  if any(k == "val/best_loss" for k in keys):
    out.append(("held-out loss (best)", lambda r: r["summary"].get("val/best_loss"), ".4f"))
  out += [(f"loss @ r={k.split('/')[1][5:]}", lambda r, k=k: r["summary"].get(k), ".4f") for k in losses]
  out += [(k, lambda r, k=k: r["summary"].get(k), ".4f") for k in keys
          if k.endswith("/loss") and k not in losses]
  out += [("converged at (it.)", convergence_iteration, ".1f"),
          ("degeneracy cos", lambda r: r["summary"].get("fp/degeneracy_min_cosine"), ".4f"),
          ("halting: it. saved", lambda r: (r["halting"] or {}).get("iterations_saved_fraction"), ".1%")]
  return out


def mean_std(values: list[float | None], spec: str) -> str:
  """`mean ± std (n)` over the values that exist (population std; n only when some are missing)."""
  xs = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
  if not len(xs):
    return "—"
  text = format(xs.mean(), spec) if len(xs) == 1 else f"{format(xs.mean(), spec)} ± {format(xs.std(), spec)}"
  return text + (f" ({len(xs)}/{len(values)})" if len(xs) < len(values) else "")


def cell_text(counter: collections.Counter) -> str:
  n = sum(counter.values())
  return ", ".join(f"{v} {c}/{n}" for v, c in counter.most_common())


def cell_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
  """One line per cell: its axis values, seeds, regime agreement and mean ± std of each metric."""
  axes, metrics = cell_axes(rows), cell_metrics(rows)
  header = [a.split(".")[-1] for a in axes] + ["seeds", "regime (agreement)"] + [m[0] for m in metrics]
  body = []
  for key, members in cells(rows).items():
    regimes = collections.Counter(verdict(r) for r in members)
    body.append([_fmt(v, "g") for v in key] + [str(len(members)), cell_text(regimes)]
                + [mean_std([fn(r) for r in members], spec) for _, fn, spec in metrics])
  return header, body


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
    accuracy = h.get("fixed_accuracy", h["fixed_exact_match"])  # halting.json before `metric`
    body.append([r["name"], verdict(r), _fmt(h["R_fixed"]), _fmt(accuracy),
                 _fmt(h["threshold"], "g") if h["threshold"] is not None else "none within "
                 f"{h['max_drop_points']:g} pts",
                 f"{_fmt(h['mean_iterations'], '.2f')} ({_fmt(h['max_iterations'])})",
                 f"{_fmt(h['oracle_mean_iterations'], '.2f')} "
                 f"({_fmt(h['oracle_causal_mean_iterations'], '.2f')})",
                 _pct(h["iterations_saved_fraction"]), _fmt(h["accuracy_drop_points"], "+.2f"),
                 _pct(h["flops_saved_fraction"]), _fmt(h["wall_speedup"], ".2f")])
  return body


def regime_grids(rows: list[dict]) -> dict[str, dict]:
  """{title naming the other axes' values: {"injections", "norms", "cells": {(inj, norm): Counter}}},
  one grid per combination of the swept keys other than injection, norm and the seed."""
  others = [a for a in cell_axes(rows) if a not in GRID_AXES]
  grids: dict[str, dict] = {}
  for r in rows:
    title = ", ".join(f"{a.split('.')[-1]} = {_fmt(value_of(r, a), 'g')}" for a in others) or "all trials"
    inj, norm = (value_of(r, a) for a in GRID_AXES)
    g = grids.setdefault(title, {"injections": [], "norms": [],
                                 "cells": collections.defaultdict(collections.Counter)})
    if inj not in g["injections"]:
      g["injections"].append(inj)
    if norm not in g["norms"]:
      g["norms"].append(norm)
    g["cells"][(inj, norm)][verdict(r)] += 1
  return grids


def _plot_grids(grids: dict, file: str | None) -> str:
  """The regime grids as coloured tables: the cell's colour is its most common regime, its text the
  agreement across seeds; a legend names the colours."""
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
  if file is None:
    return fig
  for fmt in ("png", "svg"):
    with path(os.path.splitext(file)[0] + "." + fmt).open("wb") as f:
      fig.savefig(f, format=fmt, dpi=150)
  plt.close(fig)
  return file


def _cell_label(key: tuple, axes: list[str]) -> str:
  return "-".join(_fmt(v, "g") for v, a in zip(key, axes) if a != axes[0]) or "all"


MAX_TRIAL_LINES = 64  # beyond this a figure with one line per trial is not drawn (nor readable)


def _plot_trials(rows: list[dict], series, ylabel: str, title: str, log: bool, path: str) -> str | None:
  """One line per trial, one panel per value of the first swept axis: a colour per cell, a line
  style per seed, and a legend naming every trial. None when no trial has the series, or more than
  MAX_TRIAL_LINES do (e.g. the regime map: its phase diagram is the figure to read)."""
  axes = cell_axes(rows)
  seeds = list(dict.fromkeys(value_of(r, SEED) for r in rows))
  panels: dict[Any, dict[tuple, list]] = {}
  for key, members in cells(rows).items():
    for r in members:
      y = series(r)
      if y is not None:
        panels.setdefault(key[0] if axes else None, {}).setdefault(key, []).append(
            (value_of(r, SEED), np.asarray(y, float)))
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
    ax.set(title=f"{axes[0].split('.')[-1]} = {_fmt(value, 'g')}" if axes else title,
           xlabel="iteration t (log)", xscale="log")
    if log:
      ax.set_yscale("log")
    ax.legend(loc="best", fontsize=6, title="trial", title_fontsize=7,
              ncol=2 if sum(len(v) for v in curves.values()) > 10 else 1)
  grid[0][0].set_ylabel(ylabel)
  fig.suptitle(title)
  return save(fig, path)


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


def _loss_curve(r: dict):
  """A text trial's held-out loss against iterations (its training window)."""
  fp = r["fp"]
  if not fp or not fp.get("loss_curves"):
    return None
  return fp["loss_curves"][min(fp["loss_curves"], key=int)]["loss"]


def _md_table(header: list[str], body: list[list[str]], first: list[str] | None = None) -> list[str]:
  lead = ["trial"] if first is not None else []
  lines = ["| " + " | ".join(lead + header) + " |", "|" + " --- |" * (len(header) + len(lead))]
  for i, cells_ in enumerate(body):
    lines.append("| " + " | ".join(([first[i]] if first is not None else [])
                                   + [c.replace("|", "/") for c in cells_]) + " |")
  return lines


def write_report(sweep_dir: str) -> dict[str, str]:
  """Write report.md, report.html and report_*.png (+ .svg) in `sweep_dir`; returns their paths."""
  index, rows = load(sweep_dir)
  header, body = trial_table(rows)
  cheader, cbody = cell_table(rows)
  grids = regime_grids(rows)
  out = lambda name: str(path(sweep_dir) / name)
  images = {"regimes": _plot_grids(grids, out("report_regimes.png"))}
  phase = phase_data(rows)
  paper = None
  if phase is not None:  # a sweep over init scale: the regime against it, per injection x norm
    images["phase"] = plot_phase(phase, out("report_phase.png"), reference=PAPER_RANDOM_INIT)
    paper = reference_table(phase, PAPER_RANDOM_INIT)
    paper = paper if paper[1] else None
  text = any((r["fp"] or {}).get("loss_curves") for r in rows)
  for kind, fn, label, title, log in (
      ("convergence", _last_layer_change, "successive change, last block layer (relative, log)",
       "Convergence of every trial", True),
      ("extrapolation", _loss_curve, "held-out loss (nats per token)",
       "Extrapolation in depth: held-out loss against iterations", False) if text else
      ("extrapolation", _longest_curve, "exact match, longest test size",
       "Extrapolation: accuracy against iterations", False)):
    p = _plot_trials(rows, fn, label, title, log, out(f"report_{kind}.png"))
    if p:
      images[kind] = p
  for r in rows:  # a trial evaluated beside the sweep's control: its stages along depth
    fp_path = outputs.latest(str(path(sweep_dir) / r["name"]), "fixed_points.json")
    depth = fp_path and path(fp_path).parent / "plots" / "stage_depth.png"
    if depth and depth.exists():
      images[f"stages against the control: {r['name']}"] = str(depth)
  counts = collections.Counter(r["trial"].get("status", "pending") for r in rows)
  seeds = sorted({value_of(r, SEED) for r in rows}, key=str)
  md = [f"# Sweep `{index['sweep']}`", "",
        f"{len(rows)} trials in {len(cbody)} cells × seeds {', '.join(map(str, seeds))}: "
        + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ".", "",
        "## Cells (seeds aggregated)", "",
        "Cells group the trials by every swept key except `train.seed`; metrics are mean ± standard "
        "deviation over the seeds ((n/N): only n of the N seeds have the value).", ""]
  md += _md_table(cheader, cbody) + ["", "## Regimes by injection × norm", ""]
  for title, g in grids.items():
    md += [f"### {title}", "", "| injection \\ norm | " + " | ".join(map(str, g["norms"])) + " |",
           "| --- |" + " --- |" * len(g["norms"])]
    for inj in g["injections"]:
      md.append(f"| {inj} | " + " | ".join(cell_text(g["cells"].get((inj, n), collections.Counter()))
                                           for n in g["norms"]) + " |")
    md.append("")
  if paper:
    md += ["## Against the paper's random-init table", "", PAPER_NOTE, ""] + _md_table(*paper) + [""]
  md += ["## Trials", ""] + _md_table(header, body, [r["name"] for r in rows])
  halting = halting_table(rows)
  if halting:
    md += ["", "## Adaptive halting (fixed_point criterion)", "", HALTING_NOTE, ""]
    md += _md_table(HALTING_HEADER, [h[1:] for h in halting], [h[0] for h in halting])
  md += ["", "## Figures", ""] + [f"![{name}]({os.path.relpath(str(p), str(path(sweep_dir)))})"
                                  for name, p in images.items()]
  md_path, html_path = out("report.md"), out("report.html")
  path(md_path).write_text("\n".join(md) + "\n")
  path(html_path).write_text(_html(index["sweep"], grids, (cheader, cbody), header, body, rows,
                                   images, counts, halting, paper))
  return {"md": md_path, "html": html_path, **images}


def _html_table(header: list[str], body: list[list[str]]) -> str:
  e = html.escape
  return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
          + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells_) + "</tr>" for cells_ in body)
          + "</table>")


def _html(sweep, grids, cell_tab, header, body, rows, images, counts, halting, paper) -> str:
  e = html.escape
  parts = [f"<!doctype html><meta charset='utf-8'><title>Sweep {e(sweep)}</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>",
           f"<h1>Sweep {e(sweep)}</h1><p>{len(rows)} trials: "
           + e(", ".join(f"{n} {s}" for s, n in counts.most_common())) + "</p>",
           "<h2>Cells (seeds aggregated)</h2><p>mean ± standard deviation over the seeds of each cell</p>",
           _html_table(*cell_tab), "<h2>Regimes</h2>"]
  for title, g in grids.items():
    parts.append(f"<h3>{e(title)}</h3><table><tr><th>injection \\ norm</th>"
                 + "".join(f"<th>{e(str(n))}</th>" for n in g["norms"]) + "</tr>")
    for inj in g["injections"]:
      tds = []
      for n in g["norms"]:
        counter = g["cells"].get((inj, n), collections.Counter())
        top = counter.most_common(1)[0][0] if counter else "pending"
        fg = "#fff" if top in DARK else "#000"
        tds.append(f"<td style='background:{REGIME_COLORS.get(top, '#fff')};color:{fg}'>"
                   f"{e(cell_text(counter))}</td>")
      parts.append(f"<tr><th>{e(str(inj))}</th>{''.join(tds)}</tr>")
    parts.append("</table>")
  if paper:
    parts += [f"<h2>Against the paper's random-init table</h2><p>{e(PAPER_NOTE)}</p>", _html_table(*paper)]
  parts += ["<h2>Trials</h2>", _html_table(["trial"] + header, [[r["name"]] + c for r, c in zip(rows, body)])]
  if halting:
    parts += [f"<h2>Adaptive halting (fixed_point criterion)</h2><p>{e(HALTING_NOTE)}</p>",
              _html_table(["trial", *HALTING_HEADER], halting)]
  parts.append("<h2>Figures</h2>")
  for name, p in images.items():
    data = base64.b64encode(path(p).read_bytes()).decode()
    parts.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
  return "\n".join(parts) + "\n"
