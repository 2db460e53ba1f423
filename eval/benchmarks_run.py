"""`python -m eval benchmarks --workdir RUN --tasks T1,T2`: lm-eval tasks run through `eval.benchmarks`
at every setting (each fixed R of `--iterations`, and adaptive exit with `--exit`, capped at the
largest R), one `lm_eval.simple_evaluate` call per setting on the run opened once.

Tasks are looked up on the project's own task directory (eval/benchmark_tasks/), the `--include-path`
directories, and (only when a name is not there, since indexing its ~15k tasks takes seconds) lm-eval's
own tasks. A task named directly whose YAML gives `dataset_kwargs.data_files` as relative paths reads
them relative to that YAML, from any working directory.

Writes WORKDIR/eval/STEP/benchmarks.json (a new eval/STEP.N/ when that step has one: nothing is
overwritten), plots/benchmarks.png (each task's main metric against iterations, the adaptive point
marked), `--out FILE.json` (a copy of the record, refused if it exists) and a table and the figure
to the run's W&B run. The record's keys: docs/evaluation.md#standard-benchmarks-lm-eval.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import time
from typing import Any, Sequence

# eval.benchmarks first: it sets the offline variables, which the datasets and hub libraries read
# when lm_eval first imports them
from eval.benchmarks import OFFLINE, LoopedLM, Programs, check_setting  # isort: skip

import jax  # noqa: E402
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from configs.errors import ConfigError  # noqa: E402
from configs.recurrence import max_recurrence  # noqa: E402
from eval import plots  # noqa: E402
from eval.driver import Evaluation  # noqa: E402
from eval.generate import encode  # noqa: E402
from rundir.config import resolve  # noqa: E402
from rundir.outputs import output_dir  # noqa: E402
from rundir.run import open_run, run_tokenizer  # noqa: E402
from rundir.workdir import RunDirError, path  # noqa: E402

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_tasks")
RECORD, FIGURE = "benchmarks.json", "benchmarks.png"
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap of the metrics without a closed-form error (not means)


def parse_iterations(value: Any, default: int) -> list[int]:
  """`--iterations` (R, R1,R2,... as text or as parsed) -> the sorted distinct Rs; [default] if None."""
  if value is None:
    return [default]
  parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) \
      else [value]
  try:
    values = sorted({int(x) for x in parts})
  except (TypeError, ValueError):
    values = []
  if not values or values[0] < 1:
    raise ConfigError("--iterations", value, allowed="R or R1,R2,... (integers >= 1)")
  return values


def check_inputs(workdir: str, cfg: Any, *, tasks: Sequence[str], include_path: Sequence[str] = (),
                 iterations: Any = None, exit: tuple | None = None, limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 16, out: str | None = None
                 ) -> dict:
  """Every input checked before anything is compiled (one-line ConfigError / RunDirError): the Rs
  (default: the training maximum), the exit rule against the largest, the counts, `--out`, the
  run's tokenizer, the task names. Returns run_benchmarks' keyword arguments."""
  its = parse_iterations(iterations, max_recurrence(cfg.train))
  exit = check_setting(its[-1], exit)[1]
  for flag, value, least in (("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0),
                             ("--batch-size", batch_size, 1)):
    if value is not None and value < least:
      raise ConfigError(flag, value, allowed=f"an integer >= {least}")
  check_out(out)
  resolved = resolve(cfg)
  encode(run_tokenizer(workdir, resolved), resolved.model, [], bos=True)
  manager = task_manager(list(tasks), list(include_path))
  check_data(manager, list(tasks))
  return {"tasks": list(tasks), "manager": manager, "iterations": its, "exit": exit, "limit": limit,
          "num_fewshot": num_fewshot, "batch_size": batch_size, "out": out,
          "include_path": list(include_path)}


def task_manager(names: Sequence[str], include_path: Sequence[str] = ()) -> TaskManager:
  """A TaskManager that knows every name: the project's tasks and `include_path` first, lm-eval's own
  only when needed. An unknown name or a missing directory: one-line ConfigError."""
  for d in include_path:
    if not os.path.isdir(d):
      raise ConfigError("--include-path", d, reason="no such directory")
  if not names:
    raise ConfigError("--tasks", "''", reason="name at least one task")
  paths = [TASKS_DIR, *include_path]
  manager = TaskManager(include_path=paths, include_defaults=False)
  if set(names) <= set(manager.all_tasks):
    return manager
  manager = TaskManager(include_path=paths)
  for name in names:
    if name not in manager.all_tasks:
      near = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
      raise ConfigError("--tasks", name, reason=f"not a task of lm-eval {lm_eval.__version__}, of "
                        f"eval/benchmark_tasks or of --include-path"
                        + (f"; nearest: {', '.join(near)}" if near else ""))
  return manager


def check_data(manager: TaskManager, names: Sequence[str]) -> None:
  """Every task built once, its data read (local files, or the datasets cache offline): a task whose
  data cannot be read is one line (ConfigError) before anything is compiled."""
  specs, _ = task_specs(manager, names)
  for name, spec in zip(names, specs):
    try:
      manager.load([spec])
    except (ConnectionError, OSError, ValueError) as e:
      offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
      offline = " (offline: HF_DATASETS_OFFLINE=1)" if offline else ""
      raise ConfigError("--tasks", name, reason=f"its data cannot be read{offline}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def task_specs(manager: TaskManager, names: Sequence[str]) -> tuple[list, dict[str, dict]]:
  """What simple_evaluate is given for each name: the name, or for a task whose YAML names relative
  `dataset_kwargs.data_files`, its config with them made relative to the YAML; and per such task
  {absolute path: the path as written}."""
  specs, written = [], {}
  for name in names:
    entry = manager.task_index[name]
    cfg = load_yaml(entry.yaml_path, resolve_func=True) if entry.yaml_path else {}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if cfg.get("task") != name or files is None:
      specs.append(name)
      continue
    base, mapping = os.path.dirname(os.path.abspath(entry.yaml_path)), {}

    def local(f: str) -> str:
      if os.path.isabs(f) or "://" in f:
        return f
      mapping[os.path.join(base, f)] = f
      return os.path.join(base, f)

    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": _map_files(files, local)}
    specs.append(cfg)
    written[name] = mapping
  return specs, written


def _map_files(files: Any, fn) -> Any:
  """`data_files` (a path, a list, or {split: path or list}) with `fn` applied to every path."""
  if isinstance(files, str):
    return fn(files)
  if isinstance(files, dict):
    return {k: _map_files(v, fn) for k, v in files.items()}
  return [_map_files(f, fn) for f in files]


def config_sha256(config: dict, written: dict[str, str]) -> str:
  """sha256 of a task's config as the harness returns it (sorted JSON), without where its YAML
  lies (metadata.config_source) and with its local data files named as the YAML names them."""
  config = json.loads(json.dumps(config, default=str))
  (config.get("metadata") or {}).pop("config_source", None)
  files = (config.get("dataset_kwargs") or {}).get("data_files")
  if files is not None:
    config["dataset_kwargs"]["data_files"] = _map_files(files, lambda f: written.get(f, f))
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def data_sha256(written: dict[str, str]) -> dict[str, str]:
  """sha256 of each local data file, by the name the YAML gives it."""
  out = {}
  for full, name in written.items():
    with open(full, "rb") as f:
      out[name] = hashlib.sha256(f.read()).hexdigest()
  return out


def settings_of(iterations: Sequence[int], exit: tuple | None) -> list[dict]:
  """Each fixed R, then adaptive exit capped at the largest R."""
  out = [{"name": f"R={r}", "iterations": r, "exit": None} for r in iterations]
  if exit is not None:
    out.append({"name": f"exit={exit[0]}:{exit[1]}", "iterations": max(iterations),
                "exit": f"{exit[0]}:{exit[1]}", "_exit": tuple(exit)})
  return out


def _finite(x: Any) -> Any:
  return None if isinstance(x, float) and not math.isfinite(x) else x


def main_metric(name: str, results: dict) -> str | None:
  """The task's main metric key (e.g. "acc,none"): its config's first metric, else the first."""
  row = results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}
  listed = [m.get("metric") for m in (results.get("configs", {}).get(name, {}).get("metric_list") or [])]
  listed += list(results.get("higher_is_better", {}).get(name, {}))
  for metric in listed:
    key = next((k for k in row if isinstance(metric, str) and k.startswith(f"{metric},")), None)
    if key:
      return key
  return next((k for k, v in row.items() if k != "alias" and "_stderr" not in k
               and isinstance(v, (int, float))), None)


def task_rows(results: dict, lm: LoopedLM) -> dict[str, dict]:
  """Per task (and group) of one setting: the harness's metrics and what the model spent on it."""
  rows = {}
  for name, row in {**results.get("results", {}), **results.get("groups", {})}.items():
    subtasks = results.get("group_subtasks", {}).get(name) or [name]
    stats = [lm.stats[t] for t in subtasks if t in lm.stats]
    tokens, seconds = sum(s.tokens for s in stats), sum(s.seconds for s in stats)
    scored, iters = sum(s.scored for s in stats), sum(s.iterations for s in stats)
    key = main_metric(name, results)
    rows[name] = {
        "metrics": {k: _finite(v) for k, v in row.items() if k != "alias"},
        "main_metric": key, "value": _finite(row.get(key)) if key else None,
        "mean_iterations": iters / scored if scored else None,
        "requests": sum(s.requests for s in stats), "tokens": tokens, "scored_tokens": scored,
        "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None,
        "iterations_per_request": [p for s in stats for p in s.per_request]}
  return rows


