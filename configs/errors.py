"""The one error type for bad configuration: a one-line message naming the key and what is allowed."""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
  """A config value that cannot work. `str(err)` is a single line fit for a CLI."""

  def __init__(self, key: str, value: Any, allowed: Iterable[Any] | str | None = None,
               reason: str | None = None):
    self.key, self.value = key, value
    msg = f"config error: {key}={value!r}"
    if allowed is not None:
      allowed = allowed if isinstance(allowed, str) else "|".join(str(a) for a in allowed)
      msg += f" is not allowed; allowed: {allowed}"
    if reason:
      msg += f" ({reason})" if allowed is not None else f": {reason}"
    super().__init__(msg)


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    raise ConfigError(key, value, allowed)


def check_int(key: str, value: Any, *, minimum: int | None = None) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(key, value, reason="must be an integer")
  if minimum is not None and value < minimum:
    raise ConfigError(key, value, allowed=f">= {minimum}")
