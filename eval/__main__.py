"""`python -m eval --workdir runs/NAME` evaluates a trained run's newest checkpoint;
`python -m eval --config FILE --init --workdir runs/NAME` evaluates the model at initialisation;
`--data DIR` evaluates on held-out windows of a prepared text corpus, `--compare RUN` shows a control
run's stage metrics beside this one's, `--mesh D,F,T` opens the run on another device mesh;
`python -m eval halting --workdir runs/NAME [--iterations R] [--slots P] [--repeats N]` sweeps the halting
criteria of a trained run (eval/halting.py);
`python -m eval generate --workdir runs/NAME --prompt TEXT [--max-new N] [--iterations R]
[--exit CRITERION:THRESHOLD] [--cache exact|latest] [--temperature T --top-k K --top-p P --seed S]
[--batch FILE] [--slots P] [--out FILE.json]` generates text (eval/generate.py);
`python -m eval benchmarks --workdir runs/NAME --tasks T1,T2 [--include-path DIR]
[--iterations R1,R2,...] [--exit CRITERION:THRESHOLD] [--limit N] [--num-fewshot K] [--batch-size B]
[--out FILE.json]` runs lm-eval tasks at each setting (eval/benchmarks_run.py; offline by default);
`python -m eval classes --workdir runs/NAME [--data DIR] [--iterations R] [--limit N]` scores a run
by token class on a corpus with classes (answer accuracy per step count, loss per class, R_small;
eval/classes.py): classes.json and plots/classes_accuracy.png.

Writes WORKDIR/eval/STEP/fixed_points.json, fixed_points.md and plots/*.png (halting: halting.json and
plots/halting_pareto.png), a new eval/STEP.N/ when that step's files exist (rundir/outputs.py), and logs
them to the run's W&B run.
Exit status 2 with one line on stderr for bad input (missing run, corrupt checkpoint, bad config, a
run that is training now); 1 with one line for a failure on the way (the traceback in
WORKDIR/error.log).
"""

from __future__ import annotations

import contextlib

from rundir.host import tune_allocator

tune_allocator(default=False)  # only with LOOPED_HOST_ALLOCATOR=tuned (rundir/host.py)

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from configs.errors import ConfigError  # noqa: E402
from configs.recurrence import max_recurrence  # noqa: E402
from eval.classes import run_classes  # noqa: E402
from eval.evaluate import evaluate, with_text_data  # noqa: E402
from eval.fixed_points import TrajectoryError  # noqa: E402
from eval.generate import describe, parse_exit, read_prompts, run_generate  # noqa: E402
from eval.halting import evaluate_halting  # noqa: E402
from rundir.cli import (BAD_INPUT, UsageError, command as subcommand, define_config,  # noqa: E402
                        report, require, run)
from rundir import distributed  # noqa: E402
from rundir.outputs import latest  # noqa: E402
from rundir.run import load_run_config  # noqa: E402
from rundir.workdir import RunDirError  # noqa: E402
from rundir.writing import writing  # noqa: E402

