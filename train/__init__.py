"""Trainer: CLI, loop, tasks, sharding, checkpoints, logging."""
