"""The trainer end to end: learning, resume (incl. a real SIGKILL), W&B, status, bad input."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import tiny_config
from wandb_records import offline_run

from rundir.logger import read_metrics
from rundir.workdir import read_status
from train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(workdir, *overrides, wait=True):
  """`python -m train` on the tiny config, as a subprocess."""
  args = [sys.executable, "-m", "train", "--config", "tests/tiny_config.py", "--workdir", str(workdir),
          *overrides]
  env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def final_params(workdir, cfg):
  """Parameters of the newest checkpoint, as numpy leaves."""
  from rundir.checkpoint import Checkpointer
  tr = Trainer(cfg, str(workdir))
  ck = Checkpointer(str(workdir), 2)
  state, _ = ck.restore(ck.latest_step(), tr.abstract_state)
  ck.close()
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_tiny_prefix_or_learns_to_99_percent(tmp_path):
  cfg = tiny_config(train__steps=150, train__checkpoint_every=0, train__lr=3e-3)
  result = Trainer(cfg, str(tmp_path / "run")).run()
  assert result["status"] == "done"
  assert result["eval/len8/best_exact_match"] >= 0.99
  status = read_status(str(tmp_path / "run"))
  assert status["status"] == "done" and status["step"] == 150
  metrics = read_metrics(str(tmp_path / "run"))
  assert metrics[-1]["step"] == 150
  assert metrics[0]["train/loss"] > metrics[-1]["train/loss"]
  assert {"train/tokens_per_s", "train/lr", "train/grad_norm"} <= set(metrics[0])
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "150")


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  overrides = ["--config.train.steps=60", "--config.train.checkpoint_every=10"]
  done = cli(straight, *overrides)
  assert done.returncode == 0, done.stderr[-2000:]

  proc = cli(killed, *overrides, wait=False)
  deadline = time.time() + 240
  while not os.path.isdir(killed / "checkpoints" / "10"):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert read_status(str(killed))["status"] == "running"  # killed mid-run, nothing finalised
  resumed = cli(killed, *overrides)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  status = read_status(str(killed))
  assert status["status"] == "done" and status["resumed_from"] >= 10

  cfg = tiny_config(train__steps=60, train__checkpoint_every=10)
  for a, b in zip(final_params(straight, cfg), final_params(killed, cfg)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  loss = lambda d: [m["train/loss"] for m in read_metrics(str(d)) if m["step"] == 60][0]
  assert abs(loss(straight) - loss(killed)) <= 1e-6


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = cli(tmp_path / "run", "--config.train.steps=100000", "--config.train.checkpoint_every=0",
             wait=False)
  deadline = time.time() + 240
  while not os.path.exists(tmp_path / "run" / "metrics.jsonl") or os.path.getsize(
      tmp_path / "run" / "metrics.jsonl") == 0:
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  status = read_status(str(tmp_path / "run"))
  assert status["status"] == "interrupted"
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / str(status["step"]))


def test_offline_wandb_run_carries_config_and_summary(tmp_path):
  cfg = tiny_config(train__steps=10, train__checkpoint_every=0)
  cfg.wandb.mode = "offline"
  cfg.wandb.group, cfg.wandb.tags = "grp", ("a", "b")
  result = Trainer(cfg, str(tmp_path / "run")).run()
  run_id = read_status(str(tmp_path / "run"))["wandb_run_id"]
  run = offline_run(str(tmp_path / "wandb"), run_id)
  assert run["run"].run_group == "grp" and list(run["run"].tags) == ["a", "b"]
  assert run["run"].job_type == "train"
  assert run["config"]["model.d_model"] == 32 and run["config"]["task.name"] == "prefix_or"
  assert run["config"]["train.steps"] == 10
  assert run["summary"]["eval/len8/best_exact_match"] == pytest.approx(result["eval/len8/best_exact_match"])
  logged = read_metrics(str(tmp_path / "run"))
  assert run["summary"]["train/loss"] == pytest.approx(logged[-1]["train/loss"])
  assert [h["_step"] for h in run["history"]] == [m["step"] for m in logged]


def test_nan_loss_marks_run_diverged(tmp_path):
  cfg = tiny_config(train__steps=30, train__lr=1e30, train__grad_clip=1e30, train__warmup=0,
                    train__checkpoint_every=10)
  cfg.model.init_std = 50.0
  result = Trainer(cfg, str(tmp_path / "run")).run()
  assert result["status"] == "diverged" and result["exit_code"] == 3
  status = read_status(str(tmp_path / "run"))
  assert status["status"] == "diverged" and "diverged" in status["error"]
  # no checkpoint holds a non-finite state
  cks = os.listdir(tmp_path / "run" / "checkpoints") if os.path.isdir(tmp_path / "run" / "checkpoints") else []
  for step in (int(s) for s in cks if s.isdigit()):
    assert step < status["step"]


BAD_INPUTS = [  # (config key, bad value, the key the error must name)
    ("model.injection", "sideways", "model.injection"),
    ("model.norm", "weird", "model.norm"),
    ("task.name", "sorting", "task.name"),
    ("train.recurrence", "geometric", "train.recurrence"),
    ("model.block_size", 0, "model.block_size"),
    ("model.n_heads", 3, "model.d_model"),
    ("model.window", 0, "model.window"),
    ("task.test_lengths", (16, 64), "task.test_lengths"),
]


@pytest.mark.parametrize("name,value,key", BAD_INPUTS)
def test_bad_input_is_a_one_line_config_error_before_anything(tmp_path, name, value, key):
  from configs.errors import ConfigError
  cfg = tiny_config()
  section, field = name.split(".")
  cfg[section][field] = value
  with pytest.raises(ConfigError) as err:
    Trainer(cfg, str(tmp_path / "run"))
  assert key in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,value,key", [BAD_INPUTS[0], BAD_INPUTS[-1]])
def test_cli_bad_input_exit_2_one_line_nothing_written(tmp_path, name, value, key):
  workdir = tmp_path / "run"
  flag_value = ",".join(map(str, value)).join("()") if isinstance(value, tuple) else value
  out = cli(workdir, f"--config.{name}={flag_value}")
  assert out.returncode == 2
  lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and key in lines[0], out.stderr
  assert "allowed" in lines[0] or "max_len" in lines[0]
  assert not workdir.exists()


def test_workdir_with_other_model_shape_is_refused_untouched(tmp_path):
  workdir = tmp_path / "run"
  assert cli(workdir, "--config.train.steps=5").returncode == 0
  before = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(workdir) for p in fs}
  out = cli(workdir, "--config.model.d_model=48")
  assert out.returncode == 2 and "model.d_model" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  after = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(workdir) for p in fs}
  assert before == after


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
  workdir = tmp_path / "run"
  assert cli(workdir, "--config.train.steps=5", "--config.train.checkpoint_every=0").returncode == 0
  state_dir = workdir / "checkpoints" / "5" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  out = cli(workdir, "--config.train.steps=10")
  assert out.returncode == 2, out.stderr[-2000:]
  assert "corrupt" in out.stderr and len(out.stderr.strip().splitlines()) == 1
