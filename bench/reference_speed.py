"""Train step and forward passes at the configuration of the public Huginn PyTorch implementation's
small benchmark, next to the machine's own fp32 matmul rate measured in the same run.

  python -m bench.reference_speed [--repeats 10] [--warmup 3] [--section reference_speed] [--dry-run]

(2, 4⊗8, 2), d = 256, 4 heads, gated-SiLU MLP of width 869, vocabulary 512, tied embeddings, concat
injection, sandwich norm, full causal attention, float32, batch 8 × 256 tokens, all 8 iterations
back-propagated, AdamW. Figures are medians of `--repeats` calls after `--warmup` calls. The reference's
own figures (PyTorch eager, 2 threads, measured on a 2-core AMD EPYC machine, issue 15) are quoted for the
ratio; they only compare with figures measured on that machine.
"""

from __future__ import annotations

import resource
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.results import command, intro, parser, record, table
from configs.base import get_config
from looped_models.flops import forward_flops, train_flops
from looped_models.model import init_model
from tasks.metrics import masked_cross_entropy
from train.step import make_optimizer, make_train_step

BATCH, SEQ, TRAIN_ITERS = 8, 256, 8
# PyTorch eager, 2 threads, on the 2-core AMD EPYC machine of issue 15: seconds per call.
REFERENCE_S = {"train": 3.53, "forward8": 1.07, "forward32": 4.07}


def reference_config(**overrides):
  """The full trial config at the reference configuration; `overrides` apply to `model`."""
  c = get_config()
  c.model.update(d_model=256, n_heads=4, d_ff=869, mlp="swiglu", vocab_size=512, max_len=SEQ,
                 tie_embeddings=True, injection="concat", norm="sandwich", attention="full",
                 positions="rope", state_init="normal", n_prelude=2, block_size=4, n_coda=2,
                 dtype="float32", remat=False)
  c.model.update(overrides)
  c.train.update(steps=1000, recurrence="fixed", mean_recurrence=TRAIN_ITERS, backprop_depth=0)
  return c


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> float:
  """Median wall seconds of `fn()` (blocking on its result) after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int, *,
                on_round: Callable[[dict], None] | None = None, medians: bool = True) -> tuple[dict, dict]:
  """({name: wall seconds}, {name: minor page faults}) of each call, medians (or, without `medians`,
  the lists), every call once per round: `warmup` untimed rounds, then `repeats` timed ones (the
  machine's speed drifts within minutes, so each median covers the same stretch of time). `on_round`
  sees each round's seconds."""
  for _ in range(warmup):
    for call in calls.values():
      jax.block_until_ready(call())
  seconds, faults = {k: [] for k in calls}, {k: [] for k in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
      jax.block_until_ready(call())
      seconds[name].append(time.perf_counter() - t0)
      faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    if on_round:
      on_round({k: v[-1] for k, v in seconds.items()})
  if not medians:
    return seconds, faults
  median = lambda d: {k: float(np.median(v)) for k, v in d.items()}
  return median(seconds), median(faults)


def matmul_caller(rows: int, inner: int, cols: int) -> Callable[[], object]:
  """A jitted float32 [rows, inner] x [inner, cols] `jnp.dot`, compiled now, as a thunk."""
  a = jax.random.normal(jax.random.key(0), (rows, inner), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (inner, cols), jnp.float32)
  mm = jax.jit(jnp.dot).lower(a, b).compile()
  return lambda: mm(a, b)


def matmul_rate(n: int = 2048, repeats: int = 10, warmup: int = 3) -> float:
  """FLOP/s of a jitted n x n float32 matmul."""
  return 2 * n ** 3 / timed(matmul_caller(n, n, n), repeats, warmup)


def layer_matmuls(m, tokens: int = BATCH * SEQ) -> tuple[Callable[[], object], float]:
  """One transformer layer's dense matmuls at the model's own shapes ([tokens, d] x [d, d] four times,
  [tokens, d] x [d, f] for up and gate, [tokens, f] x [f, d] for down), each a jitted `jnp.dot`
  called alone, as one thunk and its FLOPs."""
  d, f = m.d_model, m.d_ff
  shapes = [(d, d)] * 4 + [(d, f)] * (2 if m.mlp == "swiglu" else 1) + [(f, d)]
  calls = [matmul_caller(tokens, k, n) for k, n in shapes]

  def call():
    for c in calls:
      jax.block_until_ready(c())

  return call, float(sum(2 * tokens * k * n for k, n in shapes))


def batch_of(vocab: int, batch: int = BATCH, seq: int = SEQ) -> dict:
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)
  return {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
          "mask": jnp.ones((batch, seq), jnp.float32)}


def train_caller(c, batch: dict, r: int = TRAIN_ITERS, *, static_n: bool = False,
                 optimizer: bool = True) -> Callable[[], object]:
  """One train step compiled now (as the trainer compiles it: traced n_iters, donated state) as a
  thunk. `static_n` passes r as a Python int (no per-iteration masking); `optimizer=False` stops at
  the gradients."""
  graphdef, params = init_model(c.model, 0)
  tx = make_optimizer(c.train)
  def grads_only(params, batch, n_iters):
    def loss_fn(p):
      out = nnx.merge(graphdef, p)(batch["inputs"], n_iters, max_iters=r)
      return masked_cross_entropy(out.logits_BSV, batch["targets"], batch["mask"])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return params, (loss, grads)

  if optimizer:
    step_fn = make_train_step(graphdef, tx, max_iters=r, backprop_depth=c.train.backprop_depth, seed=0)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  else:
    step_fn, state = grads_only, params
  if static_n:
    compiled = jax.jit(lambda s, b: step_fn(s, b, r), donate_argnums=(0,)).lower(state, batch).compile()
    run = lambda s: compiled(s, batch)
  else:
    n = jnp.int32(r)
    compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch, n).compile()
    run = lambda s: compiled(s, batch, n)
  box = [state]

  def call():
    box[0], metrics = run(box[0])
    return metrics

  call.compiled = compiled
  return call


