"""Where the train step's time goes at the reference configuration, and what each change bought:
variants of the same programs compiled in one process and timed in interleaved rounds, so a shared,
loaded machine slows them alike and the ratios stay meaningful.

  python -m bench.speed_ablations [--rounds 5] [--note "..."] [--section speed_ablations] [--dry-run]

Variants (the model of `bench.reference_speed`, r = 8):
- `before`: attention as einsum + float32 softmax written out in every layer, projections as matmuls
  over [B, S, D] (the code before `jax.nn.dot_product_attention` and `layers.dense`);
- `+ dot_product_attention`: attention through `jax.nn.dot_product_attention` (XLA on CPU);
- `+ 2-D projections` (the code as it is): every projection a [B·S, D] matmul (`layers.dense`);
- ablations of the code as it is: the number of iterations static (no per-iteration `lax.cond`
  masking), the gradients without the AdamW update, injection `add` instead of the concat adapter.
"""

from __future__ import annotations

import contextlib

from bench.reference_speed import (BATCH, SEQ, batch_of, forward_caller, interleaved, matmul_rate,
                                   reference_config, train_caller)
from bench.results import command, intro, parser, record, table
from looped_models import injection, layers
from looped_models.flops import forward_flops, train_flops


@contextlib.contextmanager
def patched(*, explicit_attention: bool = False, flat: bool = True):
  """Trace the model as the code before the change: attention's explicit probabilities path, and/or
  projections applied to [B, S, D] directly."""
  call, dense = layers.Attention.__call__, layers.dense
  if explicit_attention:
    layers.Attention.__call__ = lambda self, x, ctx, weights=False, **kw: (
        call(self, x, ctx, weights=True, **kw) if weights
        else (call(self, x, ctx, weights=True, **kw)[0], None))
  if not flat:
    layers.dense = injection.dense = lambda lin, x: lin(x)
  try:
    yield
  finally:
    layers.Attention.__call__, layers.dense, injection.dense = call, dense, dense


def main() -> None:
  args = parser(__doc__, "speed_ablations", rounds=5).parse_args()
  c = reference_config()
  batch = batch_of(c.model.vocab_size)
  before = dict(explicit_attention=True, flat=False)
  train_variants = [("before", before, {}, c),
                    ("+ dot_product_attention", dict(flat=False), {}, c),
                    ("+ 2-D projections (as is)", {}, {}, c),
                    ("as is, static n (no lax.cond)", {}, dict(static_n=True), c),
                    ("as is, gradients only (no AdamW)", {}, dict(optimizer=False), c),
                    ("as is, injection add (no adapter)", {}, {}, reference_config(injection="add"))]
  calls = {}
  for name, patch, kw, cfg in train_variants:
    with patched(**patch):
      calls["train: " + name] = train_caller(cfg, batch, **kw)
  for name, patch in (("before", before), ("as is", {})):
    with patched(**patch):
      calls["forward r = 8: " + name] = forward_caller(c, batch, 8)
  rate = matmul_rate(repeats=5, warmup=2)
  times, faults = interleaved(calls, args.rounds, 1, on_round=lambda t: print(
      {k: round(v, 3) for k, v in t.items()}, flush=True))
  flops = {"train": train_flops(c.model, BATCH, SEQ, 8),
           "forward r = 8": forward_flops(c.model, BATCH, SEQ, 8)}
  cells = []
  for name, call in calls.items():
    prog = name.split(":")[0]
    s, base = times[name], times[f"{prog}: before"]
    temp = call.compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
    cells.append([name, f"{s:.3f}", f"{BATCH * SEQ / s:,.0f}", f"{flops[prog] / s / rate:.0%}",
                  f"{base / s:.2f}×", f"{temp:,.0f}", f"{faults[name] / 1e3:,.0f}k"])
  body = [f"## Speed ablations at the reference configuration (r = 8, batch {BATCH} × {SEQ}, float32)",
          "", intro(command("bench.speed_ablations", args, "rounds"),
                    f": every program compiled in one process, then timed in {args.rounds} interleaved "
                    f"rounds after a warm-up (medians).", args.note), "",
          f"fp32 matmul rate in the same run: {rate / 1e9:.0f} GFLOP/s (the % column; train = 3× the "
          f"forward's matmul FLOPs, also for the ablations that skip work). Temp: XLA's temporary "
          f"buffer; faults: minor page faults per call (XLA's CPU runtime maps its temporaries afresh "
          f"each call).", "",
          *table(["program: variant", "seconds", "tokens/s", "% of matmul", "speed vs before",
                  "temp MiB", "page faults"], cells)]
  record(args.section, body, args.dry_run)


if __name__ == "__main__":
  main()
