"""Generation on a trained text run: quality of per-token exit against fixed R, and decode speed.

  python -m bench.generate --workdir runs/shakespeare [--windows 32] [--new 240]
  python -m bench.generate --speed-only --r-small 2 --threshold 0.3 --section generate_gpu  # a GPU

Quality (held-out text, teacher-forced: every position decoded as generation computes it, with the
KV cache, each token exiting by the criterion):
- windows of the run's validation split, its first half for calibration, its second for reporting;
- fixed R = 1..R_cap by the full forward (which the exact cache reproduces): R_best, the lowest loss,
  and R_small, the smallest R within 1% of it, both chosen on the calibration half;
- per criterion, the largest threshold whose calibration loss is within 1% of R_small's (cap R_cap),
  then its held-out loss, mean iterations per token and the oracle's (the first iteration after which
  the greedy prediction no longer changes, from a fixed-R_cap decode);
- agreement of greedy generations with fixed R_small (share of identical tokens, 4 prompts x 64);
- the `latest` cache against `exact` at fixed R (held-out loss).
Speed: decode tokens/s at batch 1 and 8 for R in {4, 16, 32}: fixed R with each cache, adaptive exit
(the chosen fixed_point threshold, cap R), and recompute (no cache: one full forward of the whole
buffer per token, compiled once), generating `--new` tokens after a 16-token prompt. Writes its
section of bench/RESULTS.md (`--section`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.results import machine, parser, record, table
from looped_models.generate import Generator, cache_bytes
from looped_models.model import abstract_model
from rundir.run import open_run
from tasks.text import TextData

CRITERIA_GRIDS = {"fixed_point": (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3), "kl": (1e-1, 3e-2, 1e-2, 1e-3, 1e-4),
                  "entropy": (1.0, 3e-1, 1e-1, 1e-2, 1e-3)}


def windows(data, n: int, length: int, half: int, seed: int = 0) -> np.ndarray:
  """n windows of length + 1 tokens from one half (0: calibration, 1: held out) of the val split."""
  ids = np.concatenate([np.asarray(a) for a in data.maps["val"]]).astype(np.int32)
  part = ids[:len(ids) // 2] if half == 0 else ids[len(ids) // 2:]
  starts = np.random.default_rng(seed).integers(0, len(part) - length - 1, n)
  return np.stack([part[s:s + length + 1] for s in starts])


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
  logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  return float(-jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1).mean())


def forced_loss(gen, win: np.ndarray, **options) -> tuple[float, float, Any]:
  """Teacher-forced loss of the windows decoded token by token: (nats/token, mean iterations, out)."""
  prompts, targets = [[int(w[0])] for w in win], win[:, 1:]
  out = gen(prompts, max_new=targets.shape[1], forced=[t.tolist() for t in targets],
            return_logits=True, slots=len(win), **options)
  return nll(np.stack(out.logits), targets), out.stats["mean_iterations"], out


def timed(gen, prompts, repeats: int = 3, **options) -> dict:
  """The stats of the run with the median decode tokens/s of `repeats` identical runs (compiled once)."""
  runs = sorted((gen(prompts, **options).stats for _ in range(repeats)),
                key=lambda s: s["decode_tokens_per_s"])
  return runs[len(runs) // 2]


def recompute_tokens_per_s(model, prompt: list[int], R: int, batch: int, length: int, n: int) -> float:
  """Greedy decoding without a cache: each token one full forward over a fixed `length` buffer."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def step(params, buf_BT, pos):
    logits = nnx.merge(graphdef, params)(buf_BT, R).logits_BSV
    tok = logits[:, pos - 1].argmax(-1).astype(jnp.int32)
    return buf_BT.at[:, pos].set(tok)

  buf = jnp.zeros((batch, length), jnp.int32).at[:, :len(prompt)].set(jnp.asarray(prompt))
  # compile for the buffer made here and for step's own output, whose sharding differs (else the
  # first timed call compiles again and the compile is counted as decoding)
  jax.block_until_ready(step(params, step(params, buf, len(prompt)), len(prompt)))
  t0 = time.perf_counter()
  for i in range(n):
    buf = step(params, buf, len(prompt) + i)
  jax.block_until_ready(buf)
  return batch * n / (time.perf_counter() - t0)


