"""Runs the tiny trial under a given mesh (and, optionally, as one of several jax.distributed
processes); writes the per-step losses and the parameter/optimizer shardings to --out as JSON, a
list with one entry per --mesh (several meshes run in turn in this process, each a fresh trainer in
its own WORKDIR/mMESH). Used by tests/test_sharding.py in subprocesses with fake CPU devices."""

import argparse
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]


def sharding_config(mesh=(1, 1, 1), steps=10, text="", **dist):
  from conftest import tiny_config
  c = tiny_config(train__steps=steps, train__log_every=1, train__checkpoint_every=10, train__warmup=2,
                  train__min_lr_ratio=1.0, train__eval_batch_size=16, train__batch_size=16)
  c.model.update(n_heads=8, d_model=32, d_ff=64)
  if text:  # the text task on a prepared corpus: windows of 16 tokens
    c.task.update(name="text", path=text, train_length=16, test_lengths=())
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.distributed.update(dist)
  return c


def train(workdir, mesh, steps, text="", **dist):
  """One trial on `mesh`: what the test compares (shardings of the initial state, then the losses)."""
  import jax

  from looped_models import sharding
  from rundir.logger import read_metrics
  from train.trainer import Trainer

  trainer = Trainer(sharding_config(mesh, steps, text, **dist), workdir)
  state = trainer.init_state()
  specs = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    name = sharding.path_str(path)
    expected = sharding.spec_for(name) if len(sharding.spec_for(name)) == leaf.ndim else ()
    shard_shape = leaf.addressable_shards[0].data.shape
    specs[name] = {"spec": [str(s) for s in leaf.sharding.spec], "expected": [str(s) for s in expected],
                   "shape": list(leaf.shape), "shard_shape": list(shard_shape)}
  result = trainer.run()
  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "devices": jax.device_count(), "status": result["status"], "specs": specs,
         "mesh": dict(trainer.mesh.shape)}
  if jax.process_index() == 0:
    out["losses"] = {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--mesh", action="append", help="data,fsdp,tensor; repeated: one run per mesh")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--coordinator", default="")
  p.add_argument("--nproc", type=int, default=1)
  p.add_argument("--pid", type=int, default=0)
  p.add_argument("--out", required=True)
  p.add_argument("--text", default="", help="a prepared corpus: train the text task on it")
  a = p.parse_args()
  meshes = [tuple(int(x) for x in m.split(",")) for m in a.mesh or ["1,1,1"]]
  dist = {}
  if a.coordinator:
    dist = dict(coordinator_address=a.coordinator, num_processes=a.nproc, process_id=a.pid)
  name = lambda m: "m" + "x".join(map(str, m))
  workdir = lambda m: a.workdir if len(meshes) == 1 else os.path.join(a.workdir, name(m))
  json.dump([train(workdir(m), m, a.steps, a.text, **dist) for m in meshes], open(a.out, "w"))


if __name__ == "__main__":
  main()