def forward_caller(c, batch: dict, r: int) -> Callable[[], object]:
  """The forward pass (logits after r iterations), compiled now, as a thunk."""
  graphdef, params = init_model(c.model, 0)
  compiled = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, r).logits_BSV).lower(
      params, batch["inputs"]).compile()
  call = lambda: compiled(params, batch["inputs"])
  call.compiled = compiled
  return call


MATMUL = "matmul 2048²"


def main() -> None:
  args = parser(__doc__, "reference_speed", repeats=10, warmup=3).parse_args()
  c = reference_config()
  batch = batch_of(c.model.vocab_size)
  f8, f32 = forward_flops(c.model, BATCH, SEQ, 8), forward_flops(c.model, BATCH, SEQ, 32)
  t8 = train_flops(c.model, BATCH, SEQ, 8)
  xla = reference_config(attention_impl="xla")
  rows = [("train step, r = 8", "train", train_caller(c, batch), t8),
          ("train step, r = 8, loop not unrolled (`model.unroll=0`)", "train",
           train_caller(reference_config(unroll=0), batch), t8),
          ("train step, r = 8, `model.attention_impl=xla`", "train", train_caller(xla, batch), t8),
          ("forward, r = 8", "forward8", forward_caller(c, batch, 8), f8),
          ("forward, r = 8, `model.attention_impl=xla`", "forward8", forward_caller(xla, batch, 8), f8),
          ("forward, r = 32", "forward32", forward_caller(c, batch, 32), f32)]
  layer_call, layer_flops = layer_matmuls(c.model)
  calls = {MATMUL: matmul_caller(2048, 2048, 2048), "layer": layer_call,
           **{name: call for name, _, call, _ in rows}}
  medians = interleaved(calls, args.repeats, args.warmup)[0]
  rate, layer_rate = 2 * 2048 ** 3 / medians[MATMUL], layer_flops / medians["layer"]
  seconds = [medians[name] for name, *_ in rows]
  print(f"matmul 2048^2 fp32: {rate / 1e9:.0f} GFLOP/s; the layer's matmuls at their shapes: "
        f"{layer_rate / 1e9:.0f} GFLOP/s", flush=True)
  cells = [[name, f"{s:.3f}", f"{BATCH * SEQ / s:,.0f}", f"{flops / s / 1e9:.0f}", f"{flops / s / rate:.0%}",
            f"{REFERENCE_S[key]:.2f} ({BATCH * SEQ / REFERENCE_S[key]:,.0f})", f"{REFERENCE_S[key] / s:.2f}×"]
           for (name, key, _, flops), s in zip(rows, seconds)]
  tokens = BATCH * SEQ
  body = [f"## Reference configuration: (2, 4⊗8, 2), d = 256, swiglu 869, vocab 512, concat, sandwich, "
          f"float32, batch {BATCH} × {SEQ}", "",
          intro(command("bench.reference_speed", args, "repeats", "warmup"),
                f" (every program compiled first, then {args.warmup} warm-up calls each, then "
                f"{args.repeats} rounds that call each program, and the matmuls, once; medians).",
                args.note), "",
          f"fp32 matmul rate (jitted 2048² `jnp.dot`, in the same rounds): {rate / 1e9:.0f} GFLOP/s. "
          f"Model GFLOP/s count the matmul FLOPs (causal half of the attention scores, "
          f"`looped_models.flops`), the train step as 3× the forward's; % is of that matmul rate. The "
          f"layer's own matmuls at their shapes ([{tokens}, 256] × [256, 256] four times, [{tokens}, "
          f"256] × [256, 869] twice, [{tokens}, 869] × [869, 256]), each called alone: "
          f"{layer_rate / 1e9:.0f} GFLOP/s ({layer_rate / rate:.0%} of the 2048² rate).", "",
          *table(["program", "seconds", "tokens/s", "GFLOP/s", "% of matmul", "reference s (tokens/s)",
                  "speed vs reference"], cells), "",
          f"Unrolling the loop of 8 iterations (`model.unroll`, default 8: the backward pass keeps each "
          f"iteration's activations in place instead of copying them into and out of per-iteration "
          f"stacks) makes the train step {seconds[1] / seconds[0]:.2f}× faster in this run; CPU "
          f"attention through `blocked_attention` (`model.attention_impl=auto` on a CPU: einsums per "
          f"query block against only the keys it sees, heads-first) instead of "
          f"`jax.nn.dot_product_attention`'s XLA implementation, the train step "
          f"{seconds[2] / seconds[0]:.2f}× and the forward pass {seconds[4] / seconds[3]:.2f}× faster.", "",
          "Reference: the public Huginn PyTorch implementation, eager, 2 threads, measured on a 2-core "
          "AMD EPYC machine (issue 15); the ratio column only means something on that machine. "
          "Targets: train step ≥ 1.5× (≤ 2.35 s there, about 48% of its matmul rate), forward ≥ 2×."]
  record(args.section, body, args.dry_run)


if __name__ == "__main__":
  main()
