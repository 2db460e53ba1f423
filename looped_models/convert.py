"""Import and export Huginn / Raven checkpoints (../shared/formats/huginn_raven.md); write a run's
logits and latents for comparison with any other implementation.

  python -m looped_models.convert from-raven HF_DIR --out RUN_DIR [--dtype float32|bfloat16] [--mesh D,F,T]
  python -m looped_models.convert to-raven RUN_DIR --out HF_DIR [--dtype float32|bfloat16] [--shard_gb 5]
  python -m looped_models.convert logits RUN_DIR --tokens TOKENS.npy [--state0 zeros|STATE.npy] \\
      --iterations 1,4,16 --out OUT.npz

An imported model is a run directory like a trained one (config.json in the framework's keys, a
params-only orbax checkpoint at step 0, status.json), so `python -m eval --workdir RUN_DIR` opens it.
Import streams tensor by tensor; every check runs before anything is written, and the output directory
appears only once complete (it is written under a temporary name first). Bad input: one line on stderr,
exit status 2. This is the command-line layer: it reads and writes run directories through train/ and
eval/; the layout itself is looped_models/raven.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from looped_models import raven
from looped_models.raven import RavenError

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# -- reading a Raven directory ---------------------------------------------------------------------

def read_config(hf_dir: str) -> dict:
  """The checked config.json of a Raven directory."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise RavenError(f"{hf_dir} is not a directory")
  if not os.path.isfile(path):
    raise RavenError(f"{hf_dir} holds no config.json")
  try:
    with open(path) as f:
      rc = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise RavenError(f"{path} is unreadable: {e}") from None
  if not isinstance(rc, dict):
    raise RavenError(f"{path} is not a JSON object")
  return raven.check_config(rc)


