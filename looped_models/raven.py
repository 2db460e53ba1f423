"""The Huginn / Raven checkpoint layout (docs/pretrained.md) mapped onto model options and parameters:
config.json fields <-> config keys, one safetensors tensor <-> parameter leaves.

Pure functions on dicts and NumPy arrays; reading and writing files is the convert/ package's job.
Parameter paths are tuples into the model's pure-dict parameter tree, e.g. ("block", 0, "attn",
"query", "kernel"); PyTorch Linear weights are [out, in], the model's kernels [in, out].
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

MODEL_TYPE = "huginn_raven"
GROUPS = (("prelude", "prelude", "n_layers_in_prelude"), ("core_block", "block",
          "n_layers_in_recurrent_block"), ("coda", "coda", "n_layers_in_coda"))
INT_FIELDS = ("n_embd", "n_heads", "n_layers_in_prelude", "n_layers_in_recurrent_block",
              "n_layers_in_coda", "intermediate_size", "vocab_size", "block_size")
OPTIONAL = {"mean_recurrence": 32, "mean_backprop_depth": 8, "state_init": "like-init",
            "injection_type": "linear"}
IGNORED = ("freqs_cis",)  # a stored RoPE table, recomputed from rope_base
DTYPES = {"F32": "float32", "BF16": "bfloat16"}


class RavenError(ValueError):
  """A checkpoint that does not fit the layout: one line naming the tensor or the field."""


def init_std(d: int) -> float:
  """The layout's std, sqrt(2 / (5 d)); like-init draws the state with std * sqrt(d)."""
  return math.sqrt(2.0 / (5.0 * d))


