"""The host process's memory allocator, set up for XLA's CPU runtime before JAX starts its threads.

XLA's CPU runtime allocates the temporary buffers of a program afresh on every call. With glibc's
defaults, buffers above the mmap threshold are mapped and unmapped per call and the per-thread arenas
are trimmed, so every train step touches its temporaries as new pages: at the reference configuration
(bench/reference_speed.py) about a million minor page faults, 4 GiB of zero-filled pages, a fifth of
the step's time (bench/RESULTS.md). One arena, no mmap and no trimming keep the pages between calls:
the process holds its peak heap instead of returning it to the system between steps.

The cost: one arena serialises the allocations of XLA's threads, which slows work made of many small
compiles and calls (a compile-bound test module ran 1.35x longer); a training process gains (the
default sweep's trial 1.19x, the Shakespeare preset's steps 1.5x; bench/RESULTS.md). Entry points call
`tune_allocator()` first thing (`python -m train | eval | sweeps`, a sweep's trial processes, the
benchmarks); the test session does not. `LOOPED_HOST_ALLOCATOR=system` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "LOOPED_HOST_ALLOCATOR"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_allocator() -> bool:
  """One malloc arena, no mmap'd chunks, no trimming (glibc on Linux only; elsewhere, or with
  LOOPED_HOST_ALLOCATOR=system, nothing). Returns whether the settings were applied. Call it before
  JAX is imported: arenas that threads have created already keep trimming."""
  if not sys.platform.startswith("linux") or os.environ.get(ENV, "") == "system":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success; -1 as the trim threshold is SIZE_MAX once glibc widens it: never.
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)])
