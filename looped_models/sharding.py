"""Device mesh and sharding rules: one code path from one CPU device to a pod.

The mesh has three named axes: `data` (batch), `fsdp` (batch and parameter shards), `tensor` (heads and
MLP hidden units). Axis types are `Auto` on purpose: the train step is a `jax.jit` with explicit
in/out shardings for parameters, optimizer state and batch, and XLA's sharding propagation places the
activations in between, so the model code carries no sharding annotations.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from configs.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameter path (slash-joined, e.g. "block/0/attn/query/kernel") -> PartitionSpec. First match wins.
RULES: tuple[tuple[str, P], ...] = (
    (r"attn/(query|key|value)/kernel$", P("fsdp", "tensor")),
    (r"attn/out/kernel$", P("tensor", "fsdp")),
    (r"mlp/(up|gate)/kernel$", P("fsdp", "tensor")),
    (r"mlp/down/kernel$", P("tensor", "fsdp")),
    (r"injection/proj/kernel$", P("fsdp", "tensor")),
    (r"(^|/)(embed|pos_embed)/embedding$", P(None, "tensor")),
    (r"(^|/)unembed/kernel$", P("tensor", None)),
    (r".*", P()),  # norms, biases: small, replicated
)


def mesh_shape(mesh_cfg: Any, n_devices: int) -> tuple[int, int, int]:
  """Resolve the -1 entry of (data, fsdp, tensor) and check the product against the devices."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  for name, size in zip(AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{name}", size, allowed="a positive integer or -1")
  if sizes.count(-1) > 1:
    raise ConfigError("mesh", tuple(sizes), reason="at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ConfigError("mesh", tuple(sizes), reason=f"{n_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ConfigError("mesh", tuple(sizes),
                      reason=f"data*fsdp*tensor={int(np.prod(sizes))} but there are {n_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all). Devices of several TPU slices
  (multi-slice) get the `data` axis laid across the slices, over the data-center network, and FSDP
  and tensor parallelism within each slice, over its chip interconnect."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  types = (AxisType.Auto,) * len(AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    try:
      return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    except NotImplementedError:  # an axis that is no product of a TPU torus's axes (2 of a 4x4x4)
      from jax.experimental import mesh_utils  # only such a mesh splits a physical axis
      return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True),
                  AXES, axis_types=types)
  if shape[0] % slices:
    raise ConfigError("mesh.data", shape[0], reason=f"the data axis spans the {slices} slices and "
                      "must be divisible by their number")
  from jax.experimental import mesh_utils  # only multi-slice runs lay out a hybrid mesh
  grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1),
                                              devices)
  return Mesh(grid, AXES, axis_types=types)


def path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(path: str) -> P:
  for pattern, spec in RULES:
    if re.search(pattern, path):
      return spec
  return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of parameters (or anything shaped like them, e.g. Adam moments),
  matching each leaf's path against RULES. Scalars and leaves of other ranks are replicated."""

  def one(path, leaf):
    spec = spec_for(path_str(path))
    if len(spec) != np.ndim(leaf):
      spec = P()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put(x: Any, mesh: Mesh, rows: bool = True) -> jax.Array:
  """A host value that every process holds alike, as a global array on the mesh: rows split over
  data x fsdp when `rows` and they divide, replicated otherwise."""
  x = np.asarray(x)
  ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  split = rows and x.ndim > 0 and x.shape[0] % ways == 0
  sharding = NamedSharding(mesh, P(BATCH_AXES) if split else P())
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def place(batch: dict, mesh: Mesh | None) -> dict:
  """The batch ({name: [B, ...] numpy}) as global arrays on the mesh: rows split over data x fsdp
  when they divide, replicated otherwise (every process holds the same deterministic batch); as
  given without a mesh."""
  if mesh is None:
    return batch
  return {k: put(v, mesh) for k, v in batch.items()}


def check_divisible(model_cfg: Any, batch_size: int, mesh: Mesh,
                    batch_key: str = "train.batch_size") -> None:
  """The shapes the rules shard must divide evenly over their mesh axes."""
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % batch_ways:
    raise ConfigError(batch_key, batch_size,
                      reason=f"must be divisible by mesh data*fsdp={batch_ways}")
  tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
  for key in ("n_heads", "d_ff"):
    if getattr(model_cfg, key) % tensor:
      raise ConfigError(f"model.{key}", getattr(model_cfg, key),
                        reason=f"must be divisible by mesh.tensor={tensor}")
  for key in ("d_model", "d_ff"):
    if getattr(model_cfg, key) % fsdp:
      raise ConfigError(f"model.{key}", getattr(model_cfg, key),
                        reason=f"must be divisible by mesh.fsdp={fsdp}")


def device_memory(device: jax.Device) -> int:
  """The bytes `device` can hold: its allocator's limit (GPU, TPU), else for a CPU device its share
  of the host's physical memory (the local CPU devices share it)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory statistics
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host // max(1, len([d for d in jax.local_devices() if d.platform == device.platform]))


def check_fits(tree: Any, what: str) -> None:
  """ConfigError (one line) when the arrays of `tree` (ShapeDtypeStructs with their shardings) would
  not fit in the memory of the device holding most of them: checked from shapes alone, before any
  allocation, so that a model too large for the machine is refused rather than left to hang or be
  killed while it is being initialised."""
  per_device: dict[Any, int] = {}
  largest = (0, "")
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    size = int(np.prod(shard, dtype=np.float64)) * np.dtype(leaf.dtype).itemsize
    largest = max(largest, (size, f"{path_str(keypath)} {'x'.join(map(str, leaf.shape))}"))
    for d in leaf.sharding.device_set:
      per_device[d] = per_device.get(d, 0) + size
  if not per_device:
    return
  device, need = max(per_device.items(), key=lambda kv: kv[1])
  have = device_memory(device)
  if need > have:
    gib = 1024 ** 3
    raise ConfigError("model", f"{need / gib:,.1f} GiB per device", reason=(
        f"{what} need that on {device.platform}:{device.id}, which holds {have / gib:,.1f} GiB; the "
        f"largest array is {largest[1]} ({largest[0] / gib:,.1f} GiB); use a smaller model (e.g. "
        "model.max_len) or a larger mesh"))
