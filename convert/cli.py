"""Import and export Huginn / Raven checkpoints; write a run's logits and latents (docs/pretrained.md).

  python -m convert from-raven HF_DIR --out RUN_DIR [--dtype float32|bfloat16] [--mesh D,F,T]
  python -m convert to-raven RUN_DIR --out HF_DIR [--dtype float32|bfloat16] [--shard_gb 5]
  python -m convert logits RUN_DIR --tokens TOKENS.npy [--state0 zeros|STATE.npy] \\
      --iterations 1,4,16 --out OUT.npz

An imported model is a run directory like a trained one (config.json in the framework's keys, a
params-only orbax checkpoint at step 0, status.json), so `python -m eval --workdir RUN_DIR` opens it.
Import streams tensor by tensor; every check runs before anything is written, and the output directory
appears only once complete (it is written under a temporary name first). The logits and latents of
`logits` compare the run with any other implementation of the same checkpoint. Bad input: one line on
stderr, exit status 2 (rundir/cli.py).

`define_flags(fv)` puts the flags on a FlagValues (convert/__main__.py: the global one), `command`
runs a parsed command line, `main(argv)` does both in this process on flags of its own.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
from absl import flags

from configs.errors import ConfigError
from convert.exporter import export_raven
from convert.importer import import_raven, make_mesh
from convert.logits import run_logits
from rundir.cli import call, command as subcommand, require
from rundir.workdir import RunDirError

COMMANDS = {"from-raven": ["HF_DIR"], "to-raven": ["RUN_DIR"], "logits": ["RUN_DIR"]}


def define_flags(fv: flags.FlagValues) -> SimpleNamespace:
  """The flags of `python -m convert` on `fv`; their holders by name."""
  s = lambda name, default, text: flags.DEFINE_string(name, default, text, flag_values=fv)
  return SimpleNamespace(
      out=s("out", None, "from-raven: the new run directory; to-raven: the new Hugging Face "
            "directory; logits: OUT.npz."),
      dtype=s("dtype", None, "float32|bfloat16: parameters and compute (from-raven default float32; "
              "to-raven default the run's param_dtype)."),
      mesh=s("mesh", "", "from-raven: DATA,FSDP,TENSOR, place the parameters sharded."),
      shard_gb=flags.DEFINE_float("shard_gb", 5.0, "to-raven: largest safetensors file, GiB.",
                                  flag_values=fv),
      tokens=s("tokens", None, "logits: [B, S] integer .npy."),
      state0=s("state0", None, "logits: zeros | STATE.npy [B, S, D] (default: the model's)."),
      iterations=s("iterations", "1,4,16", "logits: comma-separated R."))


def command(f: SimpleNamespace, argv: list[str]) -> int:
  """The command line `argv` (the program, the subcommand, its argument) with the parsed flags `f`."""
  name, (path,) = subcommand(argv, COMMANDS)
  require(f.out)
  if name == "from-raven":
    cfg = import_raven(path, f.out.value, dtype=f.dtype.value or "float32",
                       mesh=make_mesh(f.mesh.value), progress=True)
    m = cfg.model
    print(f"imported ({m.n_prelude}, {m.block_size}⊗R, {m.n_coda}) d={m.d_model} into {f.out.value}")
  elif name == "to-raven":
    rc = export_raven(path, f.out.value, dtype=f.dtype.value,
                      shard_bytes=int(f.shard_gb.value * 2 ** 30))
    print(f"exported {rc['torch_dtype']} to {f.out.value}")
  else:
    require(f.tokens)
    try:
      iterations = [int(r) for r in f.iterations.value.split(",")]
    except ValueError:
      raise ConfigError("--iterations", f.iterations.value,
                        allowed="positive integers, comma-separated") from None
    tokens = _load_npy(f.tokens.value, "--tokens")
    state0 = (f.state0.value if f.state0.value in (None, "zeros")
              else _load_npy(f.state0.value, "--state0"))
    if os.path.exists(f.out.value):
      raise RunDirError(f"--out {f.out.value} already exists")
    arrays = run_logits(path, tokens, iterations, state0)
    np.savez(f.out.value, **arrays)
    print(f"wrote {', '.join(sorted(arrays))} to {f.out.value}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """`python -m convert ARGV...` in this process (default: sys.argv[1:]), on flags of its own: the
  exit status."""
  fv = flags.FlagValues()
  f = define_flags(fv)
  argv = sys.argv[1:] if argv is None else argv
  return call(lambda rest: command(f, rest), ["python -m convert", *argv], fv)


def _load_npy(path: str, flag: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(flag, path, reason=f"not a readable .npy file ({e})") from None
