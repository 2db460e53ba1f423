"""Does depth pay, and does per-token exit turn it into decode speed? On a run trained on a corpus
with classes (tasks/reasoning.py), the whole comparison behind `python -m bench.depth`:

1. answer accuracy at every fixed iteration count 1..R on held-out problems (eval/classes.py), and
   R_small, the fewest iterations within 1 point of the best;
2. decoding through the KV cache (looped_models/generate.py, teacher forced: every token of a
   held-out window is fed as it is and its logits kept), so that every token has its class: at
   fixed R_small, and with each exit criterion over its threshold grid;
3. thresholds chosen on a calibration half of the windows (the fewest mean iterations whose answer
   accuracy stays within `tolerance` points of fixed R_small's on that half), reported on the other
   half; the adaptive setting is the criterion whose chosen threshold uses the fewest iterations on
   the calibration half (nothing is chosen on the held-out half);
4. decode tokens/s of fixed R_small and of the adaptive setting at each batch size (sequences in
   flight), same cache kind, same windows; mean iterations per token by class and step count.

Windows: the held-out problem windows of eval/classes.py (each starts where a question starts),
`windows` of them, and `prose` windows of held-out prose; each is decoded from its first token
(the prompt) with the rest forced, so decode position j predicts window token j + 1. Answer
accuracy: an answer is right when the argmax of each of its tokens' logits is the token; the
accuracy is the mean over step counts (eval.classes.answer_accuracy).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from eval.classes import (Windows, answer_accuracy, evaluate_splits, joined, problem_windows,
                          prose_windows, question_starts)
from eval.halting_rows import DEFAULT_GRIDS
from looped_models.generate import Generator
from looped_models.halting import LOOP_CRITERIA
from tasks.reasoning import ANSWER, PROBLEM, PROSE

TOLERANCE_POINTS = 1.0
HALVES = ("calibration", "held_out")


def decode_windows(run: Any, data: Any, split: str, count: int, prose: int) -> tuple[Windows, int]:
  """(windows, how many of them are problem windows): the first `count` problem windows of
  `split`, then its first `prose` windows (of consecutive ones from its start) that are at least
  90% prose."""
  length = int(run.cfg.task.train_length)
  bos, newline = question_starts(data)
  shards = list(zip(data.maps[split], data.classes(split)))
  problems = joined([problem_windows(t, c, length, bos, newline) for t, c in shards], length)
  n = min(count, len(problems.tokens))
  problems = Windows(problems.tokens[:n], problems.classes[:n],
                     [a for a in problems.answers if a[0] < n])
  text = joined([prose_windows(t, c, length, len(t)) for t, c in shards], length)  # every one
  keep = [i for i in range(len(text.tokens)) if (text.classes[i, 1:] == PROSE).mean() > 0.9][:prose]
  return joined([problems, Windows(text.tokens[keep], text.classes[keep], [])], length), n


def half(w: Windows, n_problem: int, which: str) -> Windows:
  """The calibration (first) or held-out (second) half of the problem windows and of the prose
  windows, answers renumbered."""
  n = len(w.tokens)
  parts = [range(0, n_problem), range(n_problem, n)]
  pick = [i for r in parts for i in (r[:len(r) // 2] if which == "calibration" else r[len(r) // 2:])]
  index = {old: new for new, old in enumerate(pick)}
  return Windows(w.tokens[pick], w.classes[pick],
                 [(index[i], a, b, h) for i, a, b, h in w.answers if i in index])


def decode(gen: Generator, w: Windows, *, iterations: int, exit: tuple[str, float] | None,
           slots: int, cache: str = "exact", oracle: bool = False) -> dict[str, Any]:
  """Teacher-forced decoding of every window from its first token; its answer accuracy, mean
  iterations per token (all and by class), tokens/s and FLOPs; with `oracle`, the oracle's mean
  iterations too (it decodes every iteration: not for timing)."""
  prompts = [row[:1].tolist() for row in w.tokens]
  forced = [row[1:].tolist() for row in w.tokens]
  out = gen(prompts, max_new=len(forced[0]), iterations=iterations, exit=exit, cache=cache,
            slots=slots, forced=forced, return_logits=True, track_oracle=oracle)
  logits = np.stack(out.logits)  # [N, L, V]: position j predicts window token j + 1
  correct = (logits.argmax(-1) == w.tokens[:, 1:])[None]
  its = np.stack(out.iterations).astype(np.float64)  # [N, L]
  rec = {"answer_accuracy": answer_accuracy(w, correct)["all"][0],
         "token_accuracy": float(100.0 * correct.mean()),
         "mean_iterations": float(its.mean()), "tokens_per_s": out.stats["decode_tokens_per_s"],
         "flops": out.stats.get("flops_executed"), "by_class": by_class(w, its)}
  if out.oracle is not None:
    rec["oracle_mean_iterations"] = float(np.stack(out.oracle).mean())
  return rec


def by_class(w: Windows, its_NL: np.ndarray) -> dict[str, float]:
  """Mean iterations of the tokens predicted, per class: prose, problem, and answers per step count."""
  target = w.classes[:, 1:]
  out = {"prose": its_NL[target == PROSE], "problem": its_NL[target == PROBLEM]}
  for h in sorted(set(int(c) - ANSWER for c in np.unique(target) if c >= ANSWER)):
    out[f"answer_{h}"] = its_NL[target == ANSWER + h]
  return {k: float(v.mean()) for k, v in out.items() if v.size}


def choose(rows: list[dict], floor: float) -> dict | None:
  """The row with the fewest mean iterations whose accuracy is at least `floor` (None: none is)."""
  ok = [r for r in rows if r["answer_accuracy"] >= floor]
  return min(ok, key=lambda r: r["mean_iterations"]) if ok else None


def compare(run: Any, data: Any, *, split: str = "val", windows: int = 256, prose: int = 32,
            iterations: int = 16, batch_sizes: Sequence[int] = (1, 8), grids: dict | None = None,
            tolerance: float = TOLERANCE_POINTS, cache: str = "exact",
            extra_splits: Sequence[str] = ("extrapolate",)) -> dict[str, Any]:
  """The whole comparison (see the module docstring) as one JSON-able record."""
  grids = grids or DEFAULT_GRIDS
  accuracy = evaluate_splits(run, data, splits=(split, *[s for s in extra_splits if s in data.maps]),
                             iterations=iterations)
  r_small = accuracy["r_small"]
  w, n_problem = decode_windows(run, data, split, windows, prose)
  halves = {k: half(w, n_problem, k) for k in HALVES}
  gen = Generator(run.model(), run.mesh)
  wide = max(batch_sizes)
  fixed = {k: decode(gen, halves[k], iterations=r_small, exit=None, slots=wide, cache=cache)
           for k in HALVES}
  criteria: dict[str, Any] = {}
  for criterion in LOOP_CRITERIA:
    if criterion not in grids:
      continue
    rows = [{"threshold": float(t), **decode(gen, halves["calibration"], iterations=iterations,
                                            exit=(criterion, float(t)), slots=wide, cache=cache)}
            for t in grids[criterion]]
    best = choose(rows, fixed["calibration"]["answer_accuracy"] - tolerance)
    held = best and decode(gen, halves["held_out"], iterations=iterations,
                           exit=(criterion, best["threshold"]), slots=wide, cache=cache)
    criteria[criterion] = {"grid": rows, "threshold": best and best["threshold"],
                           "calibration": best, "held_out": held}
  chosen = [c for c in criteria if criteria[c]["threshold"] is not None]
  pick = min(chosen, key=lambda c: criteria[c]["calibration"]["mean_iterations"]) if chosen else None
  speed_fixed, speed_adaptive = {}, {}
  for b in batch_sizes:
    speed_fixed[str(b)] = (fixed["held_out"]["tokens_per_s"] if b == wide else decode(
        gen, halves["held_out"], iterations=r_small, exit=None, slots=b, cache=cache)["tokens_per_s"])
    if pick:
      exit = (pick, criteria[pick]["threshold"])
      speed_adaptive[str(b)] = (criteria[pick]["held_out"]["tokens_per_s"] if b == wide else decode(
          gen, halves["held_out"], iterations=iterations, exit=exit, slots=b,
          cache=cache)["tokens_per_s"])
  held_fixed = fixed["held_out"]
  oracle = decode(gen, halves["held_out"], iterations=r_small, exit=None, slots=wide, cache=cache,
                  oracle=True)
  adaptive = None if pick is None else {
      "criterion": pick, "threshold": criteria[pick]["threshold"],
      "answer_accuracy": criteria[pick]["held_out"]["answer_accuracy"],
      "mean_iterations": criteria[pick]["held_out"]["mean_iterations"],
      "tokens_per_s": speed_adaptive, "by_class": criteria[pick]["held_out"]["by_class"],
      "flops": criteria[pick]["held_out"]["flops"]}
  return {"r_small": r_small, "iterations": iterations, "cache": cache, "tolerance_points": tolerance,
          "windows": {"problem": n_problem, "prose": len(w.tokens) - n_problem, "split": split},
          "accuracy_by_iterations": accuracy,
          "fixed": {"answer_accuracy": held_fixed["answer_accuracy"], "tokens_per_s": speed_fixed,
                    "mean_iterations": held_fixed["mean_iterations"], "flops": held_fixed["flops"],
                    "by_class": held_fixed["by_class"],
                    "oracle_mean_iterations": oracle["oracle_mean_iterations"],
                    "calibration": fixed["calibration"]},
          "adaptive": adaptive, "criteria": criteria}
