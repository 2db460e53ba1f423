"""Generated reasoning problems mixed into a text corpus: problems whose answers need a known number
of sequential steps, and the per-token class of every token (prose, problem text, or an answer with
its step count) so that evaluation can break its figures down by class.

  python -m train.data prepare --input 'texts/*.txt' \
      --synthetic var_chain:hops=1-8,extrapolate=9-12 [--synthetic-ratio 0.5] [--seed 0] --out DIR

The spec is FAMILY[:KEY=VALUE,...]. The one family, `var_chain`, renders a chain of copies with a
distractor chain, the statements in a random order, and a query:

  c=b;q=3;a=7;b=a;c?7       the answer 7 needs 3 lookups (c -> b -> a -> 7): hops = 3

  hops=LO-HI        steps of the training and validation problems, drawn uniformly (default 1-8; N
                    alone is N-N; at most 25: one-letter names, one left for the distractor chain)
  extrapolate=LO-HI problems with more steps than trained (LO > the HI of hops), in a third split
                    `extrapolate` of problems only (as many problems as the val split, at least 256)
  per_doc=N         problems per document, one a line (default 8)
  lookups=N         after the statements, N of them asked back (`b?a;`: one step each, an answer of
                    class ANSWER + 1) before the final query (default 0). They teach the one step
                    the final answer repeats, many times per problem, and shorten nothing: asking a
                    statement back tells nothing the statement did not.

  c=b;q=3;a=7;b=a;b?a;q?3;c?7    lookups=2

`--synthetic-ratio R` (0 <= R < 1, default 0.5) is the share of problems in the text of each
split, counted in UTF-8 bytes (with the byte tokenizer, in tokens, give or take each document's BOS
and EOS): a split's problem documents hold R / (1 - R) times its prose bytes, at seeded places among
its prose documents. Problems are distinct within a split, and a val problem is never a train
problem (rendered line against rendered line); extrapolate problems differ from both by their step
counts.

Classes (uint8, `classes-{split}-NNNNN.bin`, token for token with `{split}-NNNNN.bin`): PROSE = 0
for prose documents with their BOS and EOS; PROBLEM = 1 for the problem documents' text, separators
and specials; ANSWER + h = 2 + h for the tokens of an answer that needs h steps. The problem text
and the answer are tokenised apart (no token spans both)"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from tasks import DataError

PROSE, PROBLEM, ANSWER = 0, 1, 2  # class codes; an answer needing h steps is ANSWER + h
NAMES = string.ascii_lowercase
MAX_HOPS = len(NAMES) - 1
EXTRAPOLATE_MIN_PROBLEMS = 256
CLASSES_META = {"dtype": "uint8", "files": "classes-{split}-NNNNN.bin", "prose": PROSE,
                "problem": PROBLEM, "answer": f"{ANSWER} + steps the answer needs"}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One rendered problem: its `statements`, the 1-step `lookups` asked after them ((name, value)
  pairs, each rendered `name?value;`), the final `query` name, its `answer` and the steps it needs."""

  statements: str
  query: str
  answer: str
  hops: int
  lookups: tuple[tuple[str, str], ...] = ()

  @property
  def question(self) -> str:
    """The text before the final answer (lookups and their answers included), ending in '?'."""
    return self.statements + ";" + "".join(f"{n}?{v};" for n, v in self.lookups) + f"{self.query}?"

  @property
  def line(self) -> str:
    return f"{self.question}{self.answer}\n"

  @property
  def key(self) -> str:
    """What makes two problems the same (the lookups asked back add nothing to solve)."""
    return f"{self.statements};{self.query}?{self.answer}"

  def runs(self) -> list[tuple[str, int]]:
    """The problem's text as (text, class) runs: the lookups' values as 1-step answers, the final
    answer with its steps, the rest PROBLEM."""
    runs = [(self.statements + ";", PROBLEM)]
    for name, value in self.lookups:
      runs += [(f"{name}?", PROBLEM), (value, answer_class(1)), (";", PROBLEM)]
    return runs + [(f"{self.query}?", PROBLEM), (self.answer, answer_class(self.hops))]


