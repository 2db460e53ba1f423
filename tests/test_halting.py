"""Adaptive halting: frozen tokens are exactly replayable, known fixed points halt where expected,
a zero threshold is fixed inference, bad input is one line, and the evaluation writes its files."""

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

from configs.errors import ConfigError
from eval.halting import evaluate_halting, halting_summary
from eval.halting_rows import SUMMARY_FIGURES, oracle_exits
from looped_models.halting import CRITERIA, halt
from looped_models.model import init_model
from rundir.config import resolve
from rundir.outputs import latest
from rundir.workdir import read_status
from tasks.synthetic import get_task, make_batch
from train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_and_tokens(batch=4, length=12, **overrides):
  cfg = resolve(tiny_config(**overrides))
  graphdef, params = init_model(cfg.model, 0)
  b = make_batch(get_task("prefix_or"), seed=0, step=0, batch_size=batch, min_length=length,
                 max_length=length, stream=1)
  return graphdef, params, jnp.asarray(b["inputs"])


def replay(graphdef, params, tokens_BS, exit_BS, iterations):
  """Token i updated by model.block_step at iterations 1..exit_i only, frozen afterwards."""
  model = nnx.merge(graphdef, params)
  ctx = model.context(tokens_BS.shape[1])
  e_BSD = model.encode(tokens_BS, ctx)
  s_BSD = model.initial_state(e_BSD)
  step = jax.jit(lambda p, s, e: nnx.merge(graphdef, p).block_step(s, e, ctx)[0])
  for t in range(1, iterations + 1):
    s_BSD = jnp.where((t <= exit_BS)[..., None], step(params, s_BSD, e_BSD), s_BSD)
  return s_BSD, model.decode(s_BSD, ctx)


@pytest.mark.parametrize("criterion,grid,causal", [("fixed_point", (1e-2, 3e-2, 3e-3), True),
                                                   ("cosine", (1e-3, 1e-4, 1e-5), False)])
def test_frozen_tokens_equal_running_each_to_its_exit(criterion, grid, causal):
  graphdef, params, tokens = model_and_tokens(model__block_size=2, model__init_std=0.2)
  for thr in grid:  # a threshold at which tokens exit at several different iterations
    out = jax.jit(lambda p, t: halt(nnx.merge(graphdef, p), t, criterion=criterion, threshold=thr,
                                    max_iters=24, causal=causal))(params, tokens)
    exits = np.unique(np.asarray(out.exit_BS))
    if len(exits[exits < 24]) >= 2:
      break
  else:
    pytest.fail(f"no {criterion} threshold in {grid} spreads the exits: {exits}")
  ex = np.asarray(out.exit_BS)
  assert int(out.iterations) == ex.max() and exits.min() >= 2
  assert (np.diff(ex, axis=1) >= 0).all() if causal else (np.diff(ex, axis=1) < 0).any()
  s_BSD, logits_BSV = replay(graphdef, params, tokens, out.exit_BS, int(out.iterations))
  np.testing.assert_allclose(out.state_BSD, s_BSD, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out.logits_BSV, logits_BSV, atol=1e-5, rtol=1e-5)


def test_per_sequence_exit_with_slots_gives_the_same_outputs():
  graphdef, params, tokens = model_and_tokens(batch=7, model__init_std=0.2)
  model = nnx.merge(graphdef, params)
  whole = halt(model, tokens, criterion="fixed_point", threshold=3e-2, max_iters=20)
  ex = np.asarray(whole.exit_BS)
  assert len(np.unique(ex.max(1))) >= 2  # sequences finish at different iterations
  streamed = halt(model, tokens, criterion="fixed_point", threshold=3e-2, max_iters=20, slots=3)
  np.testing.assert_array_equal(streamed.exit_BS, ex)
  np.testing.assert_allclose(streamed.logits_BSV, whole.logits_BSV, atol=1e-5, rtol=1e-5)
  assert int(whole.iterations) == ex.max()
  assert int(streamed.iterations) < ex.max(1).sum()  # 3 slots: less than one sequence at a time


def identity_block(injection="none", norm="pre"):
  """A model whose block adds nothing: attention and MLP output projections zeroed."""
  graphdef, params, tokens = model_and_tokens(model__injection=injection, model__norm=norm)
  for layer in params["block"].values():
    layer["attn"]["out"]["kernel"] = jnp.zeros_like(layer["attn"]["out"]["kernel"])
    layer["mlp"]["down"]["kernel"] = jnp.zeros_like(layer["mlp"]["down"]["kernel"])
  return graphdef, params, tokens


def test_constant_block_halts_at_the_first_comparison():
  graphdef, params, tokens = identity_block()
  model = nnx.merge(graphdef, params)
  for criterion, threshold, expected in [("fixed_point", 1e-3, 2), ("kl", 1e-6, 2), ("argmax_stable", 3, 4)]:
    out = halt(model, tokens, criterion=criterion, threshold=threshold, max_iters=16)
    assert (np.asarray(out.exit_BS) == expected).all() and int(out.iterations) == expected, criterion