def scan_tensors(hf_dir: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
  """{name: (shape, safetensors dtype, file)} from the files' headers (no tensor is read). Sharded
  checkpoints are read through model.safetensors.index.json, whose map must agree with the files."""
  from safetensors import safe_open
  index_path = os.path.join(hf_dir, INDEX)
  weight_map = None
  if os.path.isfile(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise RavenError(f"{index_path} is unreadable or has no weight_map: {e}") from None
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.isfile(os.path.join(hf_dir, name)):
        raise RavenError(f"{INDEX}: file {name} (of tensor "
                         f"{next(k for k, v in weight_map.items() if v == name)}) is missing")
  else:
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
      raise RavenError(f"{hf_dir} holds no *.safetensors file")
  found: dict[str, tuple[tuple[int, ...], str, str]] = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    try:
      with safe_open(path, framework="np") as f:
        for key in f.keys():
          if key in found:
            raise RavenError(f"tensor {key} is in both {found[key][2]} and {name}")
          sl = f.get_slice(key)
          found[key] = (tuple(sl.get_shape()), sl.get_dtype(), name)
    except RavenError:
      raise
    except Exception as e:  # safetensors raises its own error type for a damaged header
      raise RavenError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if weight_map is not None:
    for key, name in weight_map.items():
      if found.get(key, (None, None, name))[2] != name:
        raise RavenError(f"{INDEX}: tensor {key} is mapped to {name} but "
                         f"{'is not in any file' if key not in found else 'is in ' + found[key][2]}")
  return found


def run_config(rc: dict, dtype: str, name: str = "") -> ml_collections.ConfigDict:
  """The framework's config for an imported model, resolved and checked (ConfigError)."""
  from configs.base import get_config
  from rundir.config import resolve
  from tasks.synthetic import get_task
  cfg = get_config()
  cfg.model.update(raven.model_options(rc, dtype))
  cfg.train.update(raven.train_options(rc))
  cfg.wandb.name = name
  cfg.wandb.tags = ("imported", raven.MODEL_TYPE)
  task = get_task(cfg.task.name)  # the default evaluation lengths that fit the model's max_len
  cfg.task.test_lengths = tuple(n for n in cfg.task.test_lengths if task.seq_len(n) <= rc["block_size"])
  return resolve(cfg)


def _check_new_dir(path: str) -> None:
  from rundir.workdir import RunDirError
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise RunDirError(f"--out {path} already exists and is not empty; choose a new directory")


def _set(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def make_mesh(spec: str | None) -> jax.sharding.Mesh | None:
  """`D,F,T` (data, fsdp, tensor; -1 takes the remaining devices) -> the framework's mesh."""
  if not spec:
    return None
  from configs.errors import ConfigError
  from looped_models.sharding import make_mesh as mesh_of
  try:
    data, fsdp, tensor = (int(x) for x in spec.split(","))
  except ValueError:
    raise ConfigError("--mesh", spec, allowed="DATA,FSDP,TENSOR (integers, one may be -1)") from None
  return mesh_of(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


# -- import ----------------------------------------------------------------------------------------

def import_raven(hf_dir: str, out: str, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                 progress: bool = False) -> ml_collections.ConfigDict:
  """Write run directory `out` from Raven directory `hf_dir`; returns the run's config.

  Every check (config fields, tensor names, shapes, dtypes, the output directory) runs on the files'
  headers before anything is read or written. Tensors are then read one at a time, cast to `dtype`
  and placed on the device(s) (sharded by looped_models/sharding.py's rules over `mesh`, when given)."""
  from configs.errors import check_choice
  from rundir.checkpoint import Checkpointer
  from looped_models.sharding import check_divisible, tree_shardings
  from looped_models.model import abstract_model
  from rundir.workdir import write_json_atomic, write_status

  check_choice("--dtype", dtype, raven.DTYPES.values())
  rc = read_config(hf_dir)
  found = scan_tensors(hf_dir)
  names = raven.check_tensors(rc, {k: v[:2] for k, v in found.items()})
  out = os.path.abspath(out)
  cfg = run_config(rc, dtype, os.path.basename(out))
  _check_new_dir(out)
  tmp = f"{out}.partial"  # the same name on every process (orbax writes collectively)
  if os.path.exists(tmp):
    from rundir.workdir import RunDirError
    raise RunDirError(f"{tmp} exists: an import into {out} was interrupted; remove it first")
  if mesh is not None:
    check_divisible(cfg.model, mesh.shape["data"] * mesh.shape["fsdp"], mesh)
  _, abstract = abstract_model(cfg.model, cfg.train.seed)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shardings = (tree_shardings(abstract, mesh) if mesh is not None
               else jax.tree.map(lambda _: device, abstract))

  params = stream_params(hf_dir, rc, {k: found[k][2] for k in names}, abstract, shardings, dtype,
                         progress=progress)

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
                         "dtype": dtype, "raven_config": rc, "tensors": len(names)})
      for name in TOKENIZER_FILES:  # the checkpoint's own tokenizer travels with the run
        if os.path.isfile(os.path.join(hf_dir, name)):
          shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
      write_status(tmp, "done", step=0, steps=0, error=None, imported_from=os.path.abspath(hf_dir))
      if os.path.isdir(out):
        os.rmdir(out)  # checked empty above
      os.rename(tmp, out)
  except BaseException:
    if main:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return cfg


def stream_params(hf_dir: str, rc: dict, files: dict[str, str], abstract: dict, shardings: dict,
                  dtype: str, progress: bool = False) -> dict:
  """The parameter tree of the tensors {name: file}, read one tensor at a time, cast to `dtype` and
  placed with `shardings` (a tree like `abstract`; each device receives only its shard)."""
  from safetensors import safe_open
  from tqdm import tqdm
  params: dict = {}
  by_file: dict[str, list[str]] = {}
  for name, file in files.items():
    by_file.setdefault(file, []).append(name)
  bar = tqdm(total=len(files), desc="import", unit="tensor", disable=not progress, dynamic_ncols=True)
  for file, names in by_file.items():
    for name in names:
      # opened per tensor: the file's mapping (and the pages read through it) ends with the tensor
      with safe_open(os.path.join(hf_dir, file), framework="np") as f:
        w = f.get_tensor(name)
      for path, a in raven.to_params(name, w, rc):
        a = np.asarray(a, jnp.dtype(dtype))
        if a.shape != _get(abstract, path).shape:
          raise RavenError(f"tensor {name} maps to {'/'.join(map(str, path))} of shape "
                           f"{list(a.shape)}, but the model needs {list(_get(abstract, path).shape)}")
        _set(params, path, jax.make_array_from_callback(a.shape, _get(shardings, path),
                                                        lambda idx, a=a: a[idx]))
        del a
      del w
      bar.update()
  bar.close()
  return params


# -- export ----------------------------------------------------------------------------------------

def export_raven(run_dir: str, out: str, *, dtype: str | None = None,
                 shard_bytes: int = 5 * 2 ** 30) -> dict:
  """Write Raven directory `out` from run `run_dir` (its newest checkpoint); returns its config.json.
  A model whose options the layout cannot express is refused (RavenError naming the option)."""
  from safetensors.numpy import save_file
  from configs.errors import check_choice
  from rundir.run import open_run

  run = open_run(run_dir)  # the config it finished with, its newest checkpoint's parameters
  cfg, params = run.cfg, run.params
  bad = raven.fit_errors(cfg.model)
  if bad:
    raise RavenError(f"{run_dir} does not fit the Raven layout: {bad[0]}")
  dtype = dtype or cfg.model.param_dtype
  check_choice("--dtype", dtype, raven.DTYPES.values())
  out = os.path.abspath(out)
  _check_new_dir(out)
  rc = {**raven.raven_config(cfg.model, cfg.train), "torch_dtype": dtype}

  tmp = f"{out}.partial{os.getpid()}"
  os.makedirs(tmp)
  try:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in raven.from_params(params, cfg.model):
      a = np.ascontiguousarray(np.asarray(a, jnp.dtype(dtype)))
      if shards[-1] and size + a.nbytes > shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = a
      size += a.nbytes
    n = len(shards)
    files = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for file, shard in zip(files, shards):
      save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
    if n > 1:
      index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
               "weight_map": {k: f for f, s in zip(files, shards) for k in s}}
      with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(rc, f, indent=2)
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(run_dir, name)):
        shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, name))
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return rc