@dataclasses.dataclass(frozen=True)
class Synthetic:
  """A parsed `--synthetic` spec: the family, its step ranges and the problems per document."""

  spec: str
  family: str
  hops: tuple[int, int]
  extrapolate: tuple[int, int] | None
  per_doc: int
  lookups: int = 0

  def to_meta(self) -> dict:
    return {"spec": self.spec, "family": self.family, "hops": list(self.hops),
            "extrapolate": list(self.extrapolate) if self.extrapolate else None,
            "per_doc": self.per_doc, "lookups": self.lookups}


def answer_class(hops: int) -> int:
  """The class of an answer token whose answer needs `hops` steps."""
  return ANSWER + hops


def var_chain(rng: np.random.Generator, hops: int, longest: int, lookups: int = 0) -> Problem:
  """A chain of `hops` statements from a digit to the queried name, and a distractor chain (1 to
  `longest` statements, another digit), all in a random order; then `lookups` of the statements
  (at most all) asked back one step each, in a random order."""
  distract = int(rng.integers(1, min(longest, len(NAMES) - hops) + 1))
  names = [NAMES[i] for i in rng.permutation(len(NAMES))[:hops + distract]]
  value, other = (str(v) for v in rng.choice(10, 2, replace=False))
  chain, decoy = names[:hops], names[hops:]
  pairs = [(chain[0], value)] + [(b, a) for a, b in zip(chain, chain[1:])]
  pairs += [(decoy[0], other)] + [(b, a) for a, b in zip(decoy, decoy[1:])]
  order = rng.permutation(len(pairs))
  asked = rng.permutation(len(pairs))[:lookups] if lookups else []  # lookups=0 draws as before
  return Problem(";".join(f"{pairs[i][0]}={pairs[i][1]}" for i in order), chain[-1], value, hops,
                 tuple(pairs[i] for i in asked))


def solve_var_chain(question: str) -> tuple[str, int]:
  """(answer, steps) of a rendered var_chain question, found by following its statements (the
  lookups asked back in it are skipped)."""
  *items, query = question.rstrip("?").split(";")
  value = dict(s.split("=") for s in items if "=" in s)
  steps, name = 0, query
  while not name.isdigit():
    name, steps = value[name], steps + 1
  return name, steps


FAMILIES = {"var_chain": var_chain}
KEYS = ("hops", "extrapolate", "per_doc", "lookups")


def _range(spec: str, key: str, text: str) -> tuple[int, int]:
  lo, _, hi = text.partition("-")
  try:
    lo, hi = int(lo), int(hi or lo)
  except ValueError:
    lo, hi = 0, -1
  if not 1 <= lo <= hi <= MAX_HOPS:
    raise DataError(f"--synthetic {spec}: {key}={text} is not allowed; allowed: LO-HI or N with "
                    f"1 <= LO <= HI <= {MAX_HOPS}")
  return lo, hi


