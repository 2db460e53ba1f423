"""Sweep axes as lists of override dicts (big_vision's `get_hyper` style).

  h.product([h.sweep("model.block_size", [1, 2, 4]), h.sweep("model.injection", ["none", "add"])])
  h.zip([h.sweep("train.lr", [1e-3, 3e-3]), h.sweep("train.warmup", [10, 50])])
  h.chain([...], [...])        # one list after the other
  h.fixed("task.name", "addition")
"""

from __future__ import annotations

import builtins
import itertools
from typing import Any, Iterable

Overrides = dict[str, Any]


def sweep(key: str, values: Iterable[Any]) -> list[Overrides]:
  return [{key: v} for v in values]


def fixed(key: str, value: Any) -> list[Overrides]:
  return [{key: value}]


def product(axes: list[list[Overrides]]) -> list[Overrides]:
  return [_merge(combo) for combo in itertools.product(*axes)]


def zip(axes: list[list[Overrides]]) -> list[Overrides]:  # noqa: A001 (big_vision's name)
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f"zip over axes of different lengths {sorted(lengths)}")
  return [_merge(combo) for combo in builtins.zip(*axes)]


def chain(*lists: list[Overrides]) -> list[Overrides]:
  return [o for lst in lists for o in lst]


def _merge(parts: Iterable[Overrides]) -> Overrides:
  out: Overrides = {}
  for p in parts:
    out.update(p)
  return out
