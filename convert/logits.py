"""A run's logits and latents after R block iterations, for comparison with any other implementation
of the same checkpoint (`python -m convert logits`, docs/pretrained.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.errors import ConfigError
from looped_models.stepper import Stepper
from rundir.config import resolve
from rundir.run import load_run_config, open_run


def read_logits_and_latent(model, s_BSD: jax.Array, ctx, batch: dict) -> dict[str, jax.Array]:
  """The stepper's read: the logits [B, S, V] float32 and the latent [B, S, D] float32 of a state."""
  return {"logits": model.decode(s_BSD, ctx), "latent": model.latent(s_BSD).astype(jnp.float32)}


def logits_and_latents(graphdef: nnx.GraphDef, params: dict, tokens_BS: np.ndarray,
                       iterations: list[int], state0_BSD: np.ndarray | None = None,
                       seed: int = 0) -> dict[str, np.ndarray]:
  """{logits_r{R}: [B, S, V] float32, latents_r{R}: [B, S, D]} for every R in `iterations`: the
  latent is the state after R iterations as the coda reads it (normed with model.latent_norm).
  The run starts from `state0_BSD` when given, else from the model's own initial state (`seed`).
  One pass of max(R) iterations on the stepper (looped_models/stepper.py), one iteration per device
  call, read only at the R asked for."""
  Rs = sorted(set(iterations))
  stepper = Stepper(graphdef, params, read_logits_and_latent, seed=seed, chunk=1)
  start = None if state0_BSD is None else (lambda s_BSD, e_BSD: jnp.asarray(state0_BSD, s_BSD.dtype))
  reads = stepper.reads({"inputs": np.asarray(tokens_BS, np.int32)}, Rs[-1], at=Rs, start=start)
  out = {}
  for i, R in enumerate(Rs):
    out[f"logits_r{R}"], out[f"latents_r{R}"] = reads["logits"][i], reads["latent"][i]
  return out


def run_logits(run_dir: str, tokens_BS: np.ndarray, iterations: list[int],
               state0: str | np.ndarray | None = None) -> dict[str, np.ndarray]:
  """`logits_and_latents` for run `run_dir`; `state0`: None (the model's initial state), "zeros",
  or an array [B, S, D]. Bad tokens or state: ConfigError naming the argument."""
  cfg = resolve(load_run_config(run_dir))
  m = cfg.model
  tokens_BS = np.asarray(tokens_BS)
  if tokens_BS.ndim != 2 or not np.issubdtype(tokens_BS.dtype, np.integer):
    raise ConfigError("--tokens", f"{tokens_BS.dtype}{list(tokens_BS.shape)}",
                      reason="must be a [batch, sequence] integer array")
  if tokens_BS.size and (tokens_BS.min() < 0 or tokens_BS.max() >= m.vocab_size):
    raise ConfigError("--tokens", f"ids in [{tokens_BS.min()}, {tokens_BS.max()}]",
                      reason=f"must lie in [0, model.vocab_size={m.vocab_size})")
  if not 1 <= tokens_BS.shape[1] <= m.max_len:
    raise ConfigError("--tokens", f"{tokens_BS.shape[1]} positions",
                      reason=f"must be 1..model.max_len={m.max_len}")
  if not iterations or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in iterations):
    raise ConfigError("--iterations", iterations, allowed="positive integers, comma-separated")
  if isinstance(state0, str):
    if state0 != "zeros":
      raise ConfigError("--state0", state0, allowed="zeros|STATE.npy")
    state0 = np.zeros((*tokens_BS.shape, m.d_model), np.float32)
  if state0 is not None and np.shape(state0) != (*tokens_BS.shape, m.d_model):
    raise ConfigError("--state0", f"shape {list(np.shape(state0))}",
                      reason=f"must be [batch, sequence, d_model] = {[*tokens_BS.shape, m.d_model]}")
  run = open_run(run_dir, cfg=cfg)
  return logits_and_latents(run.graphdef, run.params, tokens_BS, iterations, state0,
                            seed=cfg.train.seed)