def test_contraction_halts_where_its_relative_change_falls_below_eps():
  # s_t = rho * s_{t-1} + e (identity block, concat injection W = [rho I; I]), s_0 = e, so
  # s_t = e (1 - rho^(t+1)) / (1 - rho) and the relative change is rho^t (1 - rho) / (1 - rho^(t+1)).
  rho, eps = 0.25, 1e-3
  graphdef, params, tokens = identity_block(injection="concat", norm="none")
  d = params["injection"]["proj"]["kernel"].shape[1]
  params["injection"]["proj"]["kernel"] = jnp.concatenate([rho * jnp.eye(d), jnp.eye(d)])
  t = np.arange(2, 40)
  rel = rho ** t * (1 - rho) / (1 - rho ** (t + 1))
  expected = int(t[np.argmax(rel < eps)])
  assert expected == 5
  out = halt(nnx.merge(graphdef, params), tokens, criterion="fixed_point", threshold=eps, max_iters=40)
  assert (np.asarray(out.exit_BS) == expected).all() and int(out.iterations) == expected


def test_zero_threshold_is_fixed_inference():
  graphdef, params, tokens = model_and_tokens(model__block_size=2)
  model = nnx.merge(graphdef, params)
  fixed_BSV = model(tokens, 9).logits_BSV
  for criterion, threshold in [("fixed_point", 0.0), ("kl", 0.0), ("argmax_stable", 50)]:  # 50 > max_iters
    out = model.halt(tokens, criterion=criterion, threshold=threshold, max_iters=9)  # = halt(model, ...)
    assert (np.asarray(out.exit_BS) == 9).all() and int(out.iterations) == 9, criterion
    np.testing.assert_allclose(out.logits_BSV, fixed_BSV, atol=1e-6, rtol=1e-6)


def test_oracle_exits():
  preds_RBS = np.array([[[0, 1, 2]], [[1, 1, 2]], [[1, 0, 2]], [[1, 0, 2]]])  # R=4, B=1, S=3
  np.testing.assert_array_equal(oracle_exits(preds_RBS), [[2, 3, 1]])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(criterion="patience", threshold=1e-3), "halting.criterion='patience' is not allowed; allowed: "
     + "|".join(CRITERIA)),
    (dict(criterion="kl", threshold=-1e-3), "halting.threshold=-0.001"),
    (dict(criterion="cosine", threshold=float("nan")), "halting.threshold=nan"),
    (dict(criterion="argmax_stable", threshold=2.5), "integer n >= 0"),
    (dict(criterion="oracle", threshold=0), "evaluation-only"),
    (dict(criterion="kl", threshold=1e-3, max_iters=0), "halting.max_iters=0"),
    (dict(criterion="kl", threshold=1e-3, slots=0), "halting.slots=0")])
def test_bad_arguments_are_one_line_config_errors(kwargs, needle):
  graphdef, params, tokens = model_and_tokens()
  kwargs = {"max_iters": 8, **kwargs}
  with pytest.raises(ConfigError) as err:
    halt(nnx.merge(graphdef, params), tokens, **kwargs)
  assert needle in str(err.value) and "\n" not in str(err.value)


def cli(*args):
  env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}
  return subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_missing_run_is_one_line(tmp_path):
  out = cli("halting", "--workdir", str(tmp_path / "missing"))
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:")
  assert not (tmp_path / "missing").exists()