def quality(args, model, gen, calib: np.ndarray, held: np.ndarray, L: int) -> tuple[list[str], int, dict]:
  """The quality study (fixed R, per-token exit on calibration then held out, the oracle, the
  caches, greedy agreement): its lines, R_small and the chosen threshold per criterion."""
  fixed = {}
  for R in range(1, args.cap + 1):
    fixed[R] = [nll(np.asarray(model(jnp.asarray(w[:, :-1]), R).logits_BSV), w[:, 1:]) for w in (calib, held)]
  best = min(fixed, key=lambda r: fixed[r][0])
  small = min(r for r in fixed if fixed[r][0] <= 1.01 * fixed[best][0])
  lines = [f"Teacher-forced next-token loss (nats/token) on {args.windows} windows of {L} tokens from "
           "each half of the validation split (calibration | held out).", "",
           *table(["fixed R", "calibration", "held out"],
                  [[r, f"{fixed[r][0]:.4f}", f"{fixed[r][1]:.4f}"] for r in fixed])]
  lines += ["", f"R_best = {best} (calibration), R_small = {small}: the smallest R within 1% of it.", ""]

  _, _, oracle_run = forced_loss(gen, held, iterations=args.cap, track_oracle=True)
  oracle_mean = float(np.concatenate(oracle_run.oracle).mean())
  target = 1.01 * fixed[small][0]
  lines += [f"Per-token exit, cap R = {args.cap}, exact cache; threshold: the largest whose calibration "
            f"loss is within 1% of fixed R_small's ({target:.4f}).", "",
            *table(["criterion", "threshold", "calibration loss", "held-out loss", "held out vs R_small",
                    "mean iterations (held out)"], [])]
  chosen = {}
  for criterion, grid in CRITERIA_GRIDS.items():
    for thr in grid:  # largest first
      loss, _, _ = forced_loss(gen, calib, iterations=args.cap, exit=(criterion, thr))
      if loss <= target:
        chosen[criterion] = thr
        h_loss, h_it, _ = forced_loss(gen, held, iterations=args.cap, exit=(criterion, thr))
        lines.append(f"| {criterion} | {thr:g} | {loss:.4f} | {h_loss:.4f} | "
                     f"{h_loss / fixed[small][1] - 1:+.2%} | {h_it:.2f} |")
        break
    else:
      lines.append(f"| {criterion} | none in {grid} | | | | |")
  print("\n".join(lines), flush=True)
  lines += ["", f"Oracle (decoding setting, fixed R = {args.cap}): mean {oracle_mean:.2f} iterations per "
            "token (first iteration after which the greedy prediction no longer changes).", ""]

  lines += table(["cache", "R", "held-out loss"], [])
  for R in (2, 4, args.cap):
    for cache in ("exact", "latest"):
      loss, _, _ = forced_loss(gen, held, iterations=R, cache=cache)
      lines.append(f"| {cache} | {R} | {loss:.4f} |")

  prompts = [[int(t) for t in w[:16]] for w in held[:4]]
  ref = gen(prompts, max_new=64, iterations=small)
  thr = chosen.get("fixed_point")
  if thr is not None:
    ada = gen(prompts, max_new=64, iterations=args.cap, exit=("fixed_point", thr))
    same = np.mean(np.concatenate([a == b for a, b in zip(ada.tokens, ref.tokens)]))
    lines += ["", f"Greedy agreement, fixed_point {thr:g} (cap {args.cap}) vs fixed R_small = {small}: "
              f"{same:.1%} of 256 generated tokens identical; mean iterations {ada.stats['mean_iterations']:.2f}."]

  return lines, small, chosen


