"""Benchmarks. Each writes its own section of bench/RESULTS.md, naming the machine it ran on."""