def check_config(rc: dict) -> dict:
  """The fields the layout needs, checked; optional ones filled with their defaults."""
  if rc.get("model_type") != MODEL_TYPE:
    raise RavenError(f"config.json: model_type={rc.get('model_type')!r} is not supported; "
                     f"allowed: {MODEL_TYPE}")
  rc = {**OPTIONAL, **rc}
  for key in INT_FIELDS + ("mean_recurrence", "mean_backprop_depth"):
    value = rc.get(key)
    minimum = 0 if key.startswith("n_layers_in_") and key != "n_layers_in_recurrent_block" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise RavenError(f"config.json: {key}={value!r} must be an integer >= {minimum}")
  for key in ("tie_embeddings", "qk_bias"):
    if not isinstance(rc.get(key), bool):
      raise RavenError(f"config.json: {key}={rc.get(key)!r} must be true or false")
  for key in ("norm_eps", "rope_base"):
    value = rc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise RavenError(f"config.json: {key}={value!r} must be a positive number")
  if rc["n_embd"] % rc["n_heads"] or (rc["n_embd"] // rc["n_heads"]) % 2:
    raise RavenError(f"config.json: n_embd={rc['n_embd']} must be n_heads={rc['n_heads']} times an "
                     f"even head dimension")
  if rc["state_init"] != "like-init":
    raise RavenError(f"config.json: state_init={rc['state_init']!r} is not supported; allowed: like-init")
  if rc["injection_type"] != "linear":
    raise RavenError(f"config.json: injection_type={rc['injection_type']!r} is not supported; "
                     f"allowed: linear")
  return rc


def model_options(rc: dict, dtype: str) -> dict[str, Any]:
  """The model's config keys (configs/base.py: model) for a checked Raven config."""
  d = rc["n_embd"]
  return dict(d_model=d, n_heads=rc["n_heads"], d_ff=rc["intermediate_size"],
              vocab_size=rc["vocab_size"], max_len=rc["block_size"],
              n_prelude=rc["n_layers_in_prelude"], block_size=rc["n_layers_in_recurrent_block"],
              n_coda=rc["n_layers_in_coda"], injection="concat", norm="sandwich", norm_type="rms",
              mlp="swiglu", state_init="like_init", state_std=init_std(d), attention="full",
              positions="rope", rope_style="pairs", rope_base=float(rc["rope_base"]),
              qk_bias=rc["qk_bias"], embed_scale="sqrt_d", latent_norm=True,
              norm_eps=float(rc["norm_eps"]), tie_embeddings=rc["tie_embeddings"],
              init_std=init_std(d), embed_std=init_std(d), dtype=dtype, param_dtype=dtype)


def train_options(rc: dict) -> dict[str, Any]:
  """Huginn's training recurrence: Poisson-lognormal around mean_recurrence, truncated backprop."""
  r = rc["mean_recurrence"]
  return dict(recurrence="poisson_lognormal", mean_recurrence=r, max_recurrence=2 * r,
              backprop_depth=rc["mean_backprop_depth"])


def expected_tensors(rc: dict) -> dict[str, tuple[int, ...]]:
  """Every tensor the layout requires for this config, with its shape (lm_head only when untied)."""
  d, f, V, H = rc["n_embd"], rc["intermediate_size"], rc["vocab_size"], rc["n_heads"]
  out = {"transformer.wte.weight": (V, d), "transformer.adapter.weight": (d, 2 * d),
         "transformer.ln_f.weight": (d,)}
  for group, _, count in GROUPS:
    for i in range(rc[count]):
      p = f"transformer.{group}.{i}."
      out.update({f"{p}norm_{j}.weight": (d,) for j in (1, 2, 3, 4)})
      out.update({f"{p}attn.Wqkv.weight": (3 * d, d), f"{p}attn.proj.weight": (d, d),
                  f"{p}mlp.fc.weight": (2 * f, d), f"{p}mlp.proj.weight": (d, f)})
      if rc["qk_bias"]:
        out[f"{p}attn.qk_bias"] = (2, 1, H, d // H)
  if not rc["tie_embeddings"]:
    out["lm_head.weight"] = (V, d)
  return out


def check_tensors(rc: dict, found: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
  """Check the tensors in the files ({name: (shape, safetensors dtype)}) against the layout; returns
  the names to import. Raises RavenError naming the first missing, misshapen or unexpected tensor."""
  want = expected_tensors(rc)
  wte = found.get("transformer.wte.weight")
  if (wte is not None and len(wte[0]) == 2 and wte[0][1] == rc["n_embd"]
      and wte[0][0] != rc["vocab_size"]):
    raise RavenError(f"config.json: vocab_size={rc['vocab_size']} disagrees with "
                     f"transformer.wte.weight of shape {list(wte[0])}")
  for name, shape in want.items():
    if name not in found:
      raise RavenError(f"tensor {name} is missing (expected shape {list(shape)})")
    if tuple(found[name][0]) != shape:
      raise RavenError(f"tensor {name} has shape {list(found[name][0])}, expected {list(shape)}")
    if found[name][1] not in DTYPES:
      raise RavenError(f"tensor {name} has dtype {found[name][1]}; allowed: {'|'.join(DTYPES)}")
  tied_head = rc["tie_embeddings"] and "lm_head.weight" in found
  for name in found:
    if name not in want and name not in IGNORED and not (tied_head and name == "lm_head.weight"):
      raise RavenError(f"tensor {name} is not part of the layout for this config.json (unexpected)")
  if tied_head and tuple(found["lm_head.weight"][0]) != want["transformer.wte.weight"]:
    raise RavenError(f"tensor lm_head.weight has shape {list(found['lm_head.weight'][0])}, expected "
                     f"{list(want['transformer.wte.weight'])} (tied to transformer.wte.weight)")
  return list(want)


def to_params(name: str, w: np.ndarray, rc: dict) -> list[tuple[tuple, np.ndarray]]:
  """One Raven tensor -> the parameter leaves it fills (path, array in the model's layout)."""
  d, f = rc["n_embd"], rc["intermediate_size"]
  if name == "transformer.wte.weight":
    return [(("embed", "embedding"), w)]
  if name == "lm_head.weight":
    return [(("unembed", "kernel"), w.T)]
  if name == "transformer.adapter.weight":
    return [(("injection", "proj", "kernel"), w.T)]
  if name == "transformer.ln_f.weight":
    return [(("final_norm", "scale"), w)]
  _, group, i, rest = name.split(".", 3)
  base = (dict((g, ours) for g, ours, _ in GROUPS)[group], int(i))
  if rest.startswith("norm_"):
    j = int(rest[5]) - 1
    return [(base + ("attn_norms" if j < 2 else "mlp_norms", j % 2, "scale"), w)]
  if rest == "attn.Wqkv.weight":
    return [(base + ("attn", part, "kernel"), w[n * d:(n + 1) * d].T)
            for n, part in enumerate(("query", "key", "value"))]
  if rest == "attn.qk_bias":
    return [(base + ("attn", "qk_bias"), w.reshape(2, w.shape[2], w.shape[3]))]
  if rest == "attn.proj.weight":
    return [(base + ("attn", "out", "kernel"), w.T)]
  if rest == "mlp.fc.weight":  # first f rows: the gate (SiLU), last f rows: the linear half
    return [(base + ("mlp", "gate", "kernel"), w[:f].T), (base + ("mlp", "up", "kernel"), w[f:].T)]
  if rest == "mlp.proj.weight":
    return [(base + ("mlp", "down", "kernel"), w.T)]
  raise RavenError(f"tensor {name} is not part of the layout (unexpected)")


# -- export ---------------------------------------------------------------------------------------

def fit_errors(m: Any) -> list[str]:
  """The options of model config `m` that the layout cannot express ("model.KEY=value (needs ...)")."""
  need = dict(injection="concat", norm="sandwich", norm_type="rms", mlp="swiglu", attention="full",
              positions="rope", rope_style="pairs", state_init="like_init", embed_scale="sqrt_d",
              latent_norm=True)
  bad = [f"model.{k}={getattr(m, k)!r} (the layout needs {v!r})" for k, v in need.items()
         if getattr(m, k) != v]
  if m.state_init == "like_init" and not math.isclose(m.state_std, init_std(m.d_model), rel_tol=1e-6):
    bad.append(f"model.state_std={m.state_std!r} (the layout needs sqrt(2/(5 d_model))="
               f"{init_std(m.d_model)!r})")
  return bad


def raven_config(m: Any, t: Any) -> dict[str, Any]:
  """config.json for model config `m` (training config `t` gives the recurrence means)."""
  return {"model_type": MODEL_TYPE, "n_embd": m.d_model, "n_heads": m.n_heads,
          "n_layers_in_prelude": m.n_prelude, "n_layers_in_recurrent_block": m.block_size,
          "n_layers_in_coda": m.n_coda, "intermediate_size": m.d_ff, "vocab_size": m.vocab_size,
          "tie_embeddings": bool(m.tie_embeddings), "norm_eps": float(m.norm_eps),
          "rope_base": float(m.rope_base), "qk_bias": bool(m.qk_bias),
          "mean_recurrence": int(t.mean_recurrence),
          "mean_backprop_depth": int(t.backprop_depth or t.mean_recurrence),
          "block_size": m.max_len, "state_init": "like-init", "injection_type": "linear",
          "torch_dtype": m.param_dtype}


def from_params(params: dict, m: Any) -> Iterator[tuple[str, Any]]:
  """The Raven tensors of a parameter tree (arrays convertible with np.asarray), in file order."""
  T = lambda a: np.asarray(a).T
  yield "transformer.wte.weight", np.asarray(params["embed"]["embedding"])
  for group, ours, _ in GROUPS:
    layers = params.get(ours, {})  # {index: layer} (nnx.List in a pure dict)
    for i in range(len(layers)):
      layer = layers[i]
      p, attn, mlp = f"transformer.{group}.{i}.", layer["attn"], layer["mlp"]
      norms = [layer["attn_norms"][0], layer["attn_norms"][1], layer["mlp_norms"][0],
               layer["mlp_norms"][1]]
      for j, n in enumerate(norms):
        yield f"{p}norm_{j + 1}.weight", np.asarray(n["scale"])
      yield f"{p}attn.Wqkv.weight", np.concatenate([T(attn[k]["kernel"]) for k in
                                                     ("query", "key", "value")])
      if m.qk_bias:
        b = np.asarray(attn["qk_bias"])
        yield f"{p}attn.qk_bias", b.reshape(2, 1, *b.shape[1:])
      yield f"{p}attn.proj.weight", T(attn["out"]["kernel"])
      yield f"{p}mlp.fc.weight", np.concatenate([T(mlp["gate"]["kernel"]), T(mlp["up"]["kernel"])])
      yield f"{p}mlp.proj.weight", T(mlp["down"]["kernel"])
  yield "transformer.adapter.weight", T(params["injection"]["proj"]["kernel"])
  yield "transformer.ln_f.weight", np.asarray(params["final_norm"]["scale"])
  if not m.tie_embeddings:
    yield "lm_head.weight", T(params["unembed"]["kernel"])