def evaluate_setting(programs: Programs, setting: dict, manager: TaskManager, specs: list, *,
                     limit: int | None, num_fewshot: int | None, batch_size: int) -> tuple[dict, dict]:
  """One simple_evaluate call at one setting: (the harness's results, rows per task)."""
  lm = LoopedLM(programs.run, iterations=setting["iterations"], exit=setting.get("_exit"),
                batch_size=batch_size, programs=programs)
  results = lm_eval.simple_evaluate(model=lm, tasks=list(specs), num_fewshot=num_fewshot, limit=limit,
                                    task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS,
                                    log_samples=False)
  return results, task_rows(results, lm)


def run_benchmarks(workdir: str, cfg: Any, *, tasks: Sequence[str], manager: TaskManager,
                   iterations: Sequence[int], exit: tuple | None = None, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 16, out: str | None = None,
                   include_path: Sequence[str] = ()) -> tuple[dict, str]:
  """Open the run, evaluate every setting, write the record, its figure and W&B; (record, path).
  Under several processes each evaluates alike; process 0 alone writes ("" elsewhere)."""
  t0 = time.perf_counter()
  run = open_run(workdir, cfg=cfg)
  programs, (specs, written) = Programs(run), task_specs(manager, tasks)
  settings = settings_of(iterations, exit)
  record = {"workdir": workdir, "step": run.step,
            "harness": {"name": "lm-eval", "version": lm_eval.__version__},
            "tasks_requested": list(tasks), "settings": [], "tasks": {},
            "options": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                        "include_path": list(include_path),
                        "environment": {k: os.environ.get(k) for k in OFFLINE}}}
  for setting in settings:
    results, rows = evaluate_setting(programs, setting, manager, specs, limit=limit,
                                     num_fewshot=num_fewshot, batch_size=batch_size)
    record["settings"].append({k: v for k, v in setting.items() if not k.startswith("_")})
    for name, row in rows.items():
      task = record["tasks"].setdefault(name, _task_header(name, results, written))
      task["results"][setting["name"]] = row
  record.update(compile_s=programs.compile_s, seconds=time.perf_counter() - t0)
  if jax.process_index() != 0:
    return record, ""
  return record, write_outputs(Evaluation(run.cfg, workdir, run, None), record, out)


