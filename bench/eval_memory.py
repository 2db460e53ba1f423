"""Device memory of the fixed-point evaluation (R = 128, streamed in chunks) against one forward pass
at the training iteration count, from XLA's compiled memory analysis (arguments + outputs + temps).

  python -m bench.eval_memory [--d_model 256] [--seq 64] [--batch 8] [--train_iters 8] [--R 128] [--chunk 4]
      [--dry-run]

The evaluation's device peak is one chunk call: the state, the chunk's per-layer states and attention
maps. The full trajectory is never on the device; the host keeps O(k·B·S·D) plus the small series.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bench.results import command, intro, parser, record, table
from configs.base import get_config
from eval.capture import Capture
from looped_models.model import init_model


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))


def main() -> None:
  args = parser(__doc__, "eval_memory", d_model=256, seq=64, batch=8, train_iters=8, R=128,
                chunk=4).parse_args()
  m = get_config().model
  m.update(d_model=args.d_model, n_heads=args.d_model // 64, d_ff=4 * args.d_model, n_prelude=2,
           block_size=4, n_coda=2, max_len=args.seq, vocab_size=256, attention="full")
  graphdef, params = init_model(m, 0)
  tokens = jnp.zeros((args.batch, args.seq), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones(tokens.shape, jnp.float32)}

  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, args.train_iters).logits_BSV)
  fwd_bytes = peak_bytes(forward.lower(params, tokens).compile())

  st = Capture(graphdef, params, chunk=args.chunk).stepper
  s, e = st._begin(params, st.keys, tokens)
  chunk_bytes = peak_bytes(st._advance.lower(params, s, e, batch, n=args.chunk, at=None, layers=True,
                                             attention=True).compile())
  full = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, args.R, return_states=True,
                                                     return_attention=True))
  full_bytes = peak_bytes(full.lower(params, tokens).compile())
  B, S, D, k, H = args.batch, args.seq, args.d_model, 4, m.n_heads
  host = 4 * (3 * k * B * S * D + 8 * B * S * D) + 4 * args.R * k * 2 * H * S * S
  mib = lambda b: f"{b / 2**20:.1f} MiB"
  lines = [f"## Fixed-point evaluation memory: R = {args.R} vs one forward pass at r = {args.train_iters}",
           "", intro(command("bench.eval_memory", args, "d_model", "seq", "batch", "train_iters", "R",
                             "chunk"),
                     "; (2, 4⊗r, 2), XLA compiled memory (arguments + outputs + temporaries).", args.note),
           "", *table(["program", "device bytes", "vs forward"], [
               [f"forward, r = {args.train_iters}", mib(fwd_bytes), "1.00"],
               [f"evaluation chunk ({args.chunk} iterations, states + attention), R = {args.R} streamed",
                mib(chunk_bytes), f"{chunk_bytes / fwd_bytes:.2f}"],
               [f"(for contrast) all R = {args.R} states + attention at once", mib(full_bytes),
                f"{full_bytes / fwd_bytes:.2f}"]]), "",
           f"Host memory of the streaming analysis (previous/final states, lag ring, attention maps of "
           f"2 sequences for the similarity map): about {mib(host)}.",
           "Target: the evaluation needs at most 2x the forward pass's peak."]
  record(args.section, lines, args.dry_run)


if __name__ == "__main__":
  main()
