"""`python -m sweeps --config configs/sweeps/NAME.py [--workdir runs] [--parallel N] [--dry-run] [--force]
[--trial NAME] [--topology T [--slices N]] [--config.KEY=VALUE ...]` runs a sweep (`--topology`: each
trial shape compiled for that TPU slice first, sweeps/preflight.py); `python -m sweeps report
runs/NAME` rebuilds its report; `python -m sweeps export-wandb --config FILE [--out FILE]` writes a
W&B sweep definition.

Exit status: 0 when every trial is done, 1 when some failed or diverged (the report says which),
2 for bad input (one line on stderr), 130/143 when stopped by SIGINT/SIGTERM (rerun to resume).
"""

from __future__ import annotations

import os
import sys

from rundir.host import tune_allocator

tune_allocator(default=False)  # only with LOOPED_HOST_ALLOCATOR=tuned (rundir/host.py)

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.errors import ConfigError  # noqa: E402
from rundir import cli, distributed  # noqa: E402
from rundir.logger import log_to_wandb  # noqa: E402
from rundir.workdir import RunDirError, check_reachable  # noqa: E402
from sweeps import preflight, report, wandb_export  # noqa: E402
from sweeps.expand import base_config, expand, load_sweep_module, sweep_name  # noqa: E402
from sweeps.records import load  # noqa: E402
from sweeps.runner import Runner  # noqa: E402
from sweeps.tables import HALTING_HEADER, halting_table, trial_table  # noqa: E402
from train import tpu  # noqa: E402

_CONFIG = cli.define_config("config", None, "Sweep file (configs/sweeps/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", "runs", "Root of the sweep directories.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials run at once (separate processes).")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "List the trials and exit.")
_TRIAL = flags.DEFINE_multi_string("trial", None, "Run only this trial (repeatable); what a W&B agent "
                                   "runs (see export-wandb).")
_OUT = flags.DEFINE_string("out", None,
                           "export-wandb: the YAML file (default WORKDIR/SWEEP/wandb_sweep.yaml).")
_FORCE = flags.DEFINE_bool("force", False, "Run again the trials whose config changed since they ran "
                           "(resumed from their checkpoints), and with --topology those that do not "
                           "fit; without it such trials are refused.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice (v5e-256, v5p-128, ...): compile every "
                                "trial shape for it first (libtpu: .venv-tpu/bin/python) and list or "
                                "refuse the trials that do not fit (sweeps/preflight.py).")
_SLICES = flags.DEFINE_integer("slices", 1, "With --topology: slices of that topology.")


def log_sweep_to_wandb(base_cfg, sweep: str, sweep_dir: str, paths: dict) -> None:
  """A sweep-level W&B run (job_type sweep_report) with the comparison table and figures."""
  if base_cfg.wandb.mode == "disabled":
    return
  cfg = base_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.wandb.group = cfg.wandb.group or sweep
    cfg.wandb.name = f"{sweep}-report"
  _, rows = load(sweep_dir)
  header, body = trial_table(rows)
  tables = {"sweep/trials": (["trial"] + header, [[r["name"]] + c for r, c in zip(rows, body)])}
  halting = halting_table(rows)
  if halting:
    tables["sweep/halting"] = (["trial"] + HALTING_HEADER, halting)
  log_to_wandb(sweep_dir, cfg.wandb, {"sweep": sweep}, job_type="sweep_report", tables=tables,
               images={f"sweep/{k}": p for k, p in paths.items() if p.endswith(".png")})


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  try:
    if len(argv) >= 2 and argv[1] == "report":
      if len(argv) != 3:
        raise RunDirError("usage: python -m sweeps report runs/SWEEP")
      if not check_reachable(argv[2]).is_dir():
        raise RunDirError(f"sweep directory {argv[2]} does not exist")
      paths = report.write_report(argv[2])
      print(f"report: {paths['md']} and {paths['html']}")
      return 0
    export = argv[1:2] == ["export-wandb"]
    if len(argv) > 1 + export:
      raise RunDirError(f"unexpected arguments {argv[1 + export:]}")
    if _CONFIG.value is None:
      raise RunDirError("--config configs/sweeps/NAME.py is required")
    if _PARALLEL.value < 1:
      raise ConfigError("--parallel", _PARALLEL.value, allowed=">= 1")
    path = spec = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.isfile(path) and ":" in path:  # FILE.py:ARG, the argument of get_config
      path = path.rsplit(":", 1)[0]
    name, module = sweep_name(path), load_sweep_module(path)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    base = base_config(_CONFIG.value, module, overrides)
    trials = expand(base, module)
    if export:
      out = _OUT.value or os.path.join(_WORKDIR.value, name, "wandb_sweep.yaml")
      wandb_export.write(wandb_export.definition(name, spec, trials, _WORKDIR.value, base,
                                                 overrides), out)
      print(f"W&B sweep definition: {out} ({len(trials)} trials)\nrun: wandb sweep {out}, then "
            "wandb agent ENTITY/PROJECT/SWEEP_ID on each machine (sharing --workdir)")
      return 0
    fits = None
    if _TOPOLOGY.value:
      tpu.compile_only_environment(cpu=_DRY_RUN.value)  # a dry run compiles on this machine's CPU
      if _DRY_RUN.value:
        jax.config.update("jax_platforms", "cpu")
      else:
        distributed.initialize(base.distributed)  # before the compiles start JAX's backend
      fits = preflight.check(trials, _TOPOLOGY.value, _SLICES.value,
                             say=lambda line: print(line, file=sys.stderr, flush=True))
    if _DRY_RUN.value:
      if fits is not None:
        print("\n".join(preflight.lines(trials, fits)))
      else:
        for t in trials:
          print(f"{t.name}\t" + " ".join(f"{k}={v}" for k, v in t.overrides.items())
                + (f"\tINVALID: {t.invalid}" if t.invalid else ""))
      print(f"{len(trials)} trials in {os.path.join(_WORKDIR.value, name)}")
      return 0
    if fits is not None and not _FORCE.value:
      trials = preflight.refuse_misfits(trials, fits, _TOPOLOGY.value)
    check_reachable(_WORKDIR.value)  # a bucket that cannot be reached: one line, before any trial
    distributed.initialize(base.distributed)  # a pod: every host runs this same command
    runner = Runner(name, trials, _WORKDIR.value, parallel=_PARALLEL.value, force=_FORCE.value,
                    only=_TRIAL.value)
    statuses = runner.run()
  except cli.BAD_INPUT as e:
    return cli.report(e)
  if jax.process_index() == 0:
    paths = report.write_report(runner.sweep_dir)
    log_sweep_to_wandb(base, name, runner.sweep_dir, paths)
    print(f"report: {paths['md']} (and {os.path.basename(paths['html'])})")
  if runner.stop_signal is not None:
    return 128 + runner.stop_signal
  return 0 if all(s == "done" for s in statuses.values()) else 1


if __name__ == "__main__":
  cli.run(main)
