"""Sharding and multi-host: meshes of fake CPU devices, sharding rules, two jax.distributed
processes on 127.0.0.1, restoring their checkpoint onto another mesh, and the mesh errors."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import fake_devices
from jax.sharding import PartitionSpec as P
from sharding_worker import sharding_config

from configs.errors import ConfigError
from looped_models import sharding
from rundir.logger import read_metrics
from train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")


def worker(tmp_path, name, meshes, devices, steps=10, workdir=None, **dist):
  """Start one worker process with `devices` fake CPU devices; it runs one trial per mesh in
  `meshes`, in turn (each in its own directory under the workdir when there are several)."""
  out = tmp_path / f"{name}.json"
  env = {**os.environ, "XLA_FLAGS": fake_devices(devices),
         "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, WORKER, "--workdir", str(workdir or tmp_path / name),
          *("--mesh=" + ",".join(map(str, m)) for m in meshes), "--steps", str(steps),
          "--out", str(out)]
  for k, v in dist.items():
    args += [f"--{k}", str(v)]
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out


def finish(proc, out):
  """The worker's results, one per mesh."""
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log[-3000:]
  return json.load(open(out))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Losses of the same trial on one device, in this process: 10 steps, and 20 uninterrupted."""
  tmp = tmp_path_factory.mktemp("ref")
  ten = Trainer(sharding_config(steps=10), str(tmp / "ten"))
  ten.run()
  twenty = Trainer(sharding_config(steps=20), str(tmp / "twenty"))
  twenty.run()
  losses = lambda d: {m["step"]: m["train/loss"] for m in read_metrics(d) if "train/loss" in m}
  return losses(str(tmp / "ten")), losses(str(tmp / "twenty"))


def assert_same_losses(got, want, steps):
  for s in steps:
    assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got[s], want[s])


def test_mesh_shape_resolution_and_errors():
  cfg = lambda d, f, t: sharding_config((d, f, t)).mesh
  assert sharding.mesh_shape(cfg(-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.mesh_shape(cfg(2, -1, 2), 8) == (2, 2, 2)
  for bad in ((3, 1, 1), (-1, -1, 1), (-1, 3, 1), (0, 1, 1)):
    with pytest.raises(ConfigError, match="mesh") as e:
      sharding.mesh_shape(cfg(*bad), 8)
    assert "\n" not in str(e.value)


def test_rules_cover_every_parameter_kind():
  assert sharding.spec_for("block/0/attn/query/kernel") == P("fsdp", "tensor")
  assert sharding.spec_for("block/0/attn/out/kernel") == P("tensor", "fsdp")
  assert sharding.spec_for("coda/0/mlp/gate/kernel") == P("fsdp", "tensor")
  assert sharding.spec_for("prelude/0/mlp/down/kernel") == P("tensor", "fsdp")
  assert sharding.spec_for("embed/embedding") == P(None, "tensor")
  assert sharding.spec_for("0/1/mu/embed/embedding") == P(None, "tensor")  # Adam moments follow
  assert sharding.spec_for("block/1/attn_norms/0/scale") == P()


def test_meshes_of_8_fake_devices_match_one_device(tmp_path, reference):
  ref10, _ = reference
  meshes = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
  results = finish(*worker(tmp_path, "meshes", meshes, 8))  # one process, the meshes in turn
  assert len(results) == len(meshes)
  for mesh, result in zip(meshes, results):
    assert result["devices"] == 8 and result["status"] == "done"
    assert list(result["mesh"].values()) == list(mesh)
    assert_same_losses({int(k): v for k, v in result["losses"].items()}, ref10, range(1, 11))
    # nothing replicated by accident: every leaf carries its rule's spec, and is really split
    d, f, t = mesh
    for name, info in result["specs"].items():
      assert info["spec"] == info["expected"], name
    q = result["specs"]["params/block/0/attn/query/kernel"]
    assert q["shard_shape"] == [32 // f, 32 // t]
    mu = [v for k, v in result["specs"].items() if k.endswith("mu/block/0/mlp/up/kernel")][0]
    assert mu["shard_shape"] == [32 // f, 64 // t]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_and_restore_on_another_mesh(tmp_path, reference):
  ref10, ref20 = reference
  workdir = tmp_path / "shared"
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [worker(tmp_path, f"p{i}", [(-1, 2, 1)], 2, workdir=workdir, coordinator=coordinator,
                  nproc=2, pid=i) for i in range(2)]
  results = [finish(*p)[0] for p in procs]
  assert [r["process_count"] for r in results] == [2, 2] and results[0]["devices"] == 4
  assert_same_losses({int(k): v for k, v in results[0]["losses"].items()}, ref10, range(1, 11))
  assert "losses" not in results[1]  # only process 0 writes
  assert os.path.isdir(workdir / "checkpoints" / "10")

  # the checkpoint written by 2 processes on a (2, 2, 1) mesh continues in 1 process on (1, 2, 4)
  [resumed] = finish(*worker(tmp_path, "resume", [(1, 2, 4)], 8, steps=20, workdir=workdir))
  assert resumed["process_count"] == 1 and resumed["status"] == "done"
  assert_same_losses({int(k): v for k, v in resumed["losses"].items()}, ref20, range(11, 21))


@pytest.mark.parametrize("overrides,key", [
    (["--config.mesh.data=3"], "mesh"),
    (["--config.train.batch_size=12", "--config.mesh.data=8"], "train.batch_size"),
    (["--config.mesh.data=1", "--config.mesh.tensor=8", "--config.model.n_heads=4",
      "--config.model.d_model=32"], "model.n_heads"),
    (["--config.mesh.data=1", "--config.mesh.tensor=8", "--config.model.n_heads=8",
      "--config.model.d_model=32", "--config.model.d_ff=36"], "model.d_ff"),
])
def test_mesh_errors_are_one_line_before_compile(tmp_path, overrides, key):
  env = {**os.environ, "XLA_FLAGS": fake_devices(8),
         "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}
  out = subprocess.run([sys.executable, "-m", "train", "--config", "tests/tiny_config.py", "--workdir",
                        str(tmp_path / "run"), *overrides], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(out.stderr.strip().splitlines()) == 1 and key in out.stderr
  assert not (tmp_path / "run").exists()
