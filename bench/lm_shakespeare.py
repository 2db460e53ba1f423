"""Held-out loss against wall time of the Shakespeare preset (configs/lm_shakespeare.py).

  make shakespeare && python -m bench.lm_shakespeare [--workdir /tmp/lm_bench] [--config.KEY=VALUE ...]
      [--dry_run]

Trains the preset from scratch (a fresh work directory), then reads metrics.jsonl: every validation
(held-out windows at r = 1, 2, 4, ... up to 4x the training maximum) with the seconds since training
started, and checks the preset's targets: held-out nats per byte at the training recurrence <= 1.55
within 15 minutes; the loss at 2x and 4x the training recurrence no worse than at it (extrapolation in
depth); a lower loss at the training recurrence than at r = 1. Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

import jax
import numpy as np
from absl import flags, logging
from flax import nnx

from bench.results import intro, record, table
from configs.recurrence import max_recurrence
from rundir.cli import define_config, run
from rundir.logger import read_metrics
from rundir.run import open_run
from tasks.text import TextData
from train.trainer import Trainer

_CONFIG = define_config("config", "configs/lm_shakespeare.py", "Preset.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/lm_shakespeare_bench", "Run directory (replaced).")
_BUDGET = flags.DEFINE_float("budget_min", 15.0, "Wall-time budget of the loss target (minutes).")
_TARGET = flags.DEFINE_float("target", 1.55, "Held-out nats per byte to reach within the budget.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the section instead of writing it into "
                             "bench/RESULTS.md.")


def split_losses(workdir: str, r: int, windows: int = 256, batch: int = 64) -> dict[str, float]:
  """Nats per byte at r iterations of the run's newest checkpoint on `windows` random windows of each
  split (seed 0): the same model on text it trained on and on held-out plays."""
  run = open_run(workdir)
  data, n = TextData(run.cfg.task.path), run.cfg.task.train_length
  forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(run.graphdef, p)(x, r).logits_BSV, -1))
  out = {}
  for split in ("train", "val"):
    rng, nats, nbytes = np.random.default_rng(0), 0.0, 0
    for _ in range(windows // batch):
      w = np.stack([data.window(rng, n, split) for _ in range(batch)])
      logp = np.asarray(forward(run.params, w[:, :-1]))
      nats -= float(np.take_along_axis(logp, w[:, 1:, None], -1).sum())
      nbytes += int(data.token_bytes[w[:, 1:]].sum())
    out[split] = nats / nbytes
  return out


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  if os.path.isdir(_WORKDIR.value):
    shutil.rmtree(_WORKDIR.value)
  trainer = Trainer(cfg, _WORKDIR.value)
  result = trainer.run()
  if result["status"] != "done":
    print(f"error: training ended {result['status']}", file=sys.stderr)
    return 1
  cfg = trainer.cfg
  r_train = cfg.train.mean_recurrence
  rs = sorted(cfg.train.eval_recurrences)
  metrics = read_metrics(_WORKDIR.value)
  evals = [m for m in metrics if "val/best_loss" in m]
  tok_s = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m]
  npb = lambda m, r: m[f"val/iters{r}/bits_per_byte"] * math.log(2)  # nats per byte
  in_budget = [m for m in evals if m["elapsed_s"] <= 60 * _BUDGET.value]
  best_in_budget = min((npb(m, r_train) for m in in_budget), default=float("nan"))
  last = evals[-1]
  n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state["params"]))

  m = cfg.model
  lines = [
      "## Shakespeare preset: held-out loss against wall time (`configs/lm_shakespeare.py`)", "",
      intro("python -m bench.lm_shakespeare", f". ({m.n_prelude}, {m.block_size}⊗r, "
      f"{m.n_coda}), d = {m.d_model}, {m.n_heads} heads, {m.mlp} MLP of {m.d_ff}, injection "
      f"`{m.injection}`, norm `{m.norm}`, {n_params / 1e6:.2f}M parameters, byte-level, windows of "
      f"{cfg.task.train_length}, batch {cfg.train.batch_size}, {cfg.train.steps} steps, AdamW (lr "
      f"{cfg.train.lr:g}, weight decay {cfg.train.weight_decay:g}, schedule "
      f"`{cfg.train.schedule}`); training "
      f"recurrence `{cfg.train.recurrence}` (mean {r_train}, cap {max_recurrence(cfg.train)}, "
      f"backprop depth {cfg.train.backprop_depth or 'all'}). Training throughput: median "
      f"{sorted(tok_s)[len(tok_s) // 2]:,.0f} tokens/s."), "",
      "Held-out loss in nats per byte (BOS/EOS carry no bytes) at each recurrence r:", "",
      *table(["step", "minutes", *(f"r={r}" for r in rs)],
             [[e["step"], f"{e['elapsed_s'] / 60:.1f}", *(f"{npb(e, r):.3f}" for r in rs)]
              for e in evals])]
  checks = [
      (f"nats per byte at r = {r_train} within {_BUDGET.value:g} min <= {_TARGET.value}",
       best_in_budget <= _TARGET.value, f"{best_in_budget:.3f}"),
      (f"at 2r = {2 * r_train} no worse than at r = {r_train}",
       npb(last, 2 * r_train) <= npb(last, r_train) + 1e-3,
       f"{npb(last, 2 * r_train):.3f} vs {npb(last, r_train):.3f}"),
      (f"at 4r = {4 * r_train} no worse than at r = {r_train}",
       npb(last, 4 * r_train) <= npb(last, r_train) + 1e-3,
       f"{npb(last, 4 * r_train):.3f} vs {npb(last, r_train):.3f}"),
      (f"lower at r = {r_train} than at r = 1", npb(last, r_train) < npb(last, 1),
       f"{npb(last, r_train):.3f} vs {npb(last, 1):.3f}"),
  ]
  gap = split_losses(_WORKDIR.value, r_train)
  lines += ["", f"The final model at r = {r_train} on 256 random windows of each split: {gap['train']:.3f} "
            f"nats per byte on the training plays, {gap['val']:.3f} on the held-out ones (different "
            f"plays: new speakers' names, a gap that grows with passes over the training text)."]
  lines += ["", *table(["target", "met", "measured"],
                       [[name, "yes" if ok else "no", value] for name, ok, value in checks])]
  record("lm_shakespeare", lines, _DRY_RUN.value)
  return 0


if __name__ == "__main__":
  run(main)
