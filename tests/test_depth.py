"""The depth comparison (eval/depth.py, bench/depth.py) on a tiny model of a tiny reasoning corpus:
teacher-forced decoding through the KV cache scores what the full forward pass scores, thresholds
are chosen on the calibration half alone, and the record holds what bench.depth promises."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import text_config, write_texts

from eval import classes, depth
from looped_models.stepper import Stepper
from rundir.run import open_run
from tasks.corpus import prepare
from tasks.text import TextData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A reasoning corpus (1-3 steps, one lookup per problem) and a model trained on it briefly."""
  from train.trainer import Trainer
  tmp = tmp_path_factory.mktemp("depth")
  write_texts(tmp / "texts")
  prepare([str(tmp / "texts" / "*.txt")], str(tmp / "corpus"), val_fraction=0.34, progress=False,
          synthetic="var_chain:hops=1-3,extrapolate=4-4,per_doc=4,lookups=1", synthetic_ratio=0.6)
  cfg = text_config(str(tmp / "corpus"), train__steps=30, train__lr=1e-2)
  cfg.task.train_length = cfg.model.max_len = 48
  Trainer(cfg, str(tmp / "run")).run()
  return str(tmp / "run")


def test_decoding_scores_what_the_forward_pass_scores(run):
  r = open_run(run)
  data = TextData(r.cfg.task.path)
  w, n_problem = depth.decode_windows(r, data, "val", count=6, prose=2)
  assert n_problem == 6 and len(w.tokens) == 8 and w.answers
  assert all(i < n_problem for i, *_ in w.answers)
  stepper = Stepper(r.graphdef, r.params, classes._read, seed=r.cfg.train.seed, mesh=r.mesh)
  correct = classes.score(stepper, w, 3, batch_size=8)["correct"][2:3]  # at R = 3
  got = depth.decode(depth.Generator(r.model(), r.mesh), w, iterations=3, exit=None, slots=4)
  assert 5.0 < got["token_accuracy"] == pytest.approx(100.0 * correct.mean())
  assert got["answer_accuracy"] == pytest.approx(classes.answer_accuracy(w, correct)["all"][0])
  assert got["mean_iterations"] == 3.0 and set(got["by_class"]) >= {"problem", "answer_1"}


def test_bench_depth_chooses_thresholds_on_the_calibration_half_and_writes_its_record(run, tmp_path):
  r = open_run(run)
  w, n = depth.decode_windows(r, TextData(r.cfg.task.path), "val", 6, 2)
  cal, held = (depth.half(w, n, k) for k in depth.HALVES)
  rows = lambda x: {bytes(t.astype(np.uint16)) for t in x.tokens}
  assert len(cal.tokens) + len(held.tokens) == len(w.tokens) and not rows(cal) & rows(held)
  out = tmp_path / "depth.json"
  p = subprocess.run([sys.executable, "-m", "bench.depth", "--workdir", run, "--out", str(out),
                      "--windows", "6", "--prose", "2", "--iterations", "3", "--batch-sizes", "1,2",
                      "--grids", "fixed_point=3e-1,1e-3;argmax_stable=1", "--dry-run"],
                     cwd=ROOT, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert p.returncode == 0, p.stderr[-2000:]
  rec = json.loads(out.read_text())
  assert 1 <= rec["r_small"] <= 3 and set(rec["fixed"]["tokens_per_s"]) == {"1", "2"}
  assert set(rec["criteria"]) == {"fixed_point", "argmax_stable"}
  floor = rec["fixed"]["calibration"]["answer_accuracy"] - rec["tolerance_points"]
  for c, v in rec["criteria"].items():
    ok = [g for g in v["grid"] if g["answer_accuracy"] >= floor]
    assert v["threshold"] == (min(ok, key=lambda g: g["mean_iterations"])["threshold"] if ok else None)
  a = rec["adaptive"]
  if a is not None:  # the criterion with the fewest iterations on the calibration half
    best = min((v["calibration"]["mean_iterations"], c) for c, v in rec["criteria"].items()
               if v["threshold"] is not None)[1]
    assert a["criterion"] == best and set(a["tokens_per_s"]) == {"1", "2"}
    assert a["mean_iterations"] <= 3 and a["answer_accuracy"] == rec["criteria"][best][
        "held_out"]["answer_accuracy"]
  for fig in ("accuracy", "iterations", "pareto"):
    assert (tmp_path / f"depth_{fig}.png").stat().st_size > 1000
  assert "## Depth that pays" in p.stdout
  again = subprocess.run([sys.executable, "-m", "bench.depth", "--workdir", run, "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert again.returncode != 0 and "exists" in again.stderr and json.loads(out.read_text()) == rec


def test_eval_classes_writes_its_record_and_never_overwrites(run):
  cmd = [sys.executable, "-m", "eval", "classes", "--workdir", run, "--iterations", "3"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  first, second = (subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                   for _ in range(2))
  assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
  assert "R_small = " in first.stdout and "val: answer accuracy by iterations 1..3" in first.stdout
  where = [line.split("see ")[-1] for p in (first, second) for line in p.stdout.splitlines()
           if "see " in line]
  assert len(set(where)) == 2 and all(os.path.exists(w) for w in where)  # eval/30/ then eval/30.1/
  rec = json.loads(open(where[0]).read())
  assert rec["iterations"] == [1, 2, 3] and set(rec["splits"]) == {"val", "extrapolate"}
  assert set(rec["splits"]["extrapolate"]["answer_accuracy"]["by_steps"]) == {"1", "4"}
  assert os.path.exists(os.path.join(os.path.dirname(where[0]), "plots", "classes_accuracy.png"))
  bad = subprocess.run([*cmd[:4], "/nonexistent/run"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_threshold_is_the_one_with_the_fewest_iterations_that_keeps_accuracy():
  rows = [{"threshold": t, "answer_accuracy": a, "mean_iterations": m}
          for t, a, m in ((1e-1, 60.0, 2.0), (1e-2, 79.5, 3.5), (1e-3, 80.0, 5.0), (1e-4, 80.0, 8.0))]
  assert depth.choose(rows, floor=79.0)["threshold"] == 1e-2
  assert depth.choose(rows, floor=80.0)["threshold"] == 1e-3
  assert depth.choose(rows, floor=81.0) is None
