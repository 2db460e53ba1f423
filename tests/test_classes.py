"""Figures by token class (eval/classes.py): which answers a set of windows scores, how an answer is
judged right at each iteration count, the loss per class group, and R_small."""

import numpy as np
import pytest

from eval import classes as ec
from tasks import reasoning

BOS, NL = 256, 10


def render(lines, prose="Some prose.\n"):
  """(tokens, classes) of a prose document followed by a problem document of `lines`
  (var_chain problems), the way tasks/corpus.py writes them."""
  tokens, cls = [BOS, *prose.encode(), 257], [reasoning.PROSE] * (len(prose) + 2)
  tokens.append(BOS)
  cls.append(reasoning.PROBLEM)
  for text, c in reasoning.pieces(lines):
    tokens += list(text.encode())
    cls += [c] * len(text.encode())
  tokens.append(257)
  cls.append(reasoning.PROBLEM)
  return np.array(tokens, np.int32), np.array(cls, np.uint8)


@pytest.fixture(scope="module")
def shard():
  rng = np.random.default_rng(0)
  problems = [reasoning.var_chain(rng, h, 3, lookups=1) for h in (1, 2, 3, 4, 2, 1)]
  return problems, *render(problems)


def test_every_answer_that_fits_is_scored_once_with_its_whole_question(shard):
  problems, tokens, cls = shard
  w = ec.problem_windows(tokens, cls, 48, BOS, NL)
  runs = list(ec._answer_runs(cls))
  assert len(w.answers) == len(runs) == 2 * len(problems)  # one lookup and one final answer each
  assert sorted(h for *_, h in w.answers) == sorted([1] * len(problems) + [p.hops for p in problems])
  for (i, first, last, hops), (start, end, c) in zip(w.answers, runs):
    row, row_cls = w.tokens[i], w.classes[i]
    starts = np.flatnonzero(np.isin(row[:first + 1], (BOS, NL)))
    assert len(starts) and (row_cls[starts[-1]:first + 1] != reasoning.PROSE).all()  # whole question
    assert bytes(row[first + 1:last + 2].astype(np.uint8)).decode() == bytes(
        tokens[start:end].astype(np.uint8)).decode()  # the targets at first..last are the answer
    assert (row_cls[first + 1:last + 2] == reasoning.ANSWER + hops).all() and c == reasoning.ANSWER + hops
  assert ec.problem_windows(tokens, cls, 48, BOS, NL, limit=3).answers == w.answers[:3]
  too_short = ec.problem_windows(tokens, cls, 8, BOS, NL)  # no question fits in 8 tokens
  assert too_short.answers == [] and too_short.tokens.shape == (0, 9)


def test_an_answer_is_right_only_when_all_its_tokens_are_and_r_small_is_the_first_adequate():
  w = ec.Windows(np.zeros((2, 7), np.int32), np.zeros((2, 7), np.uint8),
                 [(0, 1, 2, 1), (0, 4, 4, 3), (1, 0, 0, 3)])
  correct = np.zeros((3, 2, 6), bool)  # R = 3 iterations
  correct[:, 0, 1] = True              # the 2-token answer: only its first token right ...
  correct[2, 0, 2] = True              # ... until iteration 3
  correct[1:, 0, 4] = correct[1:, 1, 0] = True
  acc = ec.answer_accuracy(w, correct)
  assert acc["by_steps"] == {"1": [0.0, 0.0, 100.0], "3": [0.0, 100.0, 100.0]}
  assert acc["answers"] == {"1": 1, "3": 2}
  assert acc["all"] == pytest.approx([0.0, 50.0, 100.0])  # each step count weighs alike
  assert ec.r_small(acc["all"]) == 3 and ec.r_small([10.0, 59.5, 60.0, 59.0]) == 2
  assert ec.r_small([]) is None


def test_class_loss_averages_each_group_alone():
  cls = np.array([[0, 0, 1, 3, 0], [0, 1, 1, 4, 0]], np.uint8)  # targets: positions 1..4
  nll = np.stack([np.arange(8, dtype=float).reshape(2, 4), np.ones((2, 4))])
  w = ec.Windows(np.zeros((2, 5), np.int32), cls, [])
  assert ec.class_loss(w, nll, "prose") == pytest.approx([(0 + 3 + 7) / 3, 1.0])
  assert ec.class_loss(w, nll, "problem") == pytest.approx([(1 + 4 + 5) / 3, 1.0])
  assert ec.class_loss(w, nll, "answer") == pytest.approx([(2 + 6) / 2, 1.0])
  assert ec.class_loss(ec.Windows(w.tokens, np.ones_like(cls), []), nll, "answer") == []
