"""The model's options, their allowed values, and the check that runs before anything is built."""

from __future__ import annotations

from typing import Any

from configs.errors import ConfigError, check_choice, check_int

INJECTIONS = ("none", "add", "concat", "gate")
NORMS = ("pre", "post", "sandwich", "peri", "none")
PERI_NORMS = ("state", "input")
NORM_TYPES = ("rms", "layer")
STATE_INITS = ("embed", "zeros", "normal", "like_init")
ATTENTIONS = ("full", "local")
POSITIONS = ("rope", "learned")
ROPE_STYLES = ("half", "pairs")
MLPS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "blocked", "xla", "cudnn")

# The keys that fix the parameter shapes: a checkpoint only restores into a model that agrees on them.
SHAPE_KEYS = ("d_model", "n_heads", "d_ff", "vocab_size", "max_len", "n_prelude", "block_size",
              "n_coda", "injection", "norm", "norm_type", "mlp", "positions", "tie_embeddings")
# (qk_bias changes shapes too, but runs made before it existed lack the key; a mismatch is caught by
# the checkpoint restore: "does not match the model")

ModelSpec = Any  # an ml_collections.ConfigDict (or any object) with the attributes of configs/base.py:model


def validate_model_config(m: ModelSpec, prefix: str = "model") -> None:
  """Raise ConfigError (one line, naming the key) for the first option that cannot work."""
  for key, allowed in (("injection", INJECTIONS), ("norm", NORMS), ("norm_type", NORM_TYPES),
                       ("state_init", STATE_INITS), ("attention", ATTENTIONS),
                       ("positions", POSITIONS), ("rope_style", ROPE_STYLES), ("mlp", MLPS),
                       ("dtype", DTYPES), ("state_dtype", DTYPES), ("param_dtype", DTYPES)):
    check_choice(f"{prefix}.{key}", getattr(m, key), allowed)
  for key in ("d_model", "n_heads", "d_ff", "vocab_size", "max_len", "block_size"):
    check_int(f"{prefix}.{key}", getattr(m, key), minimum=1)
  for key in ("n_prelude", "n_coda"):
    check_int(f"{prefix}.{key}", getattr(m, key), minimum=0)
  check_int(f"{prefix}.unroll", getattr(m, "unroll", 0), minimum=0)
  if m.d_model % m.n_heads:
    raise ConfigError(f"{prefix}.d_model", m.d_model,
                      reason=f"must be divisible by {prefix}.n_heads={m.n_heads}")
  if m.positions == "rope" and (m.d_model // m.n_heads) % 2:
    raise ConfigError(f"{prefix}.n_heads", m.n_heads,
                      reason="rope needs an even head dimension d_model/n_heads")
  if m.attention == "local":
    check_int(f"{prefix}.window", m.window, minimum=1)
  check_choice(f"{prefix}.peri_norm", getattr(m, "peri_norm", "state"), PERI_NORMS)
  check_attention_impl(m, prefix)
  for key in ("init_std", "embed_std", "state_std"):
    value = getattr(m, key)
    if not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f"{prefix}.{key}", value, allowed=">= 0")
  for key in ("qk_bias", "latent_norm"):
    if not isinstance(getattr(m, key), bool):
      raise ConfigError(f"{prefix}.{key}", getattr(m, key), allowed="True|False")
  if isinstance(m.rope_base, bool) or not isinstance(m.rope_base, (int, float)) or m.rope_base <= 1:
    raise ConfigError(f"{prefix}.rope_base", m.rope_base, allowed="> 1")
  if isinstance(m.norm_eps, bool) or not isinstance(m.norm_eps, (int, float)) or not m.norm_eps > 0:
    raise ConfigError(f"{prefix}.norm_eps", m.norm_eps, allowed="> 0")
  scale = m.embed_scale
  if scale != "sqrt_d" and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                            or scale < 0):
    raise ConfigError(f"{prefix}.embed_scale", scale, allowed="0 (none), a positive number, sqrt_d")
  check_meaningful(m, prefix)


def check_meaningful(m: ModelSpec, prefix: str = "model") -> None:
  """Raise ConfigError for combinations that build a model but cannot mean anything: a block that never
  sees the input, a local window wider than any sequence, a random initial state without randomness."""
  if m.injection == "none" and m.state_init != "embed":
    raise ConfigError(f"{prefix}.state_init", m.state_init, allowed="embed",
                      reason=f"with {prefix}.injection='none' the input enters only through the initial "
                      "state s0 = e; use injection add|concat|gate for another state_init")
  if m.attention == "local" and m.window > m.max_len:
    raise ConfigError(f"{prefix}.window", m.window, allowed=f"<= {prefix}.max_len={m.max_len}",
                      reason=f"a window wider than the longest sequence is {prefix}.attention='full'")
  if getattr(m, "peri_norm", "state") != "state" and m.norm != "peri":
    raise ConfigError(f"{prefix}.peri_norm", m.peri_norm, allowed="state",
                      reason=f"it places the per-iteration norm of {prefix}.norm='peri', not "
                      f"{prefix}.norm={m.norm!r}")
  if m.state_init == "normal" and not m.state_std > 0:
    raise ConfigError(f"{prefix}.state_std", m.state_std, allowed="> 0",
                      reason=f"with {prefix}.state_init='normal'; use state_init='zeros' for s0 = 0")


def check_attention_impl(m: ModelSpec, prefix: str = "model") -> None:
  """`attention_impl=cudnn` needs a GPU, bfloat16 and a head dimension cuDNN takes (a multiple of 8,
  at most 128)."""
  impl = getattr(m, "attention_impl", "auto")
  check_choice(f"{prefix}.attention_impl", impl, ATTENTION_IMPLS)
  if impl != "cudnn":
    return
  import jax  # only here: the other checks need no backend
  head_dim = m.d_model // m.n_heads
  if jax.default_backend() != "gpu":
    raise ConfigError(f"{prefix}.attention_impl", impl, allowed="auto|blocked|xla",
                      reason=f"cuDNN attention needs a GPU; this backend is {jax.default_backend()}")
  if m.dtype != "bfloat16":
    raise ConfigError(f"{prefix}.attention_impl", impl, reason=f"cuDNN attention needs "
                      f"{prefix}.dtype=bfloat16, not {m.dtype}")
  if head_dim % 8 or head_dim > 128:
    raise ConfigError(f"{prefix}.attention_impl", impl, reason=f"cuDNN attention needs a head "
                      f"dimension d_model/n_heads that is a multiple of 8 and at most 128, not {head_dim}")