def _task_header(name: str, results: dict, written: dict) -> dict:
  config = results.get("configs", {}).get(name)
  mine = written.get(name, {})
  return {"config_sha256": config_sha256(config, mine) if config else None,
          "data_sha256": data_sha256(mine), "version": results.get("versions", {}).get(name),
          "n_shot": results.get("n-shot", {}).get(name),
          "samples": (results.get("n-samples", {}).get(name) or {}).get("effective"),
          "main_metric": main_metric(name, results), "results": {}}


def write_outputs(ev: Evaluation, record: dict, out: str | None) -> str:
  """benchmarks.json and plots/benchmarks.png under eval/STEP/, `out` beside; W&B. The path."""
  where = output_dir(ev.workdir, ev.step, RECORD)
  png = str(path(where) / "plots" / FIGURE)
  (path(where) / "plots").mkdir(parents=True, exist_ok=True)
  record["figure"] = os.path.join("plots", FIGURE)
  plot(record, png)
  text = json.dumps(record, indent=1)
  (path(where) / RECORD).write_text(text)
  if out:
    if path(out).exists():
      raise RunDirError(f"--out {out} exists; it is not overwritten (choose another name)")
    path(out).parent.mkdir(parents=True, exist_ok=True)
    path(out).write_text(text)
  columns = ["task", "setting", "iterations", "exit", "metric", "value", "mean_iterations",
             "tokens_per_s"]
  table = [[name, s["name"], s["iterations"], s["exit"], task["results"][s["name"]]["main_metric"],
            task["results"][s["name"]]["value"], task["results"][s["name"]]["mean_iterations"],
            task["results"][s["name"]]["tokens_per_s"]]
           for name, task in record["tasks"].items() for s in record["settings"]
           if s["name"] in task["results"]]
  ev.publish(tables={"benchmarks/results": (columns, table)}, images={"benchmarks/figure": png})
  return str(path(where) / RECORD)


