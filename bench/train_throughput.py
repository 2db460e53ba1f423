"""Train-step throughput of (2, 4⊗r, 2) at d=256, seq 256, batch 8 for r in {4, 16, 64}, and the
compile time at r=64 over r=4 (the block is a scan, so the ratio should stay near 1).

  python -m bench.train_throughput [--steps 3] [--recurrences 4,16,64] [--d_model 256] [--seq 256]
      [--batch 8] [--dtype float32] [--remat] [--section NAME] [--dry-run]

On a GPU, `--d_model 1024 --seq 1024 --recurrences 8 --dtype bfloat16` gives the MFU figure. Model
FLOPs: `looped_models.flops.train_flops` (3× the forward's matmuls, the causal half of attention).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.results import command, intro, parser, peak_flops, record, share, table
from configs.base import get_config
from looped_models import sharding
from looped_models.flops import train_flops
from looped_models.model import init_model
from train.step import make_optimizer, make_train_step


def bench(r: int, args) -> dict:
  c = get_config()
  m = c.model
  m.update(d_model=args.d_model, n_heads=args.d_model // 64, d_ff=4 * args.d_model, n_prelude=2,
           block_size=4, n_coda=2, max_len=args.seq, vocab_size=256, attention="full",
           dtype=args.dtype, remat=args.remat)
  c.train.update(steps=1000, recurrence="fixed", mean_recurrence=r)
  graphdef, params = init_model(m, 0)
  tx = make_optimizer(c.train)
  mesh = sharding.make_mesh(c.mesh)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  state_sh = sharding.tree_shardings(state, mesh)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  state = jax.device_put(state, state_sh)
  step = jax.jit(make_train_step(graphdef, tx, max_iters=r, backprop_depth=0, seed=0),
                 in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (args.batch, args.seq), dtype=np.int32)
  batch = jax.device_put({"inputs": tokens, "targets": np.roll(tokens, -1, 1),
                          "mask": np.ones((args.batch, args.seq), np.float32)}, batch_sh)
  n = jnp.int32(r)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, n).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch, n)  # warm-up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch, n)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps
  flops, peak = train_flops(m, args.batch, args.seq, r), peak_flops()
  return {"r": r, "compile_s": compile_s, "step_s": step_s,
          "tokens_per_s": args.batch * args.seq / step_s, "tflops": flops / step_s / 1e12,
          "mfu": flops / step_s / peak if peak else None}


def main() -> None:
  args = parser(__doc__, "train_throughput", note=False, steps=3, recurrences="4,16,64", d_model=256,
                seq=256, batch=8, dtype="float32", remat=False).parse_args()
  rows = []
  for r in (int(x) for x in args.recurrences.split(",")):
    row = bench(r, args)
    rows.append(row)
    print(row, flush=True)
  cmd = command("bench.train_throughput", args, "recurrences", "d_model", "seq", "batch", "dtype", "remat")
  lines = [f"## Train-step throughput: (2, 4⊗r, 2), d={args.d_model}, seq {args.seq}, batch "
           f"{args.batch}, {args.dtype}{', remat' if args.remat else ''}", "",
           intro(cmd, f" (mean of {args.steps} steps after one warm-up step)."), "",
           *table(["r", "step (s)", "tokens/s", "model TFLOP/s", "MFU", "compile (s)"],
                  [[row["r"], f"{row['step_s']:.3f}", f"{row['tokens_per_s']:.0f}", f"{row['tflops']:.3f}",
                    share(row["mfu"]), f"{row['compile_s']:.2f}"] for row in rows])]
  if len(rows) > 1:
    lines += ["", f"Compile time at r={rows[-1]['r']} over r={rows[0]['r']}: "
              f"{rows[-1]['compile_s'] / rows[0]['compile_s']:.2f} (target <= 1.3)."]
  record(args.section, lines, args.dry_run)


if __name__ == "__main__":
  main()
