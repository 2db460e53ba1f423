"""Figures by token class on a corpus with classes (tasks/reasoning.py): answer accuracy per step
count and the loss of prose, problem text and answers, at every iteration count from 1 to R.

  python -m eval classes --workdir RUN [--data DIR] [--iterations R] [--splits val,extrapolate]

Problem windows: every problem of a split is scored once, in a window of the run's training length
that starts where its question starts (the newline or BOS before it; at a shard's end, the window
ends with the shard) and holds as many whole problems after it as fit; the window is real text of
the split, as training saw it. An answer is
right at R iterations when every one of its tokens is the argmax prediction (teacher forced) after
R iterations. Prose windows: consecutive windows of the split from its start (at most
`prose_windows`), whose prose tokens (class 0) give the prose loss. One pass of R iterations per
batch reads every count from 1 to R (looped_models/stepper.py), so R = 32 costs one pass of 32.

`r_small` is the smallest adequate fixed R: the fewest iterations whose answer accuracy on the
first split (val) is within 1 point of the best.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from eval import plots
from eval.driver import open_evaluation
from looped_models.stepper import Stepper
from rundir.run import load_run_config
from tasks.reasoning import ANSWER, PROBLEM, PROSE
from tasks.text import TextData

ADEQUATE_POINTS = 1.0  # r_small: the fewest iterations within this many points of the best
RECORD = "classes.json"


@dataclasses.dataclass
class Windows:
  """Windows of one split: tokens [N, L + 1] (inputs and targets), classes [N, L + 1], and the
  answers scored in them: (window, first target position, last target position, step count)."""

  tokens: np.ndarray
  classes: np.ndarray
  answers: list[tuple[int, int, int, int]]


def _answer_runs(classes: np.ndarray) -> Iterator[tuple[int, int, int]]:
  """(start, end, class) of every run of answer tokens (consecutive tokens of one answer class)."""
  is_answer = classes >= ANSWER
  edges = np.flatnonzero(np.diff(np.concatenate([[0], is_answer.view(np.int8), [0]])))
  for start, end in zip(edges[::2], edges[1::2]):
    yield int(start), int(end), int(classes[start])


def problem_windows(tokens: np.ndarray, classes: np.ndarray, length: int, bos: int, newline: int,
                    limit: int = 0) -> Windows:
  """Windows of `length` + 1 tokens over one shard in which every answer whose question and answer
  fit (see the module docstring) is scored once; at most `limit` answers (0: all)."""
  rows, class_rows, answers = [], [], []
  cursor = 0  # the first answer not yet scored starts at or after this token
  runs = list(_answer_runs(classes))
  i = 0
  while i < len(runs) and (not limit or len(answers) < limit):
    start, end, _ = runs[i]
    if start < cursor:
      i += 1
      continue
    q = start - 1  # the question starts after the newline or BOS before it
    while q > 0 and classes[q] != PROSE and tokens[q] not in (bos, newline):
      q -= 1
    at = min(q, len(tokens) - length - 1)  # at the shard's end, the window ends with the shard
    if end - q > length or at < 0:
      cursor, i = end, i + 1  # a question too long for the window (or a shard shorter than one)
      continue
    w = len(rows)
    rows.append(np.asarray(tokens[at:at + length + 1], np.int32))
    class_rows.append(np.asarray(classes[at:at + length + 1], np.uint8))
    while i < len(runs) and runs[i][1] <= at + length + 1 and (not limit or len(answers) < limit):
      s, e, c = runs[i]  # targets are tokens 1..L of the window: target position = token - 1
      answers.append((w, s - at - 1, e - at - 2, c - ANSWER))
      cursor, i = e, i + 1
  return Windows(np.stack(rows) if rows else np.zeros((0, length + 1), np.int32),
                 np.stack(class_rows) if class_rows else np.zeros((0, length + 1), np.uint8),
                 answers)


def joined(parts: list[Windows], length: int) -> Windows:
  """The windows of several shards as one set (answer window indices shifted)."""
  tokens = [w.tokens for w in parts if len(w.tokens)]
  answers, offset = [], 0
  for w in parts:
    answers += [(i + offset, a, b, h) for i, a, b, h in w.answers]
    offset += len(w.tokens)
  return Windows(np.concatenate(tokens) if tokens else np.zeros((0, length + 1), np.int32),
                 np.concatenate([w.classes for w in parts if len(w.tokens)]) if tokens
                 else np.zeros((0, length + 1), np.uint8), answers)


def prose_windows(tokens: np.ndarray, classes: np.ndarray, length: int, count: int) -> Windows:
  """Up to `count` consecutive windows from the start of the shard (their prose is scored)."""
  n = min(count, (len(tokens) - 1) // length)
  idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None]
  return Windows(np.asarray(tokens[idx], np.int32), np.asarray(classes[idx], np.uint8), [])


def question_starts(data: Any) -> tuple[int, int]:
  """The token ids a question starts after: (BOS, newline) of the corpus's tokenizer."""
  return int(data.meta["tokenizer"]["bos_id"]), int(data.tokenizer().encode_batch(["\n"])[0][-1])


