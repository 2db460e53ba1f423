"""Sweeps: expansion of sweep files, the trial runner (resume, failure isolation), the report."""
