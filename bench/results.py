"""Write one benchmark's section of bench/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
import time

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def machine() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {dev.platform} x{jax.device_count()}"
          f" ({kind}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")


def write_section(name: str, body: str) -> None:
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
  block = f"{begin}\n{body.strip()}\n{end}"
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
  text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
  with open(RESULTS, "w") as f:
    f.write(text)