# -- logits ----------------------------------------------------------------------------------------

def logits_and_latents(graphdef: nnx.GraphDef, params: dict, tokens_BS: np.ndarray,
                       iterations: list[int], state0_BSD: np.ndarray | None = None,
                       key: jax.Array | None = None) -> dict[str, np.ndarray]:
  """{logits_r{R}: [B, S, V] float32, latents_r{R}: [B, S, D]} for every R in `iterations`: the
  latent is the state after R iterations as the coda reads it (normed with model.latent_norm).
  The run starts from `state0_BSD` when given, else from the model's own initial state (`key`)."""

  @jax.jit
  def start(params, tokens_BS, key):
    model = nnx.merge(graphdef, params)
    e_BSD = model.encode(tokens_BS, model.context(tokens_BS.shape[1]))
    return model.initial_state(e_BSD, key), e_BSD

  @jax.jit
  def advance(params, s_BSD, e_BSD):  # one iteration, compiled once, called R times
    model = nnx.merge(graphdef, params)
    return model.iterate(s_BSD, e_BSD, model.context(s_BSD.shape[1]), 1, 1).state_BSD

  @jax.jit
  def head(params, s_BSD):
    model = nnx.merge(graphdef, params)
    return model.latent(s_BSD).astype(jnp.float32), model.decode(s_BSD, model.context(s_BSD.shape[1]))

  tokens_BS = jnp.asarray(tokens_BS, jnp.int32)
  s_BSD, e_BSD = start(params, tokens_BS, jax.random.key(0) if key is None else key)
  if state0_BSD is not None:
    s_BSD = jnp.asarray(state0_BSD, s_BSD.dtype)
  out, done = {}, 0
  for R in sorted(set(iterations)):
    for _ in range(R - done):
      s_BSD = advance(params, s_BSD, e_BSD)
    done = R
    latent, logits = head(params, s_BSD)
    out[f"logits_r{R}"], out[f"latents_r{R}"] = np.asarray(logits), np.asarray(latent)
  return out


