"""A run directory exported as a Huginn / Raven directory (docs/pretrained.md): its newest
checkpoint's parameters as safetensors, config.json in the layout's fields, the run's tokenizer files.
The directory is written under a temporary name and renamed once complete."""

from __future__ import annotations

import json
import os
import shutil

from configs.errors import check_choice
from convert.importer import check_new_dir
from convert.raven_files import copy_tokenizer, write_tensors
from looped_models import raven
from looped_models.raven import RavenError
from rundir.run import open_run


def export_raven(run_dir: str, out: str, *, dtype: str | None = None,
                 shard_bytes: int = 5 * 2 ** 30) -> dict:
  """Write Raven directory `out` from run `run_dir` (its newest checkpoint); returns its config.json.
  A model whose options the layout cannot express is refused (RavenError naming the option)."""
  run = open_run(run_dir)  # the config it finished with, its newest checkpoint's parameters
  cfg, params = run.cfg, run.params
  bad = raven.fit_errors(cfg.model)
  if bad:
    raise RavenError(f"{run_dir} does not fit the Raven layout: {bad[0]}")
  dtype = dtype or cfg.model.param_dtype
  check_choice("--dtype", dtype, raven.DTYPES.values())
  out = os.path.abspath(out)
  check_new_dir(out)
  rc = {**raven.raven_config(cfg.model, cfg.train), "torch_dtype": dtype}

  tmp = f"{out}.partial{os.getpid()}"
  os.makedirs(tmp)
  try:
    write_tensors(tmp, raven.from_params(params, cfg.model), dtype, shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(rc, f, indent=2)
    copy_tokenizer(run_dir, tmp)
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return rc
