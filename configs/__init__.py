"""Experiment configs (ml_collections) and the config error type shared by every stage."""
