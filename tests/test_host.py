"""The host allocator settings (rundir/host.py): XLA's CPU temporaries keep their pages between calls."""

import os
import subprocess
import sys

import pytest

from rundir.host import ENV

# A program with a 64 MiB temporary (sin(x), read by the matmul), above glibc's largest mmap threshold.
_PROGRAM = """
import resource
from rundir.host import tune_allocator
applied = tune_allocator()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.sin(x[:64]).T).sum())
x = jnp.ones((2048, 8192))
jax.block_until_ready(f(x))
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults))
"""


def _faults(allocator: str) -> tuple[str, int]:
  """Whether the settings applied, and the fewest page faults of 8 calls after the first."""
  env = {**os.environ, ENV: allocator, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_temporaries_keep_their_pages_between_calls():
  applied, faults = _faults("tuned")
  system, system_faults = _faults("system")
  assert (applied, system) == ("True", "False")
  pages = 2048 * 8192 * 4 // 4096
  # glibc's defaults: the temporary is mapped afresh on every call.
  assert system_faults > pages // 2, system_faults
  # Tuned: calls reuse the pages (a call may still fault while the heap settles: the fewest count).
  assert faults < pages // 50, faults