def _read(model: Any, s_BSD: jax.Array, ctx: Any, batch: dict) -> dict:
  logits_BSV = model.decode(s_BSD, ctx).astype(jnp.float32)
  logp_BSV = jax.nn.log_softmax(logits_BSV, -1)
  nll_BS = -jnp.take_along_axis(logp_BSV, batch["targets"][..., None], -1)[..., 0]
  return {"correct": logits_BSV.argmax(-1) == batch["targets"], "nll": nll_BS}


def score(stepper: Stepper, windows: Windows, iterations: int, batch_size: int) -> dict:
  """Per iteration 1..R: correct [R, N, L] (bool) and nll [R, N, L] of every window's targets."""
  parts: dict[str, list[np.ndarray]] = {"correct": [], "nll": []}
  n = len(windows.tokens)
  if n == 0:
    L = windows.tokens.shape[1] - 1
    return {"correct": np.zeros((iterations, 0, L), bool), "nll": np.zeros((iterations, 0, L))}
  for b in range(0, n, batch_size):
    rows = windows.tokens[b:b + batch_size]
    pad = batch_size - len(rows)  # one batch shape: one compile
    rows = np.concatenate([rows, np.repeat(rows[-1:], pad, 0)]) if pad else rows
    out = stepper.reads({"inputs": rows[:, :-1], "targets": rows[:, 1:]}, iterations)
    for k in parts:
      parts[k].append(out[k][:, :batch_size - pad])
  return {k: np.concatenate(v, 1) for k, v in parts.items()}


def answer_accuracy(windows: Windows, correct_RNL: np.ndarray) -> dict[str, Any]:
  """Accuracy (%) at every iteration count per step count, and `all`: their mean, each step count
  weighing alike (however many one-step lookups a problem asks back)."""
  by_hops: dict[int, list[np.ndarray]] = {}
  for w, first, last, hops in windows.answers:
    by_hops.setdefault(hops, []).append(correct_RNL[:, w, first:last + 1].all(-1))
  per = {h: np.stack(v, 1) for h, v in sorted(by_hops.items())}  # [R, answers]
  pct = lambda x: [float(v) for v in 100.0 * x.mean(1)]
  by_steps = {str(h): pct(v) for h, v in per.items()}
  macro = np.mean(list(by_steps.values()), 0) if per else []
  return {"all": [float(v) for v in macro], "by_steps": by_steps,
          "answers": {str(h): int(v.shape[1]) for h, v in per.items()}}


def class_loss(windows: Windows, nll_RNL: np.ndarray, which: str) -> list[float]:
  """Mean loss (nats per token) of the targets of one class group at every iteration count."""
  targets = windows.classes[:, 1:]
  mask = {"prose": targets == PROSE, "problem": targets == PROBLEM, "answer": targets >= ANSWER}[which]
  if not mask.any():
    return []
  return [float(v) for v in (nll_RNL * mask).sum((1, 2)) / mask.sum()]


def r_small(accuracy: list[float], points: float = ADEQUATE_POINTS) -> int | None:
  """The fewest iterations whose accuracy is within `points` of the best (None without answers)."""
  if not accuracy:
    return None
  best = max(accuracy)
  return next(r for r, a in enumerate(accuracy, 1) if a >= best - points)


