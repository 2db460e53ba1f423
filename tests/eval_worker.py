"""Evaluates a trained run (fixed points, adaptive halting, generation) as one of several
jax.distributed processes (or alone), on a given mesh; writes what it saw (process count, the
parameters' shardings, the halting rows, the generated tokens) to --out as JSON. Used by
tests/test_run.py in subprocesses with fake CPU devices."""

import argparse
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--mesh", default="-1,1,1")
  p.add_argument("--coordinator", default="")
  p.add_argument("--nproc", type=int, default=1)
  p.add_argument("--pid", type=int, default=0)
  p.add_argument("--out", required=True)
  a = p.parse_args()
  import jax

  from eval.evaluate import evaluate
  from eval.halting import evaluate_halting
  from rundir.run import load_run_config, open_run

  cfg = load_run_config(a.workdir)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(x) for x in a.mesh.split(","))
  if a.coordinator:
    cfg.distributed.update(coordinator_address=a.coordinator, num_processes=a.nproc, process_id=a.pid)
  run = open_run(a.workdir, cfg=cfg)
  specs = {jax.tree_util.keystr(path): str(leaf.sharding.spec)
           for path, leaf in jax.tree_util.tree_leaves_with_path(run.params)}
  # figures as PNG alone, as a sweep trial writes them (what is compared is in the JSON records)
  summary = evaluate(cfg, a.workdir, iterations=8, batch_size=4, progress=False, formats=("png",))
  halting = evaluate_halting(cfg, a.workdir, grids={"fixed_point": (1e-2, 1e-1), "kl": (1e-2,)},
                             iterations=8, repeats=1, mode="trial", log_wandb=False, progress=False,
                             formats=("png",))
  rows = [{k: r[k] for k in ("criterion", "threshold", "exact_match", "mean_iterations")}
          for r in halting["rows"]]
  # generation on the run's mesh: 5 prompts in 4 slots (continuous batching), per-token exit
  from looped_models.generate import Generator
  prompts = [[1, 0, 1, 1, 0], [0, 1], [1, 1, 0], [1], [0, 0, 1, 0]]
  out = Generator(run.model(), run.mesh)(prompts, max_new=6, iterations=4, exit=("fixed_point", 1e-2),
                                         cache="latest", slots=4, return_logits=True)
  generated = {"tokens": [t.tolist() for t in out.tokens], "iterations": [i.tolist() for i in out.iterations],
               "logits": [x.tolist() for x in out.logits]}
  json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
             "devices": jax.device_count(), "specs": specs, "summary": summary, "halting_rows": rows,
             "R_fixed": halting["R_fixed"], "generated": generated}, open(a.out, "w"))


if __name__ == "__main__":
  main()