def plot(record: dict, png: str) -> str:
  """Each task's main metric against block iterations per token: the fixed R as a line, the
  adaptive setting as a star at its mean iterations."""
  names = list(record["tasks"])
  cols = min(3, max(len(names), 1))
  rows = max(1, math.ceil(len(names) / cols))
  fig, axes = plots.plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    task = record["tasks"][name]
    fixed = [(s["iterations"], task["results"][s["name"]]["value"]) for s in record["settings"]
             if s["exit"] is None and s["name"] in task["results"]]
    fixed = [(r, v) for r, v in fixed if v is not None]
    if fixed:
      ax.plot(*zip(*fixed), marker="o", color=plots.colors(2)[0], label="fixed R")
    for s in record["settings"]:
      row = task["results"].get(s["name"])
      if s["exit"] is not None and row and row["value"] is not None and row["mean_iterations"]:
        ax.plot([row["mean_iterations"]], [row["value"]], marker="*", markersize=14, linestyle="",
                color=plots.colors(2)[1], label=f"exit {s['exit']} (cap {s['iterations']})")
    ax.set(title=name, xlabel="block iterations per token", ylabel=task["main_metric"] or "metric")
    ax.set_xscale("log", base=2)
    rs = sorted({s["iterations"] for s in record["settings"] if s["exit"] is None})
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.minorticks_off()
    ax.legend(loc="best", fontsize="small")
  for ax in list(axes.flat)[len(names):]:
    ax.set_visible(False)
  return plots.save(fig, png, formats=("png",))


def describe(record: dict) -> str:
  """What the command prints: per task and setting the main metric, iterations and speed."""
  lines = []
  for name, task in record["tasks"].items():
    for s in record["settings"]:
      row = task["results"].get(s["name"])
      if row is None:
        continue
      value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
      its = "n/a" if row["mean_iterations"] is None else f"{row['mean_iterations']:.2f}"
      speed = "n/a" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}"
      lines.append(f"{name} {s['name']}: {row['main_metric']} {value}, {its} iterations/token, "
                   f"{speed} tokens/s")
  return "\n".join(lines)


def check_out(out: str | None) -> None:
  """`--out` must not exist yet (checked before anything is compiled)."""
  if out and path(out).exists():
    raise RunDirError(f"--out {out} exists; it is not overwritten (choose another name)")
