"""Model FLOPs utilisation of the train step on one NVIDIA GPU: (2, 4⊗8, 2), d = 1024, sequence 1024,
bfloat16, the largest batch that fits, attention through cuDNN (and XLA for contrast).

  python -m bench.gpu_mfu                     # on a GPU host: prints and records the figures
  python -m bench.gpu_mfu --smoke             # tiny shapes on any backend: checks the script runs

The batch: the largest power of two (up to --max_batch) whose compiled train step XLA says fits in
--memory_fraction of the device's memory (estimated from one compile at batch 8, then checked),
halved again if it still runs out. Figures: training
tokens/s, model TFLOP/s (6 × matmul FLOPs of the forward per token, the causal half of the attention
scores) and MFU against the chip's dense bfloat16 peak; the forward pass (prefill) tokens/s as well.
Decoding: tokens/s of the same model (random initialisation) generating --new tokens after a 16-token
prompt with the KV cache (`looped_models.generate`), at batch 1 and 8, fixed R = --iters, with the
`exact` and the `latest` cache. Per-token exit needs a trained model: `python -m bench.generate`.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from bench.generate import timed as timed_decode
from bench.reference_speed import batch_of, forward_caller, reference_config, timed, train_caller
from bench.results import intro, parser, peak_flops, record, share, table
from looped_models.flops import train_flops
from looped_models.generate import Generator
from looped_models.model import init_model


def gpu_config(args, impl: str):
  c = reference_config(d_model=args.d_model, n_heads=args.d_model // 64, d_ff=args.d_ff,
                       vocab_size=args.vocab, max_len=args.seq, dtype=args.dtype,
                       attention_impl=impl, remat=args.remat)
  c.train.batch_size = 0
  return c


def compile_step(c, batch_size: int, args):
  """(the train step compiled for this batch as a thunk, XLA's memory need in bytes: arguments, outputs
  and temporaries), or (None, None) where it does not compile."""
  try:
    call = train_caller(c, batch_of(c.model.vocab_size, batch_size, args.seq), args.iters)
  except Exception as e:  # noqa: BLE001 (an allocation failure at compile time means "no")
    print(f"batch {batch_size}: does not compile ({str(e).splitlines()[0][:120]})", flush=True)
    return None, None
  m = call.compiled.memory_analysis()
  need = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  print(f"batch {batch_size}: {need / 2**30:.1f} GiB", flush=True)
  return call, (m.argument_size_in_bytes, m.output_size_in_bytes + m.temp_size_in_bytes)


def largest_batch(c, args):
  """(batch, its compiled step): the largest power of two up to --max_batch whose step fits in
  --memory_fraction of the device's memory. One compile at a probe batch gives the fixed part
  (parameters, optimizer state) and the per-sequence part (outputs, temporaries) of the need; the
  batch that line allows is compiled and checked, halved until it fits (two compiles, usually)."""
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) * args.memory_fraction
  probe = min(8, args.max_batch)
  probe_call, need = compile_step(c, probe, args)
  if probe_call is None:
    raise SystemExit(f"the train step does not compile at batch {probe}")
  if not limit:  # no memory figure (a CPU): the probe
    return probe, probe_call
  fixed, per_seq = need[0], need[1] / probe
  b = 1
  while b * 2 <= args.max_batch and fixed + b * 2 * per_seq <= limit:
    b *= 2
  while b > 1:
    call, need = (probe_call, need) if b == probe else compile_step(c, b, args)
    if call is not None and sum(need) <= limit:
      return b, call
    b //= 2
  call = compile_step(c, 1, args)[0]
  if call is None:
    raise SystemExit("the train step does not compile at batch 1")
  return 1, call


def measure(c, batch_size: int, train, args) -> dict:
  """Train step (the compiled `train`, at `batch_size`) and forward pass at that batch; a run-time
  out-of-memory halves the batch."""
  while True:
    try:
      step_s = timed(train, args.repeats, args.warmup)
      break
    except Exception as e:  # noqa: BLE001 (out of memory at run time: halve the batch)
      if "RESOURCE_EXHAUSTED" not in str(e) or batch_size == 1:
        raise
      batch_size //= 2
      print(f"out of memory; batch {batch_size}", flush=True)
      train = train_caller(c, batch_of(c.model.vocab_size, batch_size, args.seq), args.iters)
  del train
  batch = batch_of(c.model.vocab_size, batch_size, args.seq)
  fwd_s = timed(forward_caller(c, batch, args.iters), args.repeats, args.warmup)
  tokens = batch_size * args.seq
  flops, peak = train_flops(c.model, batch_size, args.seq, args.iters), peak_flops()
  return {"impl": c.model.attention_impl, "batch": batch_size, "step_s": step_s,
          "tokens_per_s": tokens / step_s, "tflops": flops / step_s / 1e12,
          "mfu": flops / step_s / peak if peak else None, "forward_tokens_per_s": tokens / fwd_s}


def decode(c, args) -> list[dict]:
  """Decode tokens/s of the model of `c` (random initialisation, greedy, fixed R = args.iters)."""
  gen = Generator(nnx.merge(*init_model(c.model, 0)))
  rows = []
  for batch in (1, 8):
    prompts = np.random.default_rng(batch).integers(0, c.model.vocab_size, (batch, 16)).tolist()
    for cache in ("exact", "latest"):
      s = timed_decode(gen, prompts, repeats=args.decode_repeats, max_new=args.new,
                       iterations=args.iters, cache=cache, slots=batch)
      rows.append({"batch": batch, "cache": cache, "tokens_per_s": s["decode_tokens_per_s"],
                   "cache_mib": s["cache_bytes"] / 2**20, "compile_s": s["compile_s"]})
      print(rows[-1], flush=True)
  return rows


def main() -> None:
  args = parser(__doc__, "gpu_mfu", note=False, d_model=1024, d_ff=2816, vocab=32768, seq=1024,
                iters=8, dtype="bfloat16", impls=("auto,xla", "model.attention_impl values to measure"),
                max_batch=256, memory_fraction=0.9, remat=False, repeats=10, warmup=3,
                new=(256, "tokens generated per sequence when decoding"), decode_repeats=3,
                smoke=(False, "tiny shapes, any backend, nothing recorded")).parse_args()
  if args.smoke:
    args.d_model, args.d_ff, args.vocab, args.seq, args.iters = 128, 256, 256, 64, 2
    args.max_batch, args.repeats, args.warmup, args.impls = 4, 1, 1, "auto"
    args.new, args.decode_repeats = 8, 1
  elif jax.default_backend() != "gpu":
    sys.exit(f"no GPU here (backend {jax.default_backend()}); run with --smoke to check the script")
  rows = []
  for impl in args.impls.split(","):
    c = gpu_config(args, impl)
    b, train = largest_batch(c, args)
    rows.append(measure(c, b, train, args))
    del train
    print(rows[-1], flush=True)
  decoded = decode(gpu_config(args, "auto"), args)
  cmd = " ".join(["python -m bench.gpu_mfu", *sys.argv[1:]])
  lines = [f"## GPU train-step MFU: (2, 4⊗{args.iters}, 2), d = {args.d_model}, swiglu {args.d_ff}, "
           f"vocab {args.vocab}, sequence {args.seq}, {args.dtype}{', remat' if args.remat else ''}",
           "", intro(cmd, f" (median of {args.repeats} steps after {args.warmup} warm-ups; the largest "
                     f"power-of-two batch whose compiled step fits in {args.memory_fraction:.0%} of the "
                     f"device memory)."), "",
           *table(["attention", "batch", "step (s)", "train tokens/s", "model TFLOP/s", "MFU",
                   "forward tokens/s"],
                  [[r["impl"], r["batch"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                    f"{r['tflops']:.1f}", share(r["mfu"]), f"{r['forward_tokens_per_s']:,.0f}"]
                   for r in rows])]
  lines += ["", "Target: ≥ 40% MFU on an H100/H200. Model FLOPs: 3 × the forward's matmul FLOPs "
            "(projections, concat adapter, unembedding, the causal half of QKᵀ and AV; "
            "`looped_models.flops.train_flops`).", "",
            f"Decoding, the same model (random initialisation): {args.new} greedy tokens after a 16-token "
            f"prompt, fixed R = {args.iters}, tokens/s of the decode loop (compile and prefill excluded; "
            f"median of {args.decode_repeats} runs).", "",
            *table(["batch", "cache", "decode tokens/s", "cache MiB"],
                   [[r["batch"], r["cache"], f"{r['tokens_per_s']:,.0f}", f"{r['cache_mib']:,.1f}"]
                    for r in decoded])]
  record(args.section, lines, args.dry_run or args.smoke)


if __name__ == "__main__":
  main()
