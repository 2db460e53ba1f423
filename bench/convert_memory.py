"""Time and peak host memory of importing a Huginn / Raven checkpoint of at least 1B parameters.

  python -m bench.convert_memory [--d_model 2560] [--layers 2,8,2] [--shard_gb 1] [--dtype bfloat16]

Writes a synthetic Raven directory (random bfloat16 weights, sharded safetensors with an index) into a
temporary directory, then runs `python -m convert from-raven` on it in a child process
and records its wall time and peak resident memory (ru_maxrss of the child: file pages mapped from the
shard being read count too). The import's bound is about 1.2 x the largest shard plus the model in its
target dtype. Everything is deleted afterwards. Figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from bench.results import command, intro, parser, record, table
from looped_models import raven

# The child: start-up (jax, the converter) is measured apart from the import itself. Its peak is
# VmHWM (ru_maxrss would carry the parent's peak over fork and exec).
CHILD = """
import json, sys, time
import jax
import convert
def vm(key):
  return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
jax.devices()
base = vm("VmRSS:")
t0 = time.perf_counter()
assert convert.main(["from-raven", sys.argv[1], "--out", sys.argv[2], "--dtype", sys.argv[3]]) == 0
print(json.dumps({"seconds": time.perf_counter() - t0, "base": base, "peak": vm("VmHWM:")}))
"""


def synthetic_config(d: int, layers: tuple[int, int, int], vocab: int) -> dict:
  p, k, c = layers
  return dict(model_type="huginn_raven", n_embd=d, n_heads=d // 128, n_layers_in_prelude=p,
              n_layers_in_recurrent_block=k, n_layers_in_coda=c, intermediate_size=(27 * d) // 10 // 64 * 64,
              vocab_size=vocab, tie_embeddings=False, norm_eps=1e-6, rope_base=50000.0, qk_bias=True,
              mean_recurrence=32, mean_backprop_depth=8, block_size=4096, state_init="like-init",
              injection_type="linear")


def write_checkpoint(path: str, rc: dict, shard_bytes: int) -> tuple[int, int, int]:
  """Random (tiled) bfloat16 tensors in shards of at most `shard_bytes`; (parameters, bytes, largest shard)."""
  block = (np.random.default_rng(0).standard_normal(1 << 24, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(rc, f)
  shards, shard, size = [], {}, 0
  n_params = 0

  def flush():
    name = f"model-{len(shards) + 1:05d}.safetensors"
    save_file(shard, os.path.join(path, name))
    shards.append((name, list(shard), size))

  for name, shape in raven.expected_tensors(rc).items():
    a = np.resize(block, shape)  # random values, tiled (the import's cost does not depend on them)
    if shard and size + a.nbytes > shard_bytes:
      flush()
      shard, size = {}, 0
    shard[name], size, n_params = a, size + a.nbytes, n_params + a.size
  flush()
  index = {"metadata": {"total_size": 2 * n_params},
           "weight_map": {t: name for name, names, _ in shards for t in names}}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  return n_params, 2 * n_params, max(s for _, _, s in shards)


def main() -> None:
  args = parser(__doc__, "convert_memory", d_model=2560, layers=("2,8,2", "p,k,c"), vocab=32000,
                shard_gb=1.0, dtype="bfloat16").parse_args()
  rc = synthetic_config(args.d_model, tuple(int(x) for x in args.layers.split(",")), args.vocab)
  gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
  with tempfile.TemporaryDirectory(prefix="convert_bench") as tmp:
    hf, run = os.path.join(tmp, "hf"), os.path.join(tmp, "run")
    os.makedirs(hf)
    t0 = time.perf_counter()
    n_params, n_bytes, largest = write_checkpoint(hf, rc, int(args.shard_gb * 2 ** 30))
    write_s = time.perf_counter() - t0
    print(f"wrote {n_params / 1e9:.2f}B parameters ({gib(n_bytes)}) in {write_s:.0f} s", flush=True)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, "-c", CHILD, hf, run, args.dtype], check=True, env=env,
                         stdout=subprocess.PIPE, text=True).stdout
    child = json.loads(out.strip().splitlines()[-1])
    import_s, peak, base = child["seconds"], child["peak"], child["base"]
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run) for f in fs)
  model_bytes = n_params * (2 if args.dtype == "bfloat16" else 4)
  bound = 1.2 * largest + model_bytes
  print(f"import {import_s:.0f} s, peak RSS {gib(peak)}, {gib(peak - base)} above start-up "
        f"(bound {gib(bound)})")
  d, (pl, k, c) = args.d_model, (rc["n_layers_in_prelude"], rc["n_layers_in_recurrent_block"],
                                  rc["n_layers_in_coda"])
  lines = [f"## Raven import: {n_params / 1e9:.2f}B parameters, bfloat16 files, target {args.dtype}", "",
           intro(command("bench.convert_memory", args, "d_model", "layers", "vocab", "shard_gb", "dtype"),
                 f": a synthetic checkpoint ({pl}, {k}⊗r, {c}), d={d}, f={rc['intermediate_size']}, "
                 f"V={rc['vocab_size']}, untied, q/k bias; {gib(n_bytes)} in shards of at most "
                 f"{gib(largest)}; the import runs in a child process (`python -m convert from-raven`, "
                 f"one CPU device).", args.note), "",
           *table(["quantity", "value"], [
               ["import wall time (read, cast, place, orbax write)", f"{import_s:.1f} s"],
               ["peak resident memory of the import process", gib(peak)],
               [f"of which after start-up (python, jax, the converter: {gib(base)})", gib(peak - base)],
               [f"bound: 1.2 × largest shard + model in {args.dtype}", gib(bound)],
               [f"model in {args.dtype}", gib(model_bytes)], ["largest shard", gib(largest)],
               ["run directory written", gib(ckpt_bytes)],
               ["writing the synthetic checkpoint (not part of the import)", f"{write_s:.1f} s"]])]
  record(args.section, lines, args.dry_run)


if __name__ == "__main__":
  main()
