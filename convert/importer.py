"""A Huginn / Raven directory imported as a run directory (docs/pretrained.md).

An imported model is a run directory like a trained one: config.json in the framework's keys, a
params-only orbax checkpoint at step 0, status.json, import.json (where it came from) and the
checkpoint's tokenizer files. Every check runs before anything is written; the directory is written
under `OUT.partial` and renamed once complete.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections

from configs.base import get_config
from configs.errors import ConfigError, check_choice
from convert.raven_files import copy_tokenizer, read_config, scan_tensors, stream_params
from looped_models import raven
from looped_models.model import abstract_model
from looped_models.sharding import check_divisible, make_mesh as mesh_of, tree_shardings
from rundir.checkpoint import Checkpointer
from rundir.config import resolve
from rundir.workdir import RunDirError, write_json_atomic, write_status
from tasks.synthetic import get_task


def run_config(rc: dict, dtype: str, name: str = "") -> ml_collections.ConfigDict:
  """The framework's config for an imported model, resolved and checked (ConfigError)."""
  cfg = get_config()
  cfg.model.update(raven.model_options(rc, dtype))
  cfg.train.update(raven.train_options(rc))
  cfg.wandb.name = name
  cfg.wandb.tags = ("imported", raven.MODEL_TYPE)
  task = get_task(cfg.task.name)  # the default evaluation lengths that fit the model's max_len
  cfg.task.test_lengths = tuple(n for n in cfg.task.test_lengths if task.seq_len(n) <= rc["block_size"])
  return resolve(cfg)


def check_new_dir(path: str) -> None:
  """RunDirError unless `path` is absent or an empty directory."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise RunDirError(f"--out {path} already exists and is not empty; choose a new directory")


def make_mesh(spec: str | None) -> jax.sharding.Mesh | None:
  """`D,F,T` (data, fsdp, tensor; -1 takes the remaining devices) -> the framework's mesh."""
  if not spec:
    return None
  try:
    data, fsdp, tensor = (int(x) for x in spec.split(","))
  except ValueError:
    raise ConfigError("--mesh", spec, allowed="DATA,FSDP,TENSOR (integers, one may be -1)") from None
  return mesh_of(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def import_raven(hf_dir: str, out: str, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                 progress: bool = False) -> ml_collections.ConfigDict:
  """Write run directory `out` from Raven directory `hf_dir`; returns the run's config.

  Every check (config fields, tensor names, shapes, dtypes, the output directory) runs on the files'
  headers before anything is read or written. Tensors are then read one at a time, cast to `dtype`
  and placed on the device(s) (sharded by looped_models/sharding.py's rules over `mesh`, when given)."""
  check_choice("--dtype", dtype, raven.DTYPES.values())
  rc = read_config(hf_dir)
  found = scan_tensors(hf_dir)
  names = raven.check_tensors(rc, {k: v[:2] for k, v in found.items()})
  out = os.path.abspath(out)
  cfg = run_config(rc, dtype, os.path.basename(out))
  check_new_dir(out)
  tmp = f"{out}.partial"  # the same name on every process (orbax writes collectively)
  if os.path.exists(tmp):
    raise RunDirError(f"{tmp} exists: an import into {out} was interrupted; remove it first")
  if mesh is not None:
    check_divisible(cfg.model, mesh.shape["data"] * mesh.shape["fsdp"], mesh)
  _, abstract = abstract_model(cfg.model, cfg.train.seed)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shardings = (tree_shardings(abstract, mesh) if mesh is not None
               else jax.tree.map(lambda _: device, abstract))

  params = stream_params(hf_dir, rc, {k: found[k][2] for k in names}, abstract, shardings, dtype,
                         progress=progress)
  _write_run(tmp, out, cfg, params, hf_dir, rc, dtype, len(names))
  return cfg


def _write_run(tmp: str, out: str, cfg: ml_collections.ConfigDict, params: dict, hf_dir: str, rc: dict,
               dtype: str, tensors: int) -> None:
  """The run directory written under `tmp` (the checkpoint by every process, the rest by process
  0), then renamed to `out`; `tmp` is removed on failure."""
  main = jax.process_index() == 0
  try:
    ckpt = Checkpointer(tmp, keep=1, save_concurrent_gb=1)  # host memory: about the model once
    ckpt.save(0, {"params": params, "step": jnp.int32(0)},
              {"source": raven.MODEL_TYPE, "params_only": True})
    ckpt.close()
    if main:
      write_json_atomic(os.path.join(tmp, "config.json"), cfg.to_dict())
      write_json_atomic(os.path.join(tmp, "import.json"),
                        {"source": os.path.abspath(hf_dir), "format": raven.MODEL_TYPE,
                         "dtype": dtype, "raven_config": rc, "tensors": tensors})
      copy_tokenizer(hf_dir, tmp)  # the checkpoint's own tokenizer travels with the run
      write_status(tmp, "done", step=0, steps=0, error=None, imported_from=os.path.abspath(hf_dir))
      if os.path.isdir(out):
        os.rmdir(out)  # checked empty above
      os.rename(tmp, out)
  except BaseException:
    if main:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
