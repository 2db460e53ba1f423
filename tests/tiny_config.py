"""The tiny trial of tests/conftest.py as a config file, for `python -m train` subprocesses."""

from conftest import tiny_config


def get_config():
  return tiny_config()
