"""The sweep report as one self-contained HTML page (sweeps/report.py): the tables, the regime grids
in their colours, and every figure embedded as PNG."""

from __future__ import annotations

import base64
import collections
import html

from rundir.workdir import path
from sweeps.records import DARK, REGIME_COLORS
from sweeps.tables import HALTING_HEADER, HALTING_NOTE, PAPER_NOTE, cell_text

STYLE = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>")


def table(header: list[str], body: list[list[str]]) -> str:
  e = html.escape
  return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
          + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells_) + "</tr>" for cells_ in body)
          + "</table>")


def grid_tables(grids: dict) -> list[str]:
  """Each regime grid as a table, every cell in its most common regime's colour."""
  e, parts = html.escape, []
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
  return parts


def page(sweep: str, grids: dict, cell_tab: tuple, trial_tab: tuple, rows: list[dict], images: dict,
         counts: collections.Counter, halting: list, paper: tuple | None) -> str:
  """The page: cells, regime grids, the paper's table (when it applies), trials, halting, figures."""
  e = html.escape
  header, body = trial_tab
  parts = [f"<!doctype html><meta charset='utf-8'><title>Sweep {e(sweep)}</title>", STYLE,
           f"<h1>Sweep {e(sweep)}</h1><p>{len(rows)} trials: "
           + e(", ".join(f"{n} {s}" for s, n in counts.most_common())) + "</p>",
           "<h2>Cells (seeds aggregated)</h2><p>mean ± standard deviation over the seeds of each cell</p>",
           table(*cell_tab), "<h2>Regimes</h2>", *grid_tables(grids)]
  if paper:
    parts += [f"<h2>Against the paper's random-init table</h2><p>{e(PAPER_NOTE)}</p>", table(*paper)]
  parts += ["<h2>Trials</h2>", table(["trial"] + header, [[r["name"]] + c for r, c in zip(rows, body)])]
  if halting:
    parts += [f"<h2>Adaptive halting (fixed_point criterion)</h2><p>{e(HALTING_NOTE)}</p>",
              table(["trial", *HALTING_HEADER], halting)]
  parts.append("<h2>Figures</h2>")
  for name, p in images.items():
    data = base64.b64encode(path(p).read_bytes()).decode()
    parts.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
  return "\n".join(parts) + "\n"
