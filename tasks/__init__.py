"""Task data: synthetic reasoning tasks generated on the fly, text corpora and their tokenizers,
and the accuracy counts every consumer of predictions uses."""


class DataError(Exception):
  """A corpus or prepared directory that cannot be used (one-line message)."""