def test_evaluate_halting_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = tiny_config(train__steps=60, train__checkpoint_every=0, train__eval_batch_size=8,
                    task__test_lengths=())  # one length keeps the test fast; the bench mixes three
  cfg.eval.iterations = 12
  cfg.wandb.mode = "offline"
  Trainer(cfg, workdir).run()
  grids = {"fixed_point": (1e-1, 0.0)}  # no KL row: kl_best is all None
  with pytest.raises(ConfigError, match="halting.grids='oracle'"):
    evaluate_halting(cfg, workdir, grids={"oracle": (0,)}, progress=False)
  result = evaluate_halting(cfg, workdir, grids=grids, slots=8, repeats=1, progress=False)
  saved = json.load(open(latest(workdir, "halting.json")))
  summary = saved["summary"]
  for key in (*SUMMARY_FIGURES, "R_fixed", "R", "threshold", "kl_best"):
    assert key in summary
  assert summary["R"] == 12 and 1 <= summary["R_fixed"] <= 12
  assert summary["oracle_mean_iterations"] >= 1 and set(summary["kl_best"]) >= set(SUMMARY_FIGURES)
  assert summary["slots"] == 8
  assert len(saved["rows"]) == 2 and len(saved["fixed_curve"]) == 12
  assert summary["kl_best"]["threshold"] is None and summary["kl_best"]["mean_iterations"] is None
  for row in saved["rows"]:
    assert set(row["lengths"]) == {"8"} and row["wall_s"] > 0 and row["flops"] > 0
    assert 1 <= row["mean_iterations"] <= row["max_iterations"] <= 12
  curve = saved["fixed_curve"]
  never = next(r for r in saved["rows"] if r["threshold"] == 0.0)
  assert never["mean_iterations"] == 12 and never["exact_match"] == pytest.approx(curve[-1])
  oracle = saved["oracle"]
  assert oracle["exact_match"] == pytest.approx(curve[-1])
  assert 1 <= oracle["mean_iterations"] <= oracle["causal_mean_iterations"] <= 12
  assert summary["oracle_causal_mean_iterations"] == oracle["held_out"]["causal_mean_iterations"]
  # the threshold is chosen on the calibration half and reported on the held-out half
  for row in saved["rows"] + [saved["fixed"]]:
    assert (row["calibration"]["exact_match"] + row["held_out"]["exact_match"]) / 2 == pytest.approx(
        row["exact_match"])  # one length, 4 + 4 sequences
  if summary["threshold"] is not None:
    chosen = next(r for r in saved["rows"] if r["threshold"] == summary["threshold"])
    assert summary["mean_iterations"] == chosen["held_out"]["mean_iterations"]
    assert summary["exact_match"] == chosen["held_out"]["exact_match"]
    assert summary["accuracy_drop_points"] == pytest.approx(
        100 * (saved["fixed"]["held_out"]["exact_match"] - chosen["held_out"]["exact_match"]))
    assert 100 * (saved["fixed"]["calibration"]["exact_match"]
                  - chosen["calibration"]["exact_match"]) <= 0.5 + 1e-9
  assert max(2, oracle["mean_iterations"]) <= oracle["floor_mean_iterations"] <= oracle["mean_iterations"] + 1
  assert oracle["floor_mean_iterations"] == pytest.approx(  # the oracle's exits, none before 2
      oracle["mean_iterations"] + oracle["share_exit_at_1"])
  for row in saved["rows"]:
    assert row["batch"]["exit_agreement"] > 0.99 and row["batch_flops"] >= row["flops"] > 0
  fixed = saved["fixed"]
  assert fixed["mean_iterations"] == summary["R_fixed"]
  assert fixed["exact_match"] == pytest.approx(
      saved["fixed_curve"][summary["R_fixed"] - 1])
  assert result["summary"] == summary or json.loads(json.dumps(result["summary"])) == summary
  assert os.path.getsize(os.path.join(workdir, "eval", "60", "plots", "halting_pareto.png")) > 1000
  run = offline_run(str(tmp_path / "wandb"), read_status(workdir)["wandb_run_id"])
  assert run["summary"]["halting/R_fixed"] == summary["R_fixed"] and "train/loss" in run["summary"]

  # A sweep trial's cheaper pass: the fixed_point grid, per-sequence exit only, and only the
  # summary's setting timed; the same accuracy and iterations as the full evaluation.
  # The evaluator's accuracy-curve predictions are the same trajectory (a trial hands them on).
  from eval.capture import Capture
  from eval.driver import eval_batches
  from eval.evaluate import load_params
  from eval.halting_runner import Runner
  graphdef, params, _ = load_params(resolve(cfg), workdir, False)
  batch = eval_batches(resolve(cfg))[8]
  curve = Capture(graphdef, params, chunk=5, seed=0).accuracy_curve(batch, 12)
  np.testing.assert_array_equal(curve["predictions"],
                                Runner(graphdef, params, 12, 0).trajectory(batch["inputs"]))
  with pytest.raises(ValueError, match="expected"):
    halting_summary(cfg, workdir, trajectories={8: curve["predictions"][:5]}, progress=False)
  fields = halting_summary(cfg, workdir, grids={"fixed_point": (1e-1, 3e-2, 0.0)}, repeats=1,
                           trajectories={8: curve["predictions"]}, progress=False, log_wandb=False)
  trial = json.load(open(latest(workdir, "halting.json")))  # its own eval/60.1/: the first is kept
  assert latest(workdir, "halting.json") == os.path.join(workdir, "eval", "60.1", "halting.json")
  assert trial["mode"] == "trial" and "chunked_wall_s" not in trial["fixed"]
  timed = [r["threshold"] for r in trial["rows"] if r["wall_s"] is not None]
  assert timed == [trial["summary"]["threshold"]] and fields["halting/wall_speedup"] > 0
  assert all("batch" not in r and "batch_wall_s" not in r for r in trial["rows"])
  full = {r["threshold"]: r for r in saved["rows"]}
  assert trial["rows"][0]["mean_iterations"] == full[1e-1]["mean_iterations"]
  assert trial["rows"][0]["exact_match"] == full[1e-1]["exact_match"]
  assert fields["halting/R_fixed"] == summary["R_fixed"] and fields["halting/wall_speedup_batch"] is None
  assert trial["oracle"]["mean_iterations"] == oracle["mean_iterations"]
