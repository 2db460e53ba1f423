"""The files of a Huginn / Raven directory: config.json, safetensors files (sharded ones listed in
model.safetensors.index.json) and the tokenizer's files. Reading checks names, shapes and dtypes on
the files' headers first; tensors are then read one at a time (docs/pretrained.md)."""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from looped_models import raven
from looped_models.raven import RavenError

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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


def _weight_map(hf_dir: str) -> tuple[dict[str, str] | None, list[str]]:
  """(the index's {tensor: file} or None, the safetensors files to read)."""
  index_path = os.path.join(hf_dir, INDEX)
  if not os.path.isfile(index_path):
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
      raise RavenError(f"{hf_dir} holds no *.safetensors file")
    return None, files
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
  return weight_map, files


def scan_tensors(hf_dir: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
  """{name: (shape, safetensors dtype, file)} from the files' headers (no tensor is read). Sharded
  checkpoints are read through model.safetensors.index.json, whose map must agree with the files."""
  weight_map, files = _weight_map(hf_dir)
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


def set_leaf(tree: dict, path: tuple, value: Any) -> None:
  """tree[path[0]][path[1]]... = value, making the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_leaf(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def stream_params(hf_dir: str, rc: dict, files: dict[str, str], abstract: dict, shardings: dict,
                  dtype: str, progress: bool = False) -> dict:
  """The parameter tree of the tensors {name: file}, read one tensor at a time, cast to `dtype` and
  placed with `shardings` (a tree like `abstract`; each device receives only its shard)."""
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
        if a.shape != get_leaf(abstract, path).shape:
          raise RavenError(f"tensor {name} maps to {'/'.join(map(str, path))} of shape "
                           f"{list(a.shape)}, but the model needs {list(get_leaf(abstract, path).shape)}")
        set_leaf(params, path, jax.make_array_from_callback(a.shape, get_leaf(shardings, path),
                                                            lambda idx, a=a: a[idx]))
        del a
      del w
      bar.update()
  bar.close()
  return params


def write_tensors(out: str, tensors: Iterable[tuple[str, Any]], dtype: str, shard_bytes: int) -> None:
  """Write (name, array) pairs cast to `dtype` into model.safetensors, or into shards of at most
  `shard_bytes` listed in model.safetensors.index.json."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, a in tensors:
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
    save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
  if n > 1:
    index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
             "weight_map": {k: f for f, s in zip(files, shards) for k in s}}
    with open(os.path.join(out, INDEX), "w") as f:
      json.dump(index, f, indent=2)


def copy_tokenizer(src: str, dst: str) -> None:
  """The tokenizer's files of `src` (those it has) into `dst`."""
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