def evaluate_splits(run: Any, data: Any, *, splits: tuple[str, ...] = ("val", "extrapolate"),
                    iterations: int = 16, batch_size: int = 64, answers: int = 0,
                    prose_windows_count: int = 64, chunk: int = 4) -> dict[str, Any]:
  """The by-class figures of `run` (rundir.run.Run) on `data` (tasks.text.TextData with classes) at
  every iteration count 1..`iterations`: per split, answer accuracy (all, per step count), the loss of
  each class group; `r_small` from the first split's answers."""
  length = int(run.cfg.task.train_length)
  bos, newline = question_starts(data)
  stepper = Stepper(run.graphdef, run.params, _read, seed=int(run.cfg.train.seed), chunk=chunk,
                    mesh=run.mesh)
  out: dict[str, Any] = {"iterations": list(range(1, iterations + 1)), "splits": {}}
  for split in splits:
    if split not in data.maps:
      continue
    shards = list(zip(data.maps[split], data.classes(split)))
    problems = joined([problem_windows(t, c, length, bos, newline, answers)
                       for t, c in shards], length)
    if answers:
      problems.answers = problems.answers[:answers]
    scored = score(stepper, problems, iterations, batch_size)
    rec = {"answer_accuracy": answer_accuracy(problems, scored["correct"]),
           "loss": {k: class_loss(problems, scored["nll"], k) for k in ("problem", "answer")}}
    prose = joined([prose_windows(t, c, length, prose_windows_count) for t, c in shards],
                   length)
    prose.tokens, prose.classes = (prose.tokens[:prose_windows_count],
                                   prose.classes[:prose_windows_count])
    if (prose.classes[:, 1:] == PROSE).any():
      rec["loss"]["prose"] = class_loss(prose, score(stepper, prose, iterations, batch_size)["nll"],
                                        "prose")
    out["splits"][split] = rec
  first = next(iter(out["splits"].values()), None)
  out["r_small"] = first and r_small(first["answer_accuracy"]["all"])
  return out


def plot_accuracy(rec: dict, png: str) -> str:
  """Answer accuracy against iterations, one line per step count: the first split's solid, the
  others' (longer problems than trained) dashed."""
  fig, ax = plots.plt.subplots(figsize=(7, 4))
  Rs = rec["iterations"]
  series = [(split, h, v) for split, r in rec["splits"].items()
            for h, v in r["answer_accuracy"]["by_steps"].items()]
  for (split, h, v), color in zip(series, plots.colors(len(series))):
    first = split == next(iter(rec["splits"]))
    ax.plot(Rs, v, color=color, ls="-" if first else "--", label=f"{h} steps" + ("" if first else
                                                                                 f" ({split})"))
  if rec.get("r_small"):
    ax.axvline(rec["r_small"], color="0.5", lw=0.8, ls=":")
  ax.set(title=f"Answer accuracy against block iterations (R_small = {rec.get('r_small')})",
         xlabel="block iterations R", ylabel="answer accuracy (%)", ylim=(0, 101))
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  return plots.save(fig, png, formats=("png",))


def run_classes(workdir: str, *, data: str | None = None, cfg: Any = None, **options) -> tuple[dict, str]:
  """Open the run, score it by class on `data` (default: its own corpus), write classes.json and
  plots/classes_accuracy.png under WORKDIR/eval/STEP/ (nothing overwritten), log a table of the
  accuracy per step count and iteration count, the figure and R_small to the run's W&B run;
  (record, its path; "" on processes other than 0)."""
  ev = open_evaluation(cfg if cfg is not None else load_run_config(workdir), workdir)
  corpus = TextData(data or ev.cfg.task.path)
  rec = {"step": ev.step, "data": corpus.directory, **evaluate_splits(ev.run, corpus, **options)}
  if not ev.main:
    return rec, ""
  where = os.path.join(ev.output_dir(RECORD), RECORD)
  with open(where, "w") as f:
    json.dump(rec, f, indent=1)
  os.makedirs(os.path.join(os.path.dirname(where), "plots"), exist_ok=True)
  png = plot_accuracy(rec, os.path.join(os.path.dirname(where), "plots", "classes_accuracy.png"))
  rows = [[split, steps, r, acc] for split, one in rec["splits"].items()
          for steps, curve in one["answer_accuracy"]["by_steps"].items()
          for r, acc in enumerate(curve, 1)]
  ev.publish(tables={"classes/answer_accuracy": (["split", "steps", "iterations", "accuracy"], rows)},
             images={"classes/answer_accuracy": png}, summary={"classes/r_small": rec["r_small"]})
  return rec, where
