"""Opening a run (rundir.run.open_run): the config it finished with, parameters only, sharded onto a
mesh; a two-process evaluation that equals the one-process one; errors."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import fake_devices, tiny_config

from rundir.run import load_run_config, open_run
from rundir.workdir import RunDirError
from train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "eval_worker.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run = str(tmp_path_factory.mktemp("run") / "tiny")
  cfg = tiny_config(train__steps=20, train__checkpoint_every=10, train__eval_every=-1)
  cfg.model.update(n_heads=4, d_model=32, d_ff=64)
  cfg.task.test_lengths = ()  # evaluated at the train length only (one program per evaluation)
  Trainer(cfg, run).run()
  return run


def test_open_run_restores_parameters_of_any_step_and_the_finished_config(trained, tmp_path):
  run = open_run(trained)
  assert run.step == 20 and run.tokenizer is None and run.cfg.train.steps == 20
  assert set(run.params) >= {"embed", "block", "prelude", "coda"}
  older = open_run(trained, step=10)
  a, b = run.params["embed"]["embedding"], older.params["embed"]["embedding"]
  assert a.shape == b.shape and not np.allclose(np.asarray(a), np.asarray(b))
  out = run.model()(np.zeros((2, 8), np.int32), 3).logits_BSV
  assert out.shape == (2, 8, run.cfg.model.vocab_size)
  # a resumed run whose config changed is read with its newest config
  copy = str(tmp_path / "copy")
  shutil.copytree(trained, copy)
  newer = json.load(open(os.path.join(copy, "config.json")))
  newer["train"]["steps"] = 30
  json.dump(newer, open(os.path.join(copy, "config.1.json"), "w"))
  assert load_run_config(copy).train.steps == 30


def test_open_run_errors_are_one_line(trained, tmp_path):
  for call, message in [(lambda: open_run(str(tmp_path / "missing")), "does not exist"),
                        (lambda: open_run(trained, step=7), "no checkpoint at step 7; it has [10, 20]"),
                        (lambda: open_run(str(tmp_path)), "holds no config.json")]:
    with pytest.raises(RunDirError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
      call()
    assert "\n" not in str(e.value)


def test_two_process_evaluation_halting_and_generation_on_an_fsdp_mesh_equal_one_process(trained, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  shutil.copytree(trained, one)
  shutil.copytree(trained, two)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

  def start(workdir, devices, mesh, **dist):
    env = {**os.environ, "XLA_FLAGS": fake_devices(devices),
           "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, WORKER, "--workdir", workdir, f"--mesh={mesh}",
            "--out", os.path.join(str(tmp_path), f"{os.path.basename(workdir)}{dist.get('pid', 0)}.json")]
    for k, v in dist.items():
      args += [f"--{k}", str(v)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  procs = [start(one, 1, "-1,1,1")] + [
      start(two, 2, "2,2,1", coordinator=f"127.0.0.1:{port}", nproc=2, pid=i) for i in range(2)]
  for p in procs:
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
  ref = json.load(open(tmp_path / "one0.json"))
  got = [json.load(open(tmp_path / f"two{i}.json")) for i in range(2)]
  assert [g["process_count"] for g in got] == [2, 2] and got[0]["devices"] == 4
  # parameters are sharded by the training rules (FSDP over 2), not copied whole to every device
  assert "fsdp" in got[0]["specs"]["['block'][0]['attn']['query']['kernel']"]
  from rundir.outputs import latest
  fp = lambda d: json.load(open(latest(d, "fixed_points.json")))
  want, have = fp(one), fp(two)
  assert have["summary"]["fp/regime"] == want["summary"]["fp/regime"]
  for key, value in want["summary"].items():
    if isinstance(value, float):
      assert have["summary"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  np.testing.assert_allclose(np.array(have["report"]["series"]["successive_change"], float),
                             np.array(want["report"]["series"]["successive_change"], float),
                             rtol=1e-4, atol=1e-7)
  # adaptive halting over the same mesh: every process runs its rows, the figures are the same
  assert got[0]["halting_rows"] == got[1]["halting_rows"] and got[0]["R_fixed"] == ref["R_fixed"]
  for a, b in zip(got[0]["halting_rows"], ref["halting_rows"]):
    assert (a["criterion"], a["threshold"]) == (b["criterion"], b["threshold"])
    assert a["exact_match"] == pytest.approx(b["exact_match"], abs=1e-9)
    assert a["mean_iterations"] == pytest.approx(b["mean_iterations"], rel=1e-6)
  written = [os.path.join(d, f) for d, _, files in os.walk(two) for f in files if f == "halting.json"]
  assert len(written) == 1  # by process 0 alone
  # generation on the same mesh (slots split over the data axes): the same tokens, iterations, logits
  want = ref["generated"]
  for g in got:
    assert g["generated"]["tokens"] == want["tokens"]
    assert g["generated"]["iterations"] == want["iterations"]
    for a, b in zip(g["generated"]["logits"], want["logits"]):
      np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_cloud_workdir_is_never_made_local_and_an_unreachable_one_is_one_line(tmp_path):
  from rundir.workdir import path
  assert str(path("gs://bucket/runs/x")) == "gs://bucket/runs/x"
  assert str(path("gs://bucket/runs/x") / "checkpoints") == "gs://bucket/runs/x/checkpoints"
  assert str(path("runs/x")) == os.path.abspath("runs/x")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  proc = subprocess.run([sys.executable, "-m", "train", "--config", os.path.join(ROOT, "tests", "tiny_config.py"),
                         "--workdir", "gs://no-such-bucket-looped-test/x"], cwd=str(cwd),
                        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: cannot reach gs://no-such-bucket-looped-test/x")
  assert os.listdir(cwd) == []  # no local directory named gs:


def test_pod_preset_two_processes_of_four_devices_train_as_one_process_of_eight(tmp_path):
  """configs/sweeps/tpu_pod.py's first steps on 8 fake devices in 2 processes with the pod's mesh
  (data x fsdp 4 x tensor 2), bf16, truncated backprop and accumulation, only the sizes shrunk: the
  losses equal those of one process holding all 8 devices (same mesh, same global batches)."""
  from test_text import write_texts

  from tasks import corpus
  write_texts(tmp_path / "texts", n_docs=4)
  corpus.prepare([str(tmp_path / "texts" / "*.txt")], str(tmp_path / "corpus"), val_fraction=0.25,
                 progress=False)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  shrink = ["--config.model.d_model=64", "--config.model.n_heads=4", "--config.model.d_ff=128",
            "--config.model.n_prelude=1", "--config.model.block_size=2", "--config.model.n_coda=1",
            "--config.model.max_len=32", "--config.task.train_length=32", "--config.train.steps=2",
            "--config.train.batch_size=16", "--config.train.eval_batch_size=8",
            "--config.train.max_recurrence=6", "--config.train.backprop_depth=2",
            "--config.train.log_every=1", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=-1", "--config.wandb.mode=disabled",
            f"--config.task.path={tmp_path / 'corpus'}"]

  def train(workdir, devices: int, *extra):
    env = {**os.environ, "XLA_FLAGS": fake_devices(devices),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}
    return subprocess.Popen([sys.executable, "-m", "train", "--config", "configs/sweeps/tpu_pod.py",
                             "--workdir", str(workdir), *shrink, *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  pod, one = tmp_path / "pod", tmp_path / "one"
  procs = [train(pod, 4, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
           for i in range(2)] + [train(one, 8)]
  for p in procs:
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
  cfg = json.load(open(pod / "config.json"))
  assert cfg["mesh"] == {"data": -1, "fsdp": 4, "tensor": 2}
  assert cfg["model"]["dtype"] == "bfloat16" and cfg["train"]["grad_accum"] == 2
  from rundir.logger import read_metrics
  losses = {w: [m["train/loss"] for m in read_metrics(str(w)) if "train/loss" in m] for w in (pod, one)}
  assert len(losses[pod]) == 2 and all(np.isfinite(losses[pod]))
  np.testing.assert_allclose(losses[pod], losses[one], rtol=1e-3)
  assert os.path.isdir(pod / "checkpoints" / "2")


def test_capture_sends_a_bounded_number_of_attention_rows(trained):
  from eval.capture import Capture
  run = open_run(trained)
  tokens = np.zeros((2, 16), np.int32)
  batch = {"inputs": tokens, "targets": tokens, "mask": np.ones((2, 16), np.float32)}
  full = next(Capture(run.graphdef, run.params, chunk=2).run(batch, 2, attention=True))[1]
  rows = next(Capture(run.graphdef, run.params, chunk=2, attention_rows=4).run(batch, 2, attention=True))[1]
  assert full.shape[-2:] == (16, 16) and rows.shape[-2:] == (4, 16)
  np.testing.assert_allclose(rows, full[..., [0, 5, 10, 15], :], rtol=1e-6)


def test_path_independence_runs_the_same_tokens_from_random_initial_states(trained, tmp_path):
  from eval.evaluate import evaluate
  from rundir.outputs import latest
  run = str(tmp_path / "copy")
  shutil.copytree(trained, run)
  cfg = load_run_config(run)
  cfg.eval.path_starts = 2
  summary = evaluate(cfg, run, iterations=3, batch_size=2, chunk=3, log_wandb=False, progress=False)
  assert summary["fp/path/starts"] == 2
  assert -1.0 <= summary["fp/path/min_cosine"] <= summary["fp/path/mean_cosine"] <= 1.0 + 1e-9
  # three iterations do not bring random starts onto the model's own path: they really differ
  assert summary["fp/path/min_cosine"] < 1.0 - 1e-4
  assert 0.0 <= summary["fp/path/same_point"] <= 1.0
  assert "path independence: from 2 random initial states" in open(
      os.path.join(os.path.dirname(latest(run, "fixed_points.json")), "fixed_points.md")).read()
