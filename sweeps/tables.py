"""The sweep report's tables, as (header, body) of strings: per cell (seeds aggregated), per trial,
adaptive halting, and the regime grids of injection × norm; `md_table` writes one as Markdown."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from sweeps.records import cell_axes, cells, config_value, fmt, value_of, verdict

GRID_AXES = ("model.injection", "model.norm")  # rows x columns of each regime grid
HALTING_HEADER = ["regime", "R_fixed", "acc. at R_fixed", "best ε", "it./token (max)",
                  "oracle (causal)", "it. saved", "acc. drop (pts)", "FLOPs saved", "wall ×"]
HALTING_NOTE = ("Per trial, on a mix of all sizes: fixed inference at R_fixed (the fewest iterations "
                "reaching the best accuracy on the longest size: exact match, or next-token accuracy "
                "on text) against per-token exit once every block layer has settled, at the ε with the "
                "fewest iterations whose accuracy is within 0.5 points of it; "
                "the oracle exits once the prediction never changes again (causal: in position order). "
                "Wall × is the measured speedup with per-sequence exit.")
PAPER_NOTE = ("Blayney et al. 2026's regimes at random initialisation (12-layer block) for the injection × "
              "norm cells it reports, against this sweep's majority regime (over seeds) in each box of "
              "the phase diagram; \"not converged\" counts any regime but cyclic and degenerate.")


def _pct(v: float | None) -> str:
  return "—" if v is None else f"{100 * v:.1f}%"


def convergence_iteration(row: dict) -> float | None:
  """The iteration from which every block layer has converged (None unless all have)."""
  s, k = row["summary"], config_value(row["config"], "model.block_size") or 0
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
    body.append([fmt(v, "g") for v in key] + [str(len(members)), cell_text(regimes)]
                + [mean_std([fn(r) for r in members], spec) for _, fn, spec in metrics])
  return header, body


def trial_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
  """One line per trial: its axes, status (with its error), regime, per-layer convergence, accuracy
  at every size with its best iteration count, and wall time."""
  axes = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
  sizes = sorted({int(k.split("/")[1][3:]) for r in rows for k in r["summary"]
                  if k.startswith("acc/len") and k.endswith("/best")})
  header = ([a.split(".")[-1] for a in axes] + ["status", "regime", "degeneracy cos",
            "final change / layer", "converged_at / layer"] +
            [f"acc@{n} (best it.)" for n in sizes] + ["wall (s)"])
  body = []
  for r in rows:
    s = r["summary"]
    k = config_value(r["config"], "model.block_size") or 0
    changes = " ".join(fmt(s.get(f"fp/layer{l}/final_change"), ".1e") for l in range(1, k + 1))
    conv = " ".join(fmt(s.get(f"fp/layer{l}/converged_at")) for l in range(1, k + 1))
    accs = [f"{fmt(s.get(f'acc/len{n}/best'))} ({fmt(s.get(f'acc/len{n}/best_iters'))})"
            if s else "—" for n in sizes]
    status = r["trial"].get("status", "pending")
    if r["trial"].get("error"):
      status += f": {r['trial']['error']}"
    body.append([fmt(r["overrides"].get(a), "g") for a in axes] +
                [status, verdict(r) if s else "—", fmt(s.get("fp/degeneracy_min_cosine"), ".4f"),
                 changes or "—", conv or "—"] + accs + [fmt(r["trial"].get("wall_s"), ".1f")])
  return header, body


def halting_table(rows: list[dict]) -> list[list[str]]:
  """One line per trial with halting.json: the best fixed_point threshold within the allowed accuracy
  drop against fixed inference at R_fixed (eval/halting.py), and what it saves."""
  body = []
  for r in rows:
    h = r["halting"]
    if not h:
      continue
    accuracy = h.get("fixed_accuracy", h["fixed_exact_match"])  # halting.json before `metric`
    body.append([r["name"], verdict(r), fmt(h["R_fixed"]), fmt(accuracy),
                 fmt(h["threshold"], "g") if h["threshold"] is not None else "none within "
                 f"{h['max_drop_points']:g} pts",
                 f"{fmt(h['mean_iterations'], '.2f')} ({fmt(h['max_iterations'])})",
                 f"{fmt(h['oracle_mean_iterations'], '.2f')} "
                 f"({fmt(h['oracle_causal_mean_iterations'], '.2f')})",
                 _pct(h["iterations_saved_fraction"]), fmt(h["accuracy_drop_points"], "+.2f"),
                 _pct(h["flops_saved_fraction"]), fmt(h["wall_speedup"], ".2f")])
  return body


def regime_grids(rows: list[dict]) -> dict[str, dict]:
  """{title naming the other axes' values: {"injections", "norms", "cells": {(inj, norm): Counter}}},
  one grid per combination of the swept keys other than injection, norm and the seed."""
  others = [a for a in cell_axes(rows) if a not in GRID_AXES]
  grids: dict[str, dict] = {}
  for r in rows:
    title = ", ".join(f"{a.split('.')[-1]} = {fmt(value_of(r, a), 'g')}" for a in others) or "all trials"
    inj, norm = (value_of(r, a) for a in GRID_AXES)
    g = grids.setdefault(title, {"injections": [], "norms": [],
                                 "cells": collections.defaultdict(collections.Counter)})
    if inj not in g["injections"]:
      g["injections"].append(inj)
    if norm not in g["norms"]:
      g["norms"].append(norm)
    g["cells"][(inj, norm)][verdict(r)] += 1
  return grids


def md_table(header: list[str], body: list[list[str]], first: list[str] | None = None) -> list[str]:
  """Markdown lines of a table; `first`: a leading "trial" column."""
  lead = ["trial"] if first is not None else []
  lines = ["| " + " | ".join(lead + header) + " |", "|" + " --- |" * (len(header) + len(lead))]
  for i, cells_ in enumerate(body):
    lines.append("| " + " | ".join(([first[i]] if first is not None else [])
                                   + [c.replace("|", "/") for c in cells_]) + " |")
  return lines