def parse_spec(spec: str) -> Synthetic:
  """The `--synthetic FAMILY[:KEY=VALUE,...]` spec; DataError naming what is wrong."""
  family, _, rest = spec.partition(":")
  if family not in FAMILIES:
    raise DataError(f"--synthetic {spec}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
  values = {"hops": "1-8", "extrapolate": None, "per_doc": "8", "lookups": "0"}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if key not in KEYS or not eq:
      raise DataError(f"--synthetic {spec}: {item!r} is not KEY=VALUE with a key of "
                      f"{', '.join(KEYS)}")
    values[key] = value
  hops = _range(spec, "hops", values["hops"])
  extrapolate = values["extrapolate"] and _range(spec, "extrapolate", values["extrapolate"])
  if extrapolate and extrapolate[0] <= hops[1]:
    raise DataError(f"--synthetic {spec}: extrapolate={values['extrapolate']} must start past "
                    f"hops={values['hops']} (more steps than trained)")
  if not values["per_doc"].isdigit() or int(values["per_doc"]) < 1:
    raise DataError(f"--synthetic {spec}: per_doc={values['per_doc']} is not allowed; "
                    "allowed: >= 1")
  if not values["lookups"].isdigit():
    raise DataError(f"--synthetic {spec}: lookups={values['lookups']} is not allowed; "
                    "allowed: >= 0")
  return Synthetic(spec, family, hops, extrapolate or None, int(values["per_doc"]),
                   int(values["lookups"]))


def draw(rng: np.random.Generator, family: str, hops: tuple[int, int], *, budget_bytes: int = 0,
         count: int = 0, exclude: frozenset[str] | set[str] = frozenset(), lookups: int = 0
         ) -> list[Problem]:
  """Distinct problems (by `Problem.key`), none with a key in `exclude`, steps uniform in
  `hops`, each with `lookups` statements asked back: until their lines hold `budget_bytes` bytes
  and number at least `count`."""
  make, lo, hi = FAMILIES[family], hops[0], hops[1]
  problems: list[Problem] = []
  seen: set[str] = set()
  size, misses = 0, 0
  while size < budget_bytes or len(problems) < count:
    p = make(rng, int(rng.integers(lo, hi + 1)), hi, lookups)
    line = p.key
    if line in seen or line in exclude:
      misses += 1
      if misses > 10_000:
        raise DataError(f"{family} with hops {lo}-{hi} ran out of distinct problems after "
                        f"{len(problems)}; lower --synthetic-ratio or widen the hops")
      continue
    misses = 0
    seen.add(line)
    problems.append(p)
    size += len(p.line)
  return problems


def pieces(document: list[Problem]) -> list[tuple[str, int]]:
  """A problem document as (text, class) runs that are tokenised apart: each question (with the
  newline before it) as PROBLEM, each answer as its answer class, the final newline as PROBLEM."""
  runs: list[tuple[str, int]] = []
  for n, p in enumerate(document):
    first, *rest = p.runs()
    runs += [("\n" * (n > 0) + first[0], PROBLEM), *rest]
  return runs + [("\n", PROBLEM)]


def mix(docs: list[str], is_val: np.ndarray, synthetic: Synthetic, ratio: float, seed: int
        ) -> dict[str, list[str | list[Problem]]]:
  """Each split's documents in writing order: its prose documents (str, in input order) with
  problem documents (lists of problems) at seeded places. The val problems exclude the train ones;
  an `extrapolate` split of problem documents alone when the spec has the range."""
  prose = {"train": [d for d, v in zip(docs, is_val) if not v],
           "val": [d for d, v in zip(docs, is_val) if v]}
  share = ratio / (1 - ratio)
  problems: dict[str, list[Problem]] = {}
  for stream, split in enumerate(("train", "val"), 1):
    budget = int(round(share * sum(len(d.encode("utf-8")) for d in prose[split])))
    exclude = {p.key for p in problems.get("train", ())}
    problems[split] = draw(np.random.default_rng([seed, stream]), synthetic.family,
                           synthetic.hops, budget_bytes=budget, exclude=exclude,
                           lookups=synthetic.lookups)
  if synthetic.extrapolate:
    problems["extrapolate"] = draw(np.random.default_rng([seed, 3]), synthetic.family,
                                   synthetic.extrapolate,
                                   count=max(len(problems["val"]), EXTRAPOLATE_MIN_PROBLEMS),
                                   lookups=synthetic.lookups)
  out: dict[str, list[str | list[Problem]]] = {}
  for stream, (split, drawn) in enumerate(problems.items(), 4):
    grouped = [drawn[i:i + synthetic.per_doc] for i in range(0, len(drawn), synthetic.per_doc)]
    mine = prose.get(split, [])
    is_problem = np.zeros(len(mine) + len(grouped), bool)
    places = np.random.default_rng([seed, stream]).permutation(len(is_problem))[:len(grouped)]
    is_problem[places] = True
    prose_iter, problem_iter = iter(mine), iter(grouped)
    out[split] = [next(problem_iter) if p else next(prose_iter) for p in is_problem]
  return out
