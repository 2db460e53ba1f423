"""The sweep report, built from disk alone: runs/SWEEP/report.md and a self-contained report.html.

  python -m sweeps report runs/SWEEP

Trials are grouped into cells by every swept key except the seed (`train.seed`), and each cell
aggregates its seeds: regime agreement (`cyclic 2/3`), mean ± standard deviation of accuracy (or
validation loss), convergence iteration, degeneracy cosine and halting savings. Then per trial: its
axes, status, regime, degeneracy cosine, final per-layer change, converged_at, accuracy at every size
with its best iteration count, wall time; regime grids of injection × norm (one per value of the
other axes); where trials measured adaptive halting (`eval.halting`), a table of its savings; and the
figures (PNG and SVG; the HTML embeds the PNGs).

The pieces: sweeps/records.py (reading the trials), tables.py, figures.py, phase.py (the diagram
over init scale), report_html.py.
"""

from __future__ import annotations

import collections
import os

from rundir import outputs
from rundir.workdir import path
from sweeps import figures, report_html
from sweeps.phase import PAPER_RANDOM_INIT, phase_data, plot_phase, reference_table
from sweeps.records import SEED, load, value_of
from sweeps.tables import (HALTING_HEADER, HALTING_NOTE, PAPER_NOTE, cell_table, cell_text,
                           halting_table, md_table, regime_grids, trial_table)


def _figures(sweep_dir: str, rows: list[dict], grids: dict) -> tuple[dict[str, str], tuple | None]:
  """({name: PNG path} of the report's figures, the paper's table when the sweep is over init scale)."""
  out = lambda name: str(path(sweep_dir) / name)
  images = {"regimes": figures.plot_grids(grids, out("report_regimes.png"))}
  phase = phase_data(rows)
  paper = None
  if phase is not None:  # a sweep over init scale: the regime against it, per injection x norm
    images["phase"] = plot_phase(phase, out("report_phase.png"), reference=PAPER_RANDOM_INIT)
    paper = reference_table(phase, PAPER_RANDOM_INIT)
    paper = paper if paper[1] else None
  text = any((r["fp"] or {}).get("loss_curves") for r in rows)
  for kind, fn, label, title, log in (
      ("convergence", figures.last_layer_change, "successive change, last block layer (relative, log)",
       "Convergence of every trial", True),
      ("extrapolation", figures.loss_curve, "held-out loss (nats per token)",
       "Extrapolation in depth: held-out loss against iterations", False) if text else
      ("extrapolation", figures.longest_curve, "exact match, longest test size",
       "Extrapolation: accuracy against iterations", False)):
    p = figures.plot_trials(rows, fn, label, title, log, out(f"report_{kind}.png"))
    if p:
      images[kind] = p
  for r in rows:  # a trial evaluated beside the sweep's control: its stages along depth
    fp_path = outputs.latest(str(path(sweep_dir) / r["name"]), "fixed_points.json")
    depth = fp_path and path(fp_path).parent / "plots" / "stage_depth.png"
    if depth and depth.exists():
      images[f"stages against the control: {r['name']}"] = str(depth)
  return images, paper


def _markdown(sweep_dir: str, index: dict, rows: list[dict], tables: dict, grids: dict,
              images: dict, counts: collections.Counter) -> list[str]:
  """report.md's lines."""
  cheader, cbody = tables["cells"]
  seeds = sorted({value_of(r, SEED) for r in rows}, key=str)
  md = [f"# Sweep `{index['sweep']}`", "",
        f"{len(rows)} trials in {len(cbody)} cells × seeds {', '.join(map(str, seeds))}: "
        + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ".", "",
        "## Cells (seeds aggregated)", "",
        "Cells group the trials by every swept key except `train.seed`; metrics are mean ± standard "
        "deviation over the seeds ((n/N): only n of the N seeds have the value).", ""]
  md += md_table(cheader, cbody) + ["", "## Regimes by injection × norm", ""]
  for title, g in grids.items():
    md += [f"### {title}", "", "| injection \\ norm | " + " | ".join(map(str, g["norms"])) + " |",
           "| --- |" + " --- |" * len(g["norms"])]
    for inj in g["injections"]:
      md.append(f"| {inj} | " + " | ".join(cell_text(g["cells"].get((inj, n), collections.Counter()))
                                           for n in g["norms"]) + " |")
    md.append("")
  if tables["paper"]:
    md += ["## Against the paper's random-init table", "", PAPER_NOTE, ""] + md_table(*tables["paper"]) + [""]
  md += ["## Trials", ""] + md_table(*tables["trials"], [r["name"] for r in rows])
  halting = tables["halting"]
  if halting:
    md += ["", "## Adaptive halting (fixed_point criterion)", "", HALTING_NOTE, ""]
    md += md_table(HALTING_HEADER, [h[1:] for h in halting], [h[0] for h in halting])
  md += ["", "## Figures", ""] + [f"![{name}]({os.path.relpath(str(p), str(path(sweep_dir)))})"
                                  for name, p in images.items()]
  return md


def write_report(sweep_dir: str) -> dict[str, str]:
  """Write report.md, report.html and report_*.png (+ .svg) in `sweep_dir`; returns their paths."""
  index, rows = load(sweep_dir)
  grids = regime_grids(rows)
  images, paper = _figures(sweep_dir, rows, grids)
  tables = {"cells": cell_table(rows), "trials": trial_table(rows), "halting": halting_table(rows),
            "paper": paper}
  counts = collections.Counter(r["trial"].get("status", "pending") for r in rows)
  md_path, html_path = str(path(sweep_dir) / "report.md"), str(path(sweep_dir) / "report.html")
  path(md_path).write_text("\n".join(_markdown(sweep_dir, index, rows, tables, grids, images, counts))
                           + "\n")
  path(html_path).write_text(report_html.page(index["sweep"], grids, tables["cells"], tables["trials"],
                                              rows, images, counts, tables["halting"], paper))
  return {"md": md_path, "html": html_path, **images}
