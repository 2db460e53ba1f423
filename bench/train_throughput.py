"""Train-step throughput of (2, 4⊗r, 2) at d=256, seq 256, batch 8 for r in {4, 16, 64}, and the
compile time at r=64 over r=4 (the block is a scan, so the ratio should stay near 1).

  python -m bench.train_throughput [--steps 3] [--recurrences 4,16,64] [--d_model 256] [--seq 256]
      [--batch 8] [--dtype float32] [--remat] [--section NAME]

On a GPU, `--d_model 1024 --seq 1024 --recurrences 8 --dtype bfloat16` gives the MFU figure.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.results import machine, write_section
from configs.base import get_config
from looped_models import sharding
from looped_models.model import init_model
from train.step import make_optimizer, make_train_step

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per chip


def model_flops_per_step(m, r: int, batch: int, seq: int) -> float:
  """6 N T for the matmuls of all layer applications plus the attention scores (PaLM's accounting)."""
  d, f = m.d_model, m.d_ff
  layer_params = 4 * d * d + (3 if m.mlp == "swiglu" else 2) * d * f
  layers = m.n_prelude + m.n_coda + m.block_size * r
  tokens = batch * seq
  dense = 6 * tokens * (layers * layer_params + d * m.vocab_size)
  attention = 6 * layers * batch * seq * seq * d  # QK^T and AV, fwd + bwd
  return dense + attention


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
  flops = model_flops_per_step(m, r, args.batch, args.seq)
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
  return {"r": r, "compile_s": compile_s, "step_s": step_s,
          "tokens_per_s": args.batch * args.seq / step_s, "tflops": flops / step_s / 1e12,
          "mfu": flops / step_s / (peak * jax.device_count()) if peak else None}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--recurrences", default="4,16,64")
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--section", default="train_throughput")
  args = p.parse_args()
  rows = []
  for r in (int(x) for x in args.recurrences.split(",")):
    row = bench(r, args)
    rows.append(row)
    print(row, flush=True)
  lines = [f"## Train-step throughput: (2, 4⊗r, 2), d={args.d_model}, seq {args.seq}, batch "
           f"{args.batch}, {args.dtype}{', remat' if args.remat else ''}",
           "", f"Machine: {machine()}. `python -m bench.train_throughput "
           f"--recurrences {args.recurrences} --d_model {args.d_model} --seq {args.seq} "
           f"--batch {args.batch} --dtype {args.dtype}{' --remat' if args.remat else ''}` "
           f"(mean of {args.steps} steps after one warm-up step).", "",
           "| r | step (s) | tokens/s | model TFLOP/s | MFU | compile (s) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for row in rows:
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
    lines.append(f"| {row['r']} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | "
                 f"{row['tflops']:.3f} | {mfu} | {row['compile_s']:.2f} |")
  if len(rows) > 1:
    lines += ["", f"Compile time at r={rows[-1]['r']} over r={rows[0]['r']}: "
              f"{rows[-1]['compile_s'] / rows[0]['compile_s']:.2f} (target <= 1.3)."]
  write_section(args.section, "\n".join(lines))


if __name__ == "__main__":
  main()