def run_logits(run_dir: str, tokens_BS: np.ndarray, iterations: list[int],
               state0: str | np.ndarray | None = None) -> dict[str, np.ndarray]:
  """`logits_and_latents` for run `run_dir`; `state0`: None (the model's initial state), "zeros",
  or an array [B, S, D]. Bad tokens or state: ConfigError naming the argument."""
  from configs.errors import ConfigError
  from rundir.config import resolve
  from rundir.run import load_run_config, open_run

  cfg = resolve(load_run_config(run_dir))
  m = cfg.model
  tokens_BS = np.asarray(tokens_BS)
  if tokens_BS.ndim != 2 or not np.issubdtype(tokens_BS.dtype, np.integer):
    raise ConfigError("--tokens", f"{tokens_BS.dtype}{list(tokens_BS.shape)}",
                      reason="must be a [batch, sequence] integer array")
  if tokens_BS.size and (tokens_BS.min() < 0 or tokens_BS.max() >= m.vocab_size):
    raise ConfigError("--tokens", f"ids in [{tokens_BS.min()}, {tokens_BS.max()}]",
                      reason=f"must lie in [0, model.vocab_size={m.vocab_size})")
  if not 1 <= tokens_BS.shape[1] <= m.max_len:
    raise ConfigError("--tokens", f"{tokens_BS.shape[1]} positions",
                      reason=f"must be 1..model.max_len={m.max_len}")
  if not iterations or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in iterations):
    raise ConfigError("--iterations", iterations, allowed="positive integers, comma-separated")
  if isinstance(state0, str):
    if state0 != "zeros":
      raise ConfigError("--state0", state0, allowed="zeros|STATE.npy")
    state0 = np.zeros((*tokens_BS.shape, m.d_model), np.float32)
  if state0 is not None and np.shape(state0) != (*tokens_BS.shape, m.d_model):
    raise ConfigError("--state0", f"shape {list(np.shape(state0))}",
                      reason=f"must be [batch, sequence, d_model] = {[*tokens_BS.shape, m.d_model]}")
  run = open_run(run_dir, cfg=cfg)
  return logits_and_latents(run.graphdef, run.params, tokens_BS, iterations, state0,
                            jax.random.key(cfg.train.seed))


# -- command line ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m looped_models.convert", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("from-raven", help="import a Huginn / Raven directory as a run directory")
  a.add_argument("hf_dir")
  a.add_argument("--out", required=True, help="the new run directory")
  a.add_argument("--dtype", default="float32", help="float32|bfloat16: parameters and compute")
  a.add_argument("--mesh", default="", help="DATA,FSDP,TENSOR: place the parameters sharded")
  b = sub.add_parser("to-raven", help="export a run directory as a Huginn / Raven directory")
  b.add_argument("run_dir")
  b.add_argument("--out", required=True, help="the new Hugging Face directory")
  b.add_argument("--dtype", default=None, help="float32|bfloat16 (default: the run's param_dtype)")
  b.add_argument("--shard_gb", type=float, default=5.0, help="largest safetensors file, GiB")
  c = sub.add_parser("logits", help="logits and latents of a run after R iterations")
  c.add_argument("run_dir")
  c.add_argument("--tokens", required=True, help="[B, S] integer .npy")
  c.add_argument("--state0", default=None, help="zeros | STATE.npy [B, S, D] (default: the model's)")
  c.add_argument("--iterations", default="1,4,16", help="comma-separated R")
  c.add_argument("--out", required=True, help="OUT.npz")
  return p


def main(argv: list[str] | None = None) -> int:
  from configs.errors import ConfigError
  from rundir.workdir import RunDirError

  args = _parser().parse_args(argv)
  try:
    if args.command == "from-raven":
      cfg = import_raven(args.hf_dir, args.out, dtype=args.dtype, mesh=make_mesh(args.mesh),
                         progress=True)
      m = cfg.model
      print(f"imported ({m.n_prelude}, {m.block_size}⊗R, {m.n_coda}) d={m.d_model} into {args.out}")
    elif args.command == "to-raven":
      rc = export_raven(args.run_dir, args.out, dtype=args.dtype,
                        shard_bytes=int(args.shard_gb * 2 ** 30))
      print(f"exported {rc['torch_dtype']} to {args.out}")
    else:
      try:
        iterations = [int(r) for r in args.iterations.split(",")]
      except ValueError:
        raise ConfigError("--iterations", args.iterations, allowed="positive integers, comma-separated"
                          ) from None
      tokens = _load_npy(args.tokens, "--tokens")
      state0 = (args.state0 if args.state0 in (None, "zeros")
                else _load_npy(args.state0, "--state0"))
      if os.path.exists(args.out):
        raise RunDirError(f"--out {args.out} already exists")
      arrays = run_logits(args.run_dir, tokens, iterations, state0)
      np.savez(args.out, **arrays)
      print(f"wrote {', '.join(sorted(arrays))} to {args.out}")
  except (RavenError, ConfigError, RunDirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _load_npy(path: str, flag: str) -> np.ndarray:
  from configs.errors import ConfigError
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(flag, path, reason=f"not a readable .npy file ({e})") from None


if __name__ == "__main__":
  sys.exit(main())