_CONFIG = define_config("config", None, "Trial config (needed with --init).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_INIT = flags.DEFINE_bool("init", False, "Evaluate the model at initialisation (random-init control).")


class IterationsParser(flags.ArgumentParser):
  """`--iterations`: one integer R, or (benchmarks) a list R1,R2,... (a tuple)."""
  syntactic_help = "R, or R1,R2,... for benchmarks"

  def parse(self, argument):
    if isinstance(argument, (int, tuple)):
      return argument
    values = tuple(int(x) for x in str(argument).split(","))  # ValueError: absl's one-line flag error
    return values[0] if len(values) == 1 else values

  def flag_type(self) -> str:
    return "int or int list"


_ITERS = flags.DEFINE(IterationsParser(), "iterations", None, "R (default: config eval.iterations, "
                      "else max(128, 4 x the training maximum); generate, benchmarks: the training "
                      "maximum); benchmarks: R1,R2,... (one evaluation each; the largest caps --exit).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences analysed (default: eval.batch_size).")
_CHUNK = flags.DEFINE_integer("chunk", None, "Iterations per device call (default: eval.chunk, 4).")
_TAU = flags.DEFINE_float("tau", 0.05, "Token-class cosine threshold.")
_RHO = flags.DEFINE_float("rho", 0.9, "Share of the tail that must satisfy a class.")
_DATA = flags.DEFINE_string("data", None, "A prepared text corpus (python -m train.data prepare) to "
                            "evaluate on: held-out windows of it, whatever the run trained on.")
_COMPARE = flags.DEFINE_string("compare", None, "A control run (e.g. a feedforward model), already "
                               "evaluated, whose stage metrics are shown beside this run's.")
_STARTS = flags.DEFINE_integer("starts", None, "Path independence: also run from this many random "
                               "initial states (default: eval.path_starts, 0).")
_MESH = flags.DEFINE_string("mesh", None, "DATA,FSDP,TENSOR: the device mesh to open the run on "
                            "(default: the run's own mesh config; -1 takes the remaining devices).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "halting: timed calls per setting (median; 0: no timing).")
_SLOTS = flags.DEFINE_integer("slots", None, "halting, generate: sequences in flight (default: "
                              "halting train.eval_batch_size / 8, generate min(8, prompts)).")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: the prompt text.")
_PROMPTS = flags.DEFINE_string("batch", None, "generate: a file of prompts, one per line.")
_MAX_NEW = flags.DEFINE_integer("max-new", 64, "generate: tokens to generate per prompt.")
_EXIT = flags.DEFINE_string("exit", None, "generate, benchmarks: per-token exit CRITERION:THRESHOLD "
                            "(fixed_point, kl, cosine, argmax_stable, entropy), e.g. fixed_point:1e-3; "
                            "none: fixed R.")
_CACHE = flags.DEFINE_enum("cache", "exact", ["exact", "latest"], "generate: KV cache of the block, one "
                           "entry per (iteration, layer) or per layer (memory independent of R).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top-k", 0, "generate: sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top-p", 1.0, "generate: nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
_OUT = flags.DEFINE_string("out", None, "generate: the record (JSON; the plot goes beside it; default "
                           "WORKDIR/eval/STEP/generate.json); benchmarks: a copy of the record.")
_TASKS = flags.DEFINE_list("tasks", None, "benchmarks: lm-eval task names, comma-separated (those of "
                           "eval/benchmark_tasks, of --include-path, then lm-eval's own).")
_INCLUDE = flags.DEFINE_multi_string("include-path", None, "benchmarks: a directory of lm-eval task "
                                     "YAML (repeatable).")
_LIMIT = flags.DEFINE_integer("limit", None, "benchmarks: documents per task; classes: answers per "
                               "split (default: all).")
_FEWSHOT = flags.DEFINE_integer("num-fewshot", None, "benchmarks: few-shot examples (default: the "
                                "task's).")
_BENCH_BATCH = flags.DEFINE_integer("batch-size", 16, "benchmarks: windows scored per device call, "
                                    "sequences generated at once.")


def one_r() -> int | None:
  """`--iterations` for the commands that take one R."""
  if isinstance(_ITERS.value, tuple):
    raise UsageError("--iterations takes one R here (a list R1,R2,... is for benchmarks)")
  return _ITERS.value


def with_mesh(cfg):
  """`cfg` with `--mesh D,F,T` applied (the run's parameters are sharded onto that mesh)."""
  if not _MESH.value:
    return cfg
  try:
    data, fsdp, tensor = (int(x) for x in _MESH.value.split(","))
  except ValueError:
    raise ConfigError("--mesh", _MESH.value, allowed="DATA,FSDP,TENSOR (integers, one may be -1)") from None
  cfg = type(cfg)(cfg.to_dict())
  cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return cfg


@contextlib.contextmanager
def writing_outputs(cfg, workdir: str):
  """Evaluations write into the run directory under its lock, shared among evaluations and refused
  while the run trains (rundir/lock.py); a failure is one line, its traceback in WORKDIR/error.log,
  and leaves the run's status as it is (rundir/writing.py)."""
  distributed.initialize(cfg.distributed)  # before asking which process this is
  with writing(workdir, main=jax.process_index() == 0, status=False, shared=True):
    yield


def halting_main() -> int:
  """`python -m eval halting --workdir runs/NAME`: halting.json, plots/halting_pareto.png, W&B."""
  try:
    if _INIT.value:
      raise RunDirError("halting evaluates a trained run; --init is not supported")
    cfg, iterations = with_mesh(load_run_config(_WORKDIR.value)), one_r()
    with writing_outputs(cfg, _WORKDIR.value):
      s = evaluate_halting(cfg, _WORKDIR.value, iterations=iterations, slots=_SLOTS.value,
                           repeats=_REPEATS.value)["summary"]
    where = latest(_WORKDIR.value, "halting.json")
  except BAD_INPUT as e:
    return report(e)
  if s["threshold"] is None:
    print(f"R_fixed={s['R_fixed']}: no fixed_point threshold within {s['max_drop_points']} points; "
          f"see {where}")
  else:
    print(f"R_fixed={s['R_fixed']}: fixed_point eps={s['threshold']} saves "
          f"{s['iterations_saved_fraction']:.1%} of the iterations ({s['mean_iterations']:.1f} per token, "
          f"oracle {s['oracle_mean_iterations']:.1f}), drop {s['accuracy_drop_points']:.2f} points; "
          f"see {where}")
  return 0


def generate_main() -> int:
  """`python -m eval generate --workdir runs/NAME --prompt TEXT`: print and record the generations."""
  try:
    prompts = read_prompts(_PROMPT.value, _PROMPTS.value)
    cfg, iterations = with_mesh(load_run_config(_WORKDIR.value)), one_r()
    with writing_outputs(cfg, _WORKDIR.value):
      rec, where = run_generate(
          _WORKDIR.value, prompts, out=_OUT.value, cfg=cfg, max_new=_MAX_NEW.value,
          iterations=max_recurrence(cfg.train) if iterations is None else iterations,
          exit=parse_exit(_EXIT.value), cache=_CACHE.value, temperature=_TEMPERATURE.value,
          top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, slots=_SLOTS.value)
  except BAD_INPUT as e:
    return report(e)
  if where:  # process 0 (the others generated the same)
    print(describe(rec))
    print(f"see {where}")
  return 0


def benchmarks_main() -> int:
  """`python -m eval benchmarks --workdir runs/NAME --tasks T1,T2`: benchmarks.json, the figure, W&B."""
  try:
    if _INIT.value:
      raise RunDirError("benchmarks evaluates a trained or imported run; --init is not supported")
    require(_TASKS)
    cfg = with_mesh(load_run_config(_WORKDIR.value))
    exit = parse_exit(_EXIT.value)
    # imported here: lm-eval (and the datasets library under it) would add seconds to the start of
    # every other eval command
    from eval import benchmarks_run
    inputs = benchmarks_run.check_inputs(
        _WORKDIR.value, cfg, tasks=_TASKS.value, include_path=_INCLUDE.value or (),
        iterations=_ITERS.value, exit=exit, limit=_LIMIT.value, num_fewshot=_FEWSHOT.value,
        batch_size=_BENCH_BATCH.value, out=_OUT.value)
    with writing_outputs(cfg, _WORKDIR.value):
      record, where = benchmarks_run.run_benchmarks(_WORKDIR.value, cfg, **inputs)
  except BAD_INPUT as e:
    return report(e)
  if where:  # process 0 (the others evaluated the same)
    print(benchmarks_run.describe(record))
    print(f"see {where}")
  return 0


def classes_main() -> int:
  """`python -m eval classes --workdir runs/NAME`: classes.json and its figure."""
  try:
    if _INIT.value:
      raise RunDirError("classes evaluates a trained run; --init is not supported")
    cfg, iterations = with_mesh(load_run_config(_WORKDIR.value)), one_r()
    with writing_outputs(cfg, _WORKDIR.value):
      rec, where = run_classes(_WORKDIR.value, data=_DATA.value, cfg=cfg,
                               iterations=iterations or 2 * max_recurrence(cfg.train),
                               answers=_LIMIT.value or 0)
  except BAD_INPUT as e:
    return report(e)
  if where:
    for split, r in rec["splits"].items():
      acc = r["answer_accuracy"]
      print(f"{split}: answer accuracy by iterations 1..{len(acc['all'])}: "
            + " ".join(f"{a:.1f}" for a in acc["all"]))
    print(f"R_small = {rec['r_small']}; see {where}")
  return 0


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  command, _ = subcommand(argv, {None: [], "halting": [], "generate": [], "benchmarks": [],
                                 "classes": []})
  require(_WORKDIR)
  if command == "halting":
    return halting_main()
  if command == "generate":
    return generate_main()
  if command == "benchmarks":
    return benchmarks_main()
  if command == "classes":
    return classes_main()
  try:
    if _INIT.value:
      if _CONFIG.value is None:
        raise RunDirError("--init needs --config FILE")
      cfg = _CONFIG.value
    else:
      cfg = load_run_config(_WORKDIR.value)
    if _DATA.value:
      cfg = with_text_data(cfg, _DATA.value)
    cfg = with_mesh(cfg)
    if _STARTS.value is not None:
      cfg = type(cfg)(cfg.to_dict())
      cfg.eval.path_starts = _STARTS.value
    iterations = one_r()
    with writing_outputs(cfg, _WORKDIR.value):
      summary = evaluate(cfg, _WORKDIR.value, init=_INIT.value, iterations=iterations,
                         batch_size=_BATCH.value, chunk=_CHUNK.value,
                         thresholds={"tau": _TAU.value, "rho": _RHO.value}, compare=_COMPARE.value)
  except BAD_INPUT + (TrajectoryError,) as e:
    return report(e)
  text = "" if "val/best_loss" not in summary else (
      f"; held-out loss {summary['val/best_loss']:.4f} at {summary['val/best_iters']} iterations")
  print(f"{summary['fp/regime']}: degeneracy {summary['fp/degeneracy_min_cosine']:.4f}{text}; "
        f"see {latest(_WORKDIR.value, 'fixed_points.md')}")
  return 0


if __name__ == "__main__":
  run(main, also=(TrajectoryError,))
