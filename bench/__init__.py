"""Benchmarks. Each writes its own section of bench/RESULTS.md, naming the machine it ran on."""

from rundir.host import tune_allocator

tune_allocator()  # as the trainer runs: before JAX starts its threads
