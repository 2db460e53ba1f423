"""The run directory: workdir, lock, status, config as finished, checkpoints, logger, outputs
under eval/STEP/, and `open_run`, the one way every tool opens a run."""
