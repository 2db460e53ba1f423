"""The layers of docs/design.md, read from the imports: each package imports only its own layer and
the ones below; no two modules import each other; modules stay small; lazy imports say why; nothing
points outside the repository."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> (layer, the packages of ours it may import besides itself)
LAYERS = {
    "configs": (1, set()),
    "looped_models": (1, {"configs"}),
    "tasks": (2, {"configs"}),
    "rundir": (2, {"configs", "looped_models", "tasks"}),
    "train": (3, {"configs", "looped_models", "tasks", "rundir"}),
    "eval": (3, {"configs", "looped_models", "tasks", "rundir"}),
    "convert": (3, {"configs", "looped_models", "tasks", "rundir"}),
    "sweeps": (4, {"configs", "looped_models", "tasks", "rundir", "train", "eval"}),
    "bench": (4, {"configs", "looped_models", "tasks", "rundir", "train", "eval", "convert", "sweeps"}),
}
MAX_LINES = 450


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in LAYERS:
    for file in sorted((ROOT / package).rglob("*.py")):
      name = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
      out[name] = file
  return out


def own_imports(file: pathlib.Path) -> list[tuple[str, int, bool]]:
  """(module of ours, line, lazy) for each import in `file` (lazy: inside a function or class)."""
  tree = ast.parse(file.read_text())
  top = {id(node) for node in tree.body}
  top |= {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body}  # __main__ guard
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] in LAYERS:
        found.append((name, node.lineno, id(node) not in top))
  return found


MODULES = modules()
GRAPH = {m: {(t, line, lazy) for t, line, lazy in own_imports(f) if t in MODULES and t != m}
         for m, f in MODULES.items()}


def test_every_package_imports_only_its_layer_and_below():
  wrong = []
  for m, targets in GRAPH.items():
    package = m.split(".")[0]
    for t, line, _ in targets:
      other = t.split(".")[0]
      if other != package and other not in LAYERS[package][1]:
        wrong.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}")
  assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_two_modules_import_each_other():
  edges = {m: {t for t, _, _ in targets} for m, targets in GRAPH.items()}
  pairs = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
  assert not pairs, f"modules that import each other: {pairs}"


def test_lazy_imports_say_why():
  """An import of our own inside a function hides the real graph; one that has a reason (start-up
  time, breaking nothing else) says it in a comment on its line or the line above."""
  silent = []
  for m, file in MODULES.items():
    lines = file.read_text().splitlines()
    for t, line, lazy in sorted(GRAPH[m]):
      if lazy and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
        silent.append(f"{file.relative_to(ROOT)}:{line} imports {t}")
  assert not silent, "lazy imports without a stated reason:\n" + "\n".join(sorted(set(silent)))


def test_modules_stay_small():
  big = {str(f.relative_to(ROOT)): n for f in MODULES.values()
         if (n := len(f.read_text().splitlines())) > MAX_LINES}
  assert not big, f"modules over {MAX_LINES} lines: {big}"


@pytest.mark.parametrize("suffix", ["*.py", "*.md", "*.sh", "Makefile", "*.txt"])
def test_nothing_points_outside_the_repository(suffix):
  outside = [str(f.relative_to(ROOT)) for f in ROOT.rglob(suffix)
             if ".venv" not in f.parts and f.name != "test_layers.py"
             and "../shared" in f.read_text(errors="ignore")]
  assert not outside, f"files that point to ../shared: {outside}"


def test_the_checker_sees_a_wrong_import(tmp_path):
  """The checks above read real imports: an upward import written into a model file is found."""
  file = tmp_path / "bad.py"
  file.write_text("from rundir.run import open_run\n\ndef f():\n  from eval import plots\n")
  assert own_imports(file) == [("rundir.run", 1, False), ("rundir.run.open_run", 1, False),
                               ("eval", 4, True), ("eval.plots", 4, True)]
