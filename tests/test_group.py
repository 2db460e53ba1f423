"""Random-init controls evaluated as one vmapped group (eval/group.py) and run so by the sweep runner."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config

from configs.errors import ConfigError
from eval.evaluate import evaluate
from eval.group import evaluate_group, groupable, shape_key
from rundir import outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 12


def control(**overrides):
  """A random-init control of the tiny model: a 2-layer block, no prelude or coda."""
  return tiny_config(**{**dict(train__steps=0, task__test_lengths=(), model__n_prelude=0,
                                model__n_coda=0, model__block_size=2, eval__iterations=R,
                                eval__batch_size=2, eval__chunk=5, eval__vmap_trials=True),
                         **overrides})


def test_a_group_gives_each_trial_its_own_evaluation(tmp_path):
  """Three models (two seeds, two init scales) in one vmapped group: each trial's analysis equals the
  ordinary evaluation of that trial alone (same tokens, same parameters, same detector)."""
  cfgs = [control(train__seed=0), control(train__seed=1), control(train__seed=1, model__init_std=0.3,
                                                                  model__embed_std=0.05)]
  dirs = [str(tmp_path / f"g{i}") for i in range(3)]
  seen = []
  summaries = evaluate_group(cfgs, dirs, memory_bytes=1, on_done=lambda i, wall: seen.append(i))
  assert seen == [0, 1, 2]  # memory_bytes=1: one model at a time, its trajectory streamed twice
  summaries_2 = evaluate_group(cfgs, [str(tmp_path / f"h{i}") for i in range(3)])  # all three at once
  for i, (cfg, wd) in enumerate(zip(cfgs, dirs)):
    alone = str(tmp_path / f"alone{i}")
    evaluate(cfg, alone, init=True, progress=False, log_wandb=False)
    ref = json.load(open(outputs.latest(alone, "fixed_points.json")))
    got = json.load(open(outputs.latest(wd, "fixed_points.json")))
    assert got["init"] and got["iterations"] == R and got["group"]["trials"] == 3
    assert got["summary"]["fp/regime"] == ref["summary"]["fp/regime"] == summaries[i]["fp/regime"]
    assert summaries_2[i]["fp/regime"] == summaries[i]["fp/regime"]
    for name in ("successive_change", "residual_norm", "distance_cos"):
      a = np.array(got["report"]["series"][name], dtype=float)
      b = np.array(ref["report"]["series"][name], dtype=float)
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6, err_msg=name)
    assert got["report"]["series"]["attention_change"] is None  # no attention metrics in a group
    assert os.path.exists(os.path.join(wd, "config.json"))
    assert "Plots:" not in open(os.path.join(os.path.dirname(outputs.latest(wd, "fixed_points.json")),
                                             "fixed_points.md")).read()
  # the init scale changes the trajectory: the third model is not the second
  a, b = (json.load(open(outputs.latest(d, "fixed_points.json")))["report"]["series"]["residual_norm"]
          for d in dirs[1:])
  assert not np.allclose(np.array(a, float), np.array(b, float))


def test_what_cannot_be_grouped_is_refused(tmp_path):
  assert groupable(control().to_dict())
  assert not groupable(control(train__steps=5).to_dict())
  assert not groupable(control(eval__path_starts=2).to_dict())
  assert shape_key(control(train__seed=3, model__init_std=0.1).to_dict()) == shape_key(control().to_dict())
  assert shape_key(control(model__norm="peri").to_dict()) != shape_key(control().to_dict())
  with pytest.raises(ConfigError, match="cannot share one program"):
    evaluate_group([control(), control(model__norm="peri")], [str(tmp_path / "a"), str(tmp_path / "b")])
  with pytest.raises(ConfigError, match="only random-init controls"):
    evaluate_group([control(train__steps=5)], [str(tmp_path / "c")])
  with pytest.raises(ConfigError, match="eval.iterations"):
    evaluate_group([control(eval__iterations=2)], [str(tmp_path / "d")])
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "d")


SWEEP = '''
from conftest import tiny_config

def get_config():
  c = tiny_config(train__steps=0, task__test_lengths=(), model__n_prelude=0, model__n_coda=0,
                  model__block_size=2, eval__iterations=6, eval__batch_size=2, eval__vmap_trials=True)
  c.wandb.mode = "offline"
  return c

def get_hyper(h):
  return h.product([h.sweep("model.norm", ["pre", "peri"]), h.sweep("model.init_std", [0.0, 0.1]),
                    h.sweep("train.seed", [0, 1])])
'''


def test_the_runner_runs_each_cell_as_one_process_and_reports_the_map(tmp_path):
  sweep = tmp_path / "vmapped.py"
  sweep.write_text(SWEEP)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
  out = subprocess.run([sys.executable, "-m", "sweeps", "--config", str(sweep), "--workdir",
                        str(tmp_path / "runs"), "--parallel", "2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  root = tmp_path / "runs" / "vmapped"
  records = {d.name: json.load(open(d / "status.json")) for d in root.iterdir() if (d / "status.json").exists()}
  assert len(records) == 8 and all(r["status"] == "done" for r in records.values())
  for norm in ("pre", "peri"):  # one process per norm: its four trials share the pid
    assert len({r["pid"] for r in records.values() if r["overrides"]["model.norm"] == norm}) == 1
  assert len({r["pid"] for r in records.values()}) == 2
  for name in records:
    assert outputs.latest(str(root / name), "fixed_points.json")
    assert "done" in open(root / name / "trial.log").read()
  assert (root / "report_phase.png").exists() and "report.html" in os.listdir(root)
