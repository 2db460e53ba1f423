"""The evaluator on real models: capture through the model's own forward pass, streaming equals the
materialised analysis, accuracy curves agree with the trainer, CLI end to end, bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from wandb_records import offline_run

from eval.capture import Capture
from eval.evaluate import evaluate
from eval.fixed_points import analyze_stream, analyze_trajectory
from eval.suite import evaluate_run
from eval.summary import plateau
from looped_models.model import init_model
from rundir.config import resolve
from rundir.outputs import latest
from rundir.workdir import read_status
from tasks.metrics import accuracy_counts, fractions
from tasks.synthetic import get_task, make_batch
from train.step import make_eval_step
from train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_capture(R_chunk=3, **overrides):
  cfg = resolve(tiny_config(**overrides))
  graphdef, params = init_model(cfg.model, 0)
  b = make_batch(get_task("prefix_or"), seed=0, step=0, batch_size=4, min_length=8, max_length=8,
                 stream=1)
  b.pop("lengths")
  return cfg, graphdef, params, b, Capture(graphdef, params, chunk=R_chunk)


def test_capture_is_the_models_own_trajectory():
  cfg, graphdef, params, batch, cap = setup_capture(model__block_size=2)
  R = 7
  chunks = list(cap.run(batch, R, attention=True))
  states = np.concatenate([c[0] for c in chunks])
  att = np.concatenate([c[1] for c in chunks])
  from flax import nnx
  out = nnx.merge(graphdef, params)(batch["inputs"], R, return_states=True, return_attention=True)
  np.testing.assert_allclose(states, out.states_RkBSD, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(att, out.attention_RkBHSS, atol=1e-6)
  assert states.shape[:2] == (R, 2)


def test_streaming_equals_analysis_of_materialised_states():
  _, _, _, batch, cap = setup_capture(model__block_size=2)
  R = 11
  streamed = analyze_stream(cap.chunks(batch, R, attention=True))
  parts = list(cap.run(batch, R, attention=True))
  full = analyze_trajectory(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  a, b = streamed.to_dict(), full.to_dict()
  assert a["regime"] == b["regime"]
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    if isinstance(x, float):
      assert x == pytest.approx(y, rel=1e-6, abs=1e-9)
    else:
      assert x == y


@pytest.mark.parametrize("state_init", ["embed", "normal"])
def test_accuracy_curve_agrees_with_the_trainers_eval_step(state_init):
  cfg, graphdef, params, batch, cap = setup_capture(model__state_init=state_init)
  curve = cap.accuracy_curve(batch, 6)
  step = jax.jit(make_eval_step(graphdef, recurrences=(4, 1, 6), seed=0))
  per_r = jax.device_get(step(params, batch))  # one pass of 6 iterations, read at 4, 1 and 6
  model = nnx.merge(graphdef, params)
  for i, r in enumerate((4, 1, 6)):
    counts = {k: v[i] for k, v in per_r.items()}
    assert curve["per_position"][r - 1] == pytest.approx(fractions(counts)["per_position"])
    # ... and what a separate forward pass of r iterations predicts
    alone = model(jnp.asarray(batch["inputs"]), r, key=jax.random.key(0)).logits_BSV.argmax(-1)
    assert fractions(counts) == fractions(accuracy_counts(np.asarray(alone), batch["targets"], batch["mask"]))


def test_plateau():
  assert plateau(np.array([0.1, 0.5, 0.9, 0.9, 0.9])) == 3
  assert plateau(np.array([1.0, 1.0])) == 1
  assert plateau(np.array([0.2, 0.9, 0.8])) == 3


def test_end_to_end_trained_model(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = tiny_config(train__steps=120, train__checkpoint_every=0)
  cfg.wandb.mode = "offline"
  Trainer(cfg, workdir).run()
  summary = evaluate(resolve(cfg), workdir, iterations=16, batch_size=4, progress=False)
  # every token at a fixed point; with one layer in the block (k=1) that is "degenerate", not cyclic
  assert summary["fp/regime"] == "degenerate"
  out = os.path.dirname(latest(workdir, "fixed_points.json"))
  assert out == os.path.join(workdir, "eval", "120")  # under the step it measured
  result = json.load(open(os.path.join(out, "fixed_points.json")))
  assert result["summary"]["fp/regime"] == summary["fp/regime"] and result["iterations"] == 16
  assert len(result["report"]["series"]["successive_change"]) == 16
  assert summary["acc/len8/best"] >= 0.99  # trained to its length; curve over 1..R iterations
  assert len(result["accuracy_curves"]["16"]) == 16
  md = open(os.path.join(out, "fixed_points.md")).read()
  assert md.startswith(f"# Fixed points: **{summary['fp/regime']}**")
  for name in ("convergence", "distance", "attention_similarity", "trajectory_pca", "stage_metrics",
               "accuracy"):
    assert os.path.getsize(os.path.join(out, "plots", f"{name}.png")) > 1000
  run = offline_run(str(tmp_path / "wandb"), read_status(workdir)["wandb_run_id"])
  assert run["summary"]["fp/regime"] == summary["fp/regime"]
  assert "fp/layer1/converged_at" in run["summary"] and "train/loss" in run["summary"]

  # A trial's whole evaluation: fixed points and halting on the same predictions, the run opened
  # once, one W&B record for both (into the same run).
  both = evaluate_run(resolve(cfg), workdir, halting=True, iterations=16, batch_size=4, progress=False)
  assert both["fp/regime"] == summary["fp/regime"] and both["acc/len8/best"] == summary["acc/len8/best"]
  for name in ("fixed_points.json", "halting.json"):  # beside each other, the first evaluation kept
    assert latest(workdir, name) == os.path.join(workdir, "eval", "120.1", name)
  assert json.load(open(latest(workdir, "halting.json")))["R"] == 16
  sessions = run["parts"]
  run = offline_run(str(tmp_path / "wandb"), read_status(workdir)["wandb_run_id"])
  assert run["parts"] == sessions + 1  # attached once for both
  assert run["summary"]["halting/R_fixed"] == both["halting/R_fixed"]
  assert run["summary"]["fp/regime"] == both["fp/regime"] and "train/loss" in run["summary"]


def cli(*args):
  env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}
  return subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_random_init_control(tmp_path):
  workdir = tmp_path / "ri"
  out = cli("--config", "tests/tiny_config.py", "--init", "--workdir", str(workdir), "--iterations", "12")
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.load(open(latest(str(workdir), "fixed_points.json")))
  assert result["init"] is True and result["step"] == 0
  assert result["summary"]["fp/regime"] == "degenerate"  # the k=1 block at init converges too


@pytest.mark.parametrize("case", ["missing", "no_checkpoint", "iterations", "corrupt", "init_on_trained"])
def test_cli_bad_input_is_one_line(tmp_path, case):
  workdir = tmp_path / "run"
  args = ["--workdir", str(workdir)]
  if case in ("corrupt", "init_on_trained"):
    cfg = tiny_config(train__steps=3, train__checkpoint_every=0)
    Trainer(cfg, str(workdir)).run()
    if case == "corrupt":
      for root, _, files in os.walk(workdir / "checkpoints" / "3" / "state"):
        for f in files:
          open(os.path.join(root, f), "wb").write(b"junk")
    else:
      args += ["--config", "tests/tiny_config.py", "--init"]
  elif case == "no_checkpoint":
    workdir.mkdir()
    json.dump(resolve(tiny_config()).to_dict(), open(workdir / "config.json", "w"))
  elif case == "iterations":
    args += ["--config", "tests/tiny_config.py", "--init", "--iterations", "2"]
  before = sorted(os.listdir(workdir)) if workdir.exists() else None
  out = cli(*args)
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:")
  assert (sorted(os.listdir(workdir)) if workdir.exists() else None) == before
