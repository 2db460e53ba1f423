"""The host process's memory allocator, set up for XLA's CPU runtime before JAX starts its threads.

XLA's CPU runtime allocates the temporary buffers of a program afresh on every call. With glibc's
defaults, buffers above the mmap threshold are mapped and unmapped per call and the per-thread arenas
are trimmed, so every train step touches its temporaries as new pages: at the reference configuration
(bench/reference_speed.py) about a million minor page faults, 4 GiB of zero-filled pages, a fifth of
the step's time (bench/RESULTS.md). One arena, no mmap and no trimming keep the pages between calls:
the process holds its peak heap instead of returning it to the system between steps.

The cost: one arena serialises the allocations of XLA's threads, which slows work made of many small
compiles and calls (a compile-bound test module ran 1.35x longer, the default sweep 1.10x); a training
process gains (a default trial's `python -m train` 1.19x, the Shakespeare preset's steps 1.5x;
bench/RESULTS.md). So `python -m train` and the benchmarks tune by default; evaluation and sweeps
(many small programs; a sweep's trials are also evaluated) and the test session do not.
`LOOPED_HOST_ALLOCATOR=tuned` tunes everywhere (a sweep of large models), `system` nowhere.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "LOOPED_HOST_ALLOCATOR"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_allocator(default: bool = True) -> bool:
  """One malloc arena, no mmap'd chunks, no trimming (glibc on Linux only), if LOOPED_HOST_ALLOCATOR
  says `tuned`, or it is unset and `default`. Returns whether the settings were applied. Call it before
  JAX is imported: arenas that threads have created already keep trimming."""
  choice = os.environ.get(ENV, "")
  if choice not in ("", "tuned", "system"):
    print(f"error: {ENV}={choice!r}: use tuned or system (unset: the entry point's default)",
          file=sys.stderr)
    raise SystemExit(2)
  if not sys.platform.startswith("linux") or choice == "system" or (choice == "" and not default):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success; -1 as the trim threshold is SIZE_MAX once glibc widens it: never.
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)])
