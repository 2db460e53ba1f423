"""A run's logits and latents after R block iterations, for comparison with any other implementation
of the same checkpoint (`python -m convert logits`, docs/pretrained.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.errors import ConfigError
from rundir.config import resolve
from rundir.run import load_run_config, open_run


def logits_and_latents(graphdef: nnx.GraphDef, params: dict, tokens_BS: np.ndarray,
                       iterations: list[int], state0_BSD: np.ndarray | None = None,
                       key: jax.Array | None = None) -> dict[str, np.ndarray]:
  """{logits_r{R}: [B, S, V] float32, latents_r{R}: [B, S, D]} for every R in `iterations`: the
  latent is the state after R iterations as the coda reads it (normed with model.latent_norm).
  The run starts from `state0_BSD` when given, else from the model's own initial state (`key`)."""

  @jax.jit
  def start(params, tokens_BS, key):
    model = nnx.merge(graphdef, params)
    e_BSD = model.encode(tokens_BS, model.context(tokens_BS.shape[1]))
    return model.initial_state(e_BSD, key), e_BSD

  @jax.jit
  def advance(params, s_BSD, e_BSD):  # one iteration, compiled once, called R times
    model = nnx.merge(graphdef, params)
    return model.iterate(s_BSD, e_BSD, model.context(s_BSD.shape[1]), 1, 1).state_BSD

  @jax.jit
  def head(params, s_BSD):
    model = nnx.merge(graphdef, params)
    return model.latent(s_BSD).astype(jnp.float32), model.decode(s_BSD, model.context(s_BSD.shape[1]))

  tokens_BS = jnp.asarray(tokens_BS, jnp.int32)
  s_BSD, e_BSD = start(params, tokens_BS, jax.random.key(0) if key is None else key)
  if state0_BSD is not None:
    s_BSD = jnp.asarray(state0_BSD, s_BSD.dtype)
  out, done = {}, 0
  for R in sorted(set(iterations)):
    for _ in range(R - done):
      s_BSD = advance(params, s_BSD, e_BSD)
    done = R
    latent, logits = head(params, s_BSD)
    out[f"logits_r{R}"], out[f"latents_r{R}"] = np.asarray(logits), np.asarray(latent)
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
                            jax.random.key(cfg.train.seed))