def main() -> None:
  p = parser(__doc__, "generate", note=False, workdir="runs/shakespeare",
             windows=(32, "validation windows per half (calibration, held out); 8 proved too few to "
                      "choose R_small and the thresholds reliably (bench/RESULTS.md)"),
             cap=(16, "R_cap of the quality study"), new=240,
             threshold=(0.3, "the fixed_point threshold"))
  p.add_argument("--recompute-tokens", type=int, default=32)
  p.add_argument("--speed-only", action="store_true",
                 help="only the decode speed tables, with --r-small and --threshold as given (e.g. "
                 "what a CPU run of the quality study chose): for a GPU's short lease")
  p.add_argument("--r-small", type=int, default=2)
  args = p.parse_args()

  run = open_run(args.workdir)
  model, m = run.model(), run.cfg.model
  context = 16 + args.new
  if context > m.max_len:  # a RoPE model's parameters do not depend on max_len
    longer = run.cfg.model.copy_and_resolve_references()
    longer.max_len = context
    model = nnx.merge(abstract_model(longer, 0)[0], nnx.state(model))
    m = model.spec
  data = TextData(run.cfg.task.path)
  L = min(m.max_len, run.cfg.task.train_length)
  calib, held = windows(data, args.windows, L, 0), windows(data, args.windows, L, 1)
  gen = Generator(model)

  lines = [f"Run `{args.workdir}` (step {run.step}), machine: {machine()}.", ""]
  if args.speed_only:
    small, chosen = args.r_small, {"fixed_point": args.threshold}
    lines += [f"Speed only: R_small = {small} and fixed_point {args.threshold:g}, as given.", ""]
  else:
    study, small, chosen = quality(args, model, gen, calib, held, L)
    lines += study
  thr = chosen.get("fixed_point")
  lines += ["", f"Target: adaptive exit (cap {args.cap}, `latest` cache) against fixed R_small = {small}, "
            f"decode tokens/s of {args.new} greedy tokens after a 16-token prompt.", "",
            *table(["batch", "fixed R_small", "criterion", "adaptive", "ratio", "mean iterations"], [])]
  for batch in (1, 8):
    ps = [[int(t) for t in w[:16]] for w in (held[np.arange(batch) % len(held)])]
    opts = dict(max_new=args.new, slots=batch, context=16 + args.new, cache="latest")
    base = timed(gen, ps, iterations=small, **opts)["decode_tokens_per_s"]
    for criterion, thr_c in chosen.items():
      ad = timed(gen, ps, iterations=args.cap, exit=(criterion, thr_c), **opts)
      lines.append(f"| {batch} | {base:.0f} | {criterion} {thr_c:g} | {ad['decode_tokens_per_s']:.0f} | "
                   f"{ad['decode_tokens_per_s'] / base:.2f} | {ad['mean_iterations']:.2f} |")
      print(lines[-1], flush=True)

  lines += ["", f"Decode speed: {args.new} greedy tokens after a 16-token prompt (context "
            f"{16 + args.new}), tokens/s of the decode loop (compile and prefill excluded; median of 3 "
            "runs). Recompute: "
            f"one full forward of the {16 + args.new}-token buffer per token (measured over "
            f"{args.recompute_tokens} tokens). Adaptive: fixed_point {thr} with cap R.", "",
            *table(["batch", "R", "exact", "latest", "adaptive", "recompute", "exact cache MiB",
                    "latest cache MiB", "adaptive mean iterations", "adaptive block FLOPs executed / fixed"],
                   [])]
  for batch in (1, 8):
    ps = [[int(t) for t in w[:16]] for w in (held[np.arange(batch) % len(held)])]
    for R in (4, 16, 32):
      opts = dict(max_new=args.new, iterations=R, slots=batch, context=context)
      ex, la = timed(gen, ps, cache="exact", **opts), timed(gen, ps, cache="latest", **opts)
      ad = timed(gen, ps, cache="latest", exit=("fixed_point", thr), **opts) if thr is not None else None
      rc = recompute_tokens_per_s(model, ps[0], R, batch, context, args.recompute_tokens)
      mib = lambda c: cache_bytes(m, batch, context, R, c, m.dtype) / 2 ** 20
      lines.append(
          f"| {batch} | {R} | {ex['decode_tokens_per_s']:.0f} | {la['decode_tokens_per_s']:.0f}"
          f" | {ad['decode_tokens_per_s'] if ad else float('nan'):.0f} | {rc:.1f} | {mib('exact'):.1f}"
          f" | {mib('latest'):.1f} | {ad['mean_iterations'] if ad else float('nan'):.2f} | "
          f"{ad['block_flops_executed'] / la['block_flops_executed'] if ad else float('nan'):.2f} |")
      print(lines[-1], flush=True)
  where = "" if args.section == "generate" else f" ({jax.devices()[0].device_kind})"
  record(args.section, [f"## Generation: per-token exit and decode speed{where} (`python -m bench.generate`)",
                        "", *lines], args.dry_run)


if __name__ == "__main__":
  main()
