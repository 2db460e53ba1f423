"""TPU generations and slice topologies, by the names Cloud TPU gives accelerator types.

  topo = parse("v5e-16")                 # Topology: v5e, 16 chips, 4x4; "v5p-128" is 64 chips
  devices = topo.devices(slices=2)       # TPU devices of that slice (x2), no TPU attached (libtpu)

In an accelerator type's name the number counts chips for v5e and v6e and TensorCores for v4 and v5p
(two per chip). The figures per chip (HBM, peak bf16 FLOP/s, HBM bandwidth) are Google's published
ones, from each generation's Cloud TPU page (`source`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from configs.errors import ConfigError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                 # the generation as accelerator types name it
  hbm_bytes: int            # per chip
  bf16_flops: float         # peak, per chip
  hbm_bandwidth: float      # bytes per second, per chip
  cores_per_name: int       # what the number in an accelerator type's name counts per chip
  dims: int                 # the torus: 2-D (v5e, v6e) or 3-D (v4, v5p)
  source: str


CHIPS = {c.name: c for c in (
    Chip("v4", 32 * GiB, 275e12, 1200e9, 2, 3, "https://cloud.google.com/tpu/docs/v4"),
    Chip("v5e", 16 * GiB, 197e12, 819e9, 1, 2, "https://cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", 95 * GiB, 459e12, 2765e9, 2, 3, "https://cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", 32 * GiB, 918e12, 1640e9, 1, 2, "https://cloud.google.com/tpu/docs/v6e"),
)}


def _shape(chips: int, dims: int) -> tuple[int, ...] | None:
  """The slice's chip grid: 2-D 1x1, 2x2, 2x4, 4x4, 4x8, ... (v5e, v6e); 3-D 2x2x1, 2x2x2, 2x2x4,
  2x4x4, 4x4x4, 4x4x8, ... (v4, v5p). None for a count no slice has."""
  if chips < 1 or chips & (chips - 1):
    return None
  if dims == 2:
    if chips == 2:
      return None
    e = int(math.log2(chips))
    return (2 ** (e // 2), 2 ** (e - e // 2))
  if chips < 4:
    return None
  if chips == 4:
    return (2, 2, 1)
  e = int(math.log2(chips))
  base = e // 3
  extra = e - 3 * base
  return tuple(2 ** (base + (1 if i >= 3 - extra else 0)) for i in range(3))


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                 # as given: v5e-16, v5p-128, or v5e:4x4
  chip: Chip
  grid: tuple[int, ...]     # chips along each torus axis

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def compiler_name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.grid))}"

  def devices(self, slices: int = 1) -> list:
    """The TPU devices of `slices` such slices (libtpu's description: nothing attached needed)."""
    try:
      from jax.experimental import topologies  # lazy: only this path needs libtpu
      return list(topologies.get_topology_desc(self.compiler_name, "tpu", num_slices=slices).devices)
    except Exception as e:  # noqa: BLE001 - no libtpu, or a topology it does not know
      text = str(e).strip().splitlines()
      raise ConfigError("--topology", self.name, reason=(
          f"the TPU compiler could not describe {self.compiler_name} x{slices} "
          f"({text[0][:160] if text else type(e).__name__}); is libtpu installed (make tpu-setup, "
          "then .venv-tpu/bin/python)?")) from None


# What libtpu otherwise asks a TPU VM's metadata server for (and warns about, at length, when there is
# none): set only in a process that uses no TPU itself (JAX_PLATFORMS=cpu), as compiling does.
# ALLOW_MULTIPLE_LIBTPU_LOAD: compiles side by side (libtpu otherwise takes a machine-wide lock file).
_NO_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
               "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
               "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def compile_only_environment(cpu: bool = True) -> None:
  """Before JAX starts (`cpu`): compile on this machine's CPU backend (the topology's devices are
  described, not attached; a TPU here, maybe busy with a run, is left alone). In a process on the CPU
  backend, libtpu is told there is no TPU to look for. Values already in the environment are kept."""
  if cpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    for key, value in _NO_TPU_ENV.items():
      os.environ.setdefault(key, value)


def parse(name: str) -> Topology:
  """`v5e-16`, `v6e-256`, `v4-64`, `v5p-128` (Cloud TPU accelerator types) or `v5e:4x4` (the chip
  grid); ConfigError naming the known forms otherwise."""
  known = ", ".join(CHIPS)
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name or "")
  g = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name or "")
  chip = CHIPS.get((m or g).group(1)) if (m or g) else None
  if chip is None:
    raise ConfigError("--topology", name, reason=f"give an accelerator type such as v5e-16, v5p-128, "
                      f"v6e-256 or v4-64 (generations: {known}), or a chip grid such as v5e:4x4")
  if g:
    grid = tuple(int(x) for x in g.group(2).split("x"))
    if len(grid) != chip.dims:
      raise ConfigError("--topology", name, reason=f"a {chip.name} grid has {chip.dims} dimensions")
    return Topology(name, chip, grid)
  count = int(m.group(2))
  chips, rest = divmod(count, chip.cores_per_name)
  grid = _shape(chips, chip.dims) if not rest else None
  if grid is None:
    what = "TensorCores (2 per chip)" if chip.cores_per_name == 2 else "chips"
    raise ConfigError("--topology", name, reason=f"no {chip.name} slice has {count} {what}")
  return Topology(name, chip, grid)
