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
stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from configs.errors import ConfigError
from convert.exporter import export_raven
from convert.importer import import_raven, make_mesh
from convert.logits import run_logits
from looped_models.raven import RavenError
from rundir.workdir import RunDirError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n")[0])
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
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(flag, path, reason=f"not a readable .npy file ({e})") from None
