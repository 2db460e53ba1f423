"""Opening a run: the one function every tool that reads a run directory uses (the evaluator,
halting, conversion, reports; generation when it comes).

  run = open_run("runs/NAME")            # config as finished, model, sharded parameters, tokenizer
  model = run.model()                    # an nnx LoopedTransformer (for eager use); or
  run.graphdef, run.params               # for the functional pattern under jax.jit

Parameters are restored with the training sharding rules (looped_models/sharding.py) onto the run's mesh
(`mesh` in its config, or one given here), only the parameters: the optimizer state stays on disk,
so a model that needed FSDP to train opens on the same devices without room for its Adam moments.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from looped_models import sharding
from looped_models.config import SHAPE_KEYS
from looped_models.model import abstract_model, init_model
from rundir import distributed
from rundir.checkpoint import Checkpointer, saved_steps
from rundir.config import resolve, with_defaults
from rundir.workdir import RunDirError, check_reachable, config_files, path, read_json
from tasks.text import TextData
from tasks.tokenizers import TOKENIZER_FILE, HFTokenizer


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run last ran with (the newest of config.json, config.1.json, ...), with keys
  added to the framework since then at their defaults."""
  if not check_reachable(workdir).is_dir():
    raise RunDirError(f"run directory {workdir} does not exist")
  files = config_files(workdir)
  if not files:
    raise RunDirError(f"{workdir} holds no config.json: not a run directory")
  return with_defaults(read_json(path(workdir) / files[-1]))


@dataclasses.dataclass
class Run:
  """An opened run: its resolved config, the model's graph and its parameters on `mesh`."""
  workdir: str
  cfg: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: dict
  step: int                  # the checkpoint's step (0 at initialisation)
  mesh: Mesh

  def model(self):
    return nnx.merge(self.graphdef, self.params)

  @functools.cached_property
  def tokenizer(self) -> Any | None:
    """Text runs and imported models: encode_batch / decode / token_text (read when first asked
    for, so a run opens without it)."""
    return run_tokenizer(self.workdir, self.cfg)


def abstract_params(cfg: Any, mesh: Mesh) -> tuple[nnx.GraphDef, dict]:
  """The model's graph and its parameter shapes, each with the training rules' sharding on `mesh`."""
  graphdef, params = abstract_model(cfg.model, cfg.train.seed)
  shardings = sharding.tree_shardings(params, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, shardings)
  sharding.check_fits(abstract, "the parameters")
  return graphdef, abstract


def restore_params(workdir: str, step: int, abstract: dict) -> dict:
  """Only the parameters of checkpoint `step` (a training checkpoint or an imported params-only
  one), placed as `abstract` says; RunDirError if damaged."""
  ckpt = Checkpointer(workdir, len(saved_steps(workdir)))  # keeps them all: a reader deletes nothing
  try:
    return ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()


def initial_params(cfg: Any, abstract: dict) -> dict:
  """The newest parameters of the run named by `train.init_from` (an imported checkpoint or any
  run of the same model shape), placed as `abstract` says: the start of fine-tuning, or of an
  evaluation trial over that model. RunDirError (one line) when it cannot be used."""
  source = cfg.train.init_from
  return restore_params(source, check_init_from(cfg), abstract)


def check_init_from(cfg: Any) -> int:
  """The step `train.init_from` would start from, after checking that it is a run with a checkpoint
  of this model's shape (one line, before anything is compiled or written)."""
  source = cfg.train.init_from
  other = load_run_config(source).model
  for key in SHAPE_KEYS:
    if other.get(key) != cfg.model.get(key):
      raise RunDirError(f"train.init_from={source} holds a model with model.{key}={other.get(key)!r}, "
                        f"but this run's is {cfg.model.get(key)!r}")
  steps = saved_steps(source)
  if not steps:
    raise RunDirError(f"train.init_from={source} holds no checkpoint")
  return steps[-1]


def run_tokenizer(workdir: str, cfg: Any):
  """The run's own tokenizer.json (an imported model), else its text corpus's tokenizer, else None."""
  own = path(workdir) / TOKENIZER_FILE
  if own.is_file():
    return HFTokenizer.from_file(str(own))
  if cfg.task.name == "text":
    return TextData(cfg.task.path).tokenizer()
  return None


def open_run(workdir: str, *, cfg: ml_collections.ConfigDict | None = None, init: bool = False,
             step: int | None = None, mesh: Mesh | None = None) -> Run:
  """Open the run in `workdir`: its config as finished (or `cfg`), the parameters of checkpoint
  `step` (default the newest; `init=True`: the model at initialisation, the random-init control)
  sharded onto `mesh` (default: the config's `mesh` over all devices), and its tokenizer."""
  if cfg is None:
    if init:
      raise RunDirError("opening a model at initialisation needs its config")
    cfg = load_run_config(workdir)
  cfg = resolve(cfg)
  distributed.initialize(cfg.distributed)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  graphdef, abstract = abstract_params(cfg, mesh)
  if init and cfg.train.init_from:  # the run's starting point is another run's parameters
    params, step = initial_params(cfg, abstract), 0
  elif init:
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    params = jax.jit(lambda: init_model(cfg.model, cfg.train.seed)[1], out_shardings=shardings)()
    step = 0
  else:
    steps = saved_steps(workdir)
    if not steps:
      raise RunDirError(f"{workdir} holds no checkpoint (train it first, or evaluate with --init)")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise RunDirError(f"{workdir} has no checkpoint at step {step}; it has {steps}")
    params = restore_params(workdir, step, abstract)
  return Run(workdir, cfg, graphdef, params, step, mesh)
