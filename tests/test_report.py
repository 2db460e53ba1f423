"""The sweep report (cells over every axis but the seed, means over seeds), its figures' legends, the
evaluation figures, and evaluation outputs that are never overwritten."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_config

from eval import plots
from eval.fixed_points import analyze_trajectory
from rundir import outputs
from rundir.workdir import read_status, write_json_atomic
from sweeps import figures, records, report, tables
from sweeps.status import set_trial

# (block size, d_model, seed) -> (regime, accuracy at size 16, converged_at per layer, saved fraction)
TRIALS = {(1, 16, 0): ("degenerate", 0.50, [4], 0.25), (1, 16, 1): ("degenerate", 0.70, [6], 0.75),
          (1, 32, 0): ("degenerate", 1.00, [2], 0.50), (1, 32, 1): ("orbit", 0.80, [None], None),
          (2, 16, 0): ("cyclic", 0.90, [3, 5], 0.10), (2, 16, 1): ("cyclic", 0.60, [7, 2], 0.30),
          (2, 32, 0): ("cyclic", 0.40, [2, 2], 0.20), (2, 32, 1): ("unconverged", 0.20, [None, 9], 0.40)}
R = 6


def fake_sweep(root) -> str:
  """A sweep directory as the runner and the evaluator leave it: block_size x d_model (not a core
  axis) x 2 seeds, every trial done, its evaluation under eval/STEP/."""
  sweep_dir = os.path.join(root, "mix")
  trials = []
  for (k, d, seed), (regime, acc, conv, saved) in TRIALS.items():
    name = f"k{k}-d{d}-s{seed}"
    overrides = {"model.block_size": k, "model.d_model": d, "train.seed": seed}
    cfg = tiny_config(model__block_size=k, model__d_model=d, train__seed=seed).to_dict()
    trials.append({"name": name, "overrides": overrides, "config": cfg})
    tdir = os.path.join(sweep_dir, name)
    os.makedirs(tdir)
    set_trial(tdir, status="done", wall_s=1.0, overrides=overrides, config=cfg)
    write_json_atomic(os.path.join(tdir, "config.json"), cfg)
    summary = {"fp/regime": regime, "fp/degeneracy_min_cosine": 1.0 if k == 1 else 0.5 + seed / 10,
               "acc/len16/best": acc, "acc/len16/best_iters": 3, "acc/len8/best": 1.0,
               "acc/len8/best_iters": 1}
    for l, c in enumerate(conv):
      summary[f"fp/layer{l + 1}/converged_at"] = c
      summary[f"fp/layer{l + 1}/final_change"] = 1e-3
    curve = list(np.linspace(0.1, acc, R))
    change = [[0.5 ** t] * k for t in range(R)]
    edir = os.path.join(tdir, "eval", "40")
    os.makedirs(edir)
    write_json_atomic(os.path.join(edir, "fixed_points.json"), {
        "summary": summary, "accuracy_curves": {"8": [1.0] * R, "16": curve},
        "report": {"series": {"successive_change": change}}})
    if saved is not None:
      write_json_atomic(os.path.join(edir, "halting.json"), {"summary": {
          "R_fixed": 4, "fixed_exact_match": acc, "threshold": 1e-2, "max_drop_points": 0.5,
          "mean_iterations": 2.0, "max_iterations": 4, "oracle_mean_iterations": 1.5,
          "oracle_causal_mean_iterations": 1.8, "iterations_saved_fraction": saved,
          "accuracy_drop_points": 0.0, "flops_saved_fraction": saved / 2, "wall_speedup": 1.2}})
  write_json_atomic(os.path.join(sweep_dir, "sweep.json"), {"sweep": "mix", "trials": trials})
  return sweep_dir


def test_cells_group_every_axis_but_the_seed_and_aggregate_seeds(tmp_path):
  _, rows = records.load(fake_sweep(tmp_path))
  groups = records.cells(rows)
  assert records.cell_axes(rows) == ["model.block_size", "model.d_model"]
  assert list(groups) == [(1, 16), (1, 32), (2, 16), (2, 32)]  # d_model is not counted as a seed
  assert all(len(m) == 2 for m in groups.values())
  header, body = tables.cell_table(rows)
  table = {(r[0], r[1]): dict(zip(header, r)) for r in body}
  assert table[("1", "16")]["regime (agreement)"] == "degenerate 2/2"
  assert table[("1", "32")]["regime (agreement)"] in ("degenerate 1/2, orbit 1/2",
                                                      "orbit 1/2, degenerate 1/2")
  assert table[("1", "16")]["acc@16"] == "0.600 ± 0.100"  # mean and population std of 0.5, 0.7
  assert table[("2", "16")]["acc@16"] == "0.750 ± 0.150"
  assert table[("2", "16")]["converged at (it.)"] == "6.0 ± 1.0"  # all layers: max(3, 5), max(7, 2)
  assert table[("1", "32")]["converged at (it.)"] == "2.0 (1/2)"  # one seed never converged
  assert table[("2", "32")]["degeneracy cos"] == "0.5500 ± 0.0500"
  assert table[("1", "16")]["halting: it. saved"] == "50.0% ± 25.0%"
  assert table[("1", "32")]["halting: it. saved"] == "50.0% (1/2)"
  grids = tables.regime_grids(rows)  # one grid per value of the axes other than injection x norm
  assert set(grids) == {"block_size = 1, d_model = 16", "block_size = 1, d_model = 32",
                        "block_size = 2, d_model = 16", "block_size = 2, d_model = 32"}
  paths = report.write_report(str(tmp_path / "mix"))
  md = open(paths["md"]).read()
  assert "| 2 | 16 | 2 | cyclic 2/2 | 1.000 ± 0.000 | 0.750 ± 0.150 |" in md
  html = open(paths["html"]).read()
  assert "0.750 ± 0.150" in html and html.count("data:image/png;base64,") == 3
  for name in ("report_regimes", "report_convergence", "report_extrapolation"):
    assert os.path.getsize(tmp_path / "mix" / f"{name}.png") > 1000
    assert open(tmp_path / "mix" / f"{name}.svg").read().lstrip().startswith("<?xml")


def _legend_matches_lines(ax) -> list[str]:
  legend = ax.get_legend()
  assert legend is not None, ax.get_title()
  texts = [t.get_text() for t in legend.get_texts()]
  assert len(texts) == len([l for l in ax.get_lines() if not l.get_label().startswith("_")])
  return texts


def test_report_figures_have_a_legend_entry_per_trial(tmp_path):
  _, rows = records.load(fake_sweep(tmp_path))
  fig = figures.plot_trials(rows, figures.longest_curve, "exact match", "Extrapolation", False, None)
  panels = [ax for ax in fig.axes if ax.get_lines()]
  assert [ax.get_title() for ax in panels] == ["block_size = 1", "block_size = 2"]
  for ax in panels:
    texts = _legend_matches_lines(ax)
    assert len(texts) == 4 and texts[-1] == "32, seed 1"  # d_model 32, seed 1
    colors = {l.get_color() for l in ax.get_lines()}
    assert len(colors) == 2  # one colour per cell, seeds told apart by line style
  fig = figures.plot_grids(tables.regime_grids(rows), None)
  legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
  assert set(legend_texts) == {"cyclic", "degenerate"}  # the colours shown: each cell's most common
  # beyond MAX_TRIAL_LINES trials a one-line-per-trial figure is not drawn (e.g. the regime map)
  many = [{**r, "overrides": {**r["overrides"], "train.seed": i}} for i in range(9) for r in rows]
  assert len(many) > figures.MAX_TRIAL_LINES
  assert figures.plot_trials(many, figures.longest_curve, "exact match", "x", False, None) is None


@pytest.fixture(scope="module")
def analysis():
  rng = np.random.default_rng(0)
  r, k, b, s, d, h = 12, 2, 2, 5, 8, 2
  decay = (0.5 ** np.arange(r))[:, None, None, None, None]
  states = rng.normal(size=(1, k, b, s, d)) + decay * rng.normal(size=(r, k, b, s, d))
  att = np.abs(rng.normal(size=(r, k, b, h, s, s)))
  return analyze_trajectory(states.astype(np.float32), att / att.sum(-1, keepdims=True)), states


def test_evaluation_figures(analysis):
  rep, states = analysis
  fig = plots.convergence(rep, None)  # one panel per block layer, each with its legend
  assert [ax.get_title() for ax in fig.axes] == ["layer ℓ = 1", "layer ℓ = 2"]
  for ax in fig.axes:
    assert _legend_matches_lines(ax) == ["relative norm", "1 − cos"] and ax.get_yscale() == "log"
  fig = plots.attention_similarity(rep, None)  # the first 8 of 12 iterations by default
  assert fig.axes[0].get_images()[0].get_array().shape == (16, 16)
  fig = plots.attention_similarity(rep, None, iterations=3)
  assert fig.axes[0].get_images()[0].get_array().shape == (6, 6)
  fig = plots.stage_metrics(rep, None, compare={"sink_rate": np.zeros((12, 2))}, compare_label="random init")
  sink = next(ax for ax in fig.axes if ax.get_title() == "Sink rate")
  assert _legend_matches_lines(sink) == ["layer ℓ = 1", "layer ℓ = 2", "ℓ = 1, random init",
                                         "ℓ = 2, random init"]
  for ax in fig.axes:
    assert ax.get_legend() is not None and ax.get_ylabel()
  fig = plots.trajectory_pca(states[:, :, 0, :3], None, labels=["the", "cat", "sat"])
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert texts == ["the", "cat", "sat"]
  assert fig.axes[1].get_ylabel() == "iteration t"  # the colour bar
  with pytest.raises(ValueError, match="labels"):
    plots.trajectory_pca(states[:, :, 0, :3], None, labels=["one"])
  fig = plots.accuracy_curves({8: np.ones(5), 16: np.linspace(0, 1, 5)}, None, 8)
  assert _legend_matches_lines(fig.axes[0]) == ["size 8 (train)", "size 16"]


def test_output_dirs_never_overwrite(tmp_path):
  run = str(tmp_path / "run")
  first = outputs.output_dir(run, 40, "fixed_points.json")
  assert first == os.path.join(run, "eval", "40")
  open(os.path.join(first, "fixed_points.json"), "w").write("{}")
  assert outputs.output_dir(run, 40, "halting.json") == first  # beside the evaluation it follows
  open(os.path.join(first, "halting.json"), "w").write("{}")
  second = outputs.output_dir(run, 40, "halting.json")  # a sweep's, then the CLI's: no collision
  assert second == os.path.join(run, "eval", "40.1")
  open(os.path.join(second, "halting.json"), "w").write("{}")
  assert outputs.latest(run, "halting.json") == os.path.join(second, "halting.json")
  assert outputs.latest(run, "fixed_points.json") == os.path.join(first, "fixed_points.json")
  assert outputs.output_dir(run, 80, "fixed_points.json") == os.path.join(run, "eval", "80")
  assert outputs.latest(run, "nothing.json") is None
  for name in ("config.json", "config.1.json", "config.10.json", "config.2.json"):
    open(os.path.join(run, name), "w").write("{}")
  assert outputs.finished_config_path(run) == os.path.join(run, "config.10.json")


def test_reevaluation_leaves_the_first_outputs_untouched(tmp_path):
  from eval.evaluate import evaluate
  from rundir.run import load_run_config

  workdir = str(tmp_path / "ri")
  cfg = tiny_config(task__test_lengths=(), train__eval_batch_size=4)
  evaluate(cfg, workdir, init=True, iterations=4, batch_size=2, progress=False, log_wandb=False)
  first = os.path.join(workdir, "eval", "0")
  before = {f: open(os.path.join(first, f), "rb").read()
            for f in ("fixed_points.json", "fixed_points.md", "plots/convergence.png")}
  # another setting (the same compiled programs: the test stays fast)
  evaluate(cfg, workdir, init=True, iterations=4, batch_size=2, progress=False, log_wandb=False,
           thresholds={"tau": 0.1})
  for f, data in before.items():
    assert open(os.path.join(first, f), "rb").read() == data
  again = json.load(open(outputs.latest(workdir, "fixed_points.json")))
  assert again["report"]["thresholds"]["tau"] == 0.1
  assert outputs.latest(workdir, "fixed_points.json").endswith("eval/0.1/fixed_points.json")
  # the evaluator reads the config the run finished with (the newest config.N.json)
  finished = json.load(open(os.path.join(workdir, "config.json")))
  finished["train"]["steps"] = 77
  write_json_atomic(os.path.join(workdir, "config.1.json"), finished)
  assert load_run_config(workdir).train.steps == 77


def test_phase_diagram_of_known_regimes():
  """Fake trials over injection x init_std x embed_std x 3 seeds with known regimes: the majority
  regime, its agreement, the column order (1/sqrt(fan_in) first) and the drawn colours and counts."""
  from matplotlib.colors import to_hex

  from sweeps.phase import PAPER_RANDOM_INIT, agrees, phase_data, plot_phase, reference_table

  def regime(inj, std, emb, seed):
    if inj == "none":
      return "degenerate"
    if std == 0.2:
      return "divergent"
    return "cyclic" if seed < 2 or emb == 1.0 else "unconverged"  # 2/3 cyclic at embed 0.02

  rows = []
  for inj in ("none", "concat"):
    for std in (0.2, 0.0, 0.02):
      for emb in (0.02, 1.0):
        for seed in (0, 1, 2):
          rows.append({"overrides": {"model.injection": inj, "model.norm": "peri", "model.init_std": std,
                                     "model.embed_std": emb, "train.seed": seed},
                       "config": {}, "trial": {"status": "done"},
                       "summary": {"fp/regime": regime(inj, std, emb, seed)}})
  data = phase_data(rows)
  assert data["x"] == [0.0, 0.02, 0.2] and data["y"] == [(0.02,), (1.0,)]
  assert data["y_keys"] == ["model.embed_std"]
  concat = data["panels"][("concat", "peri")]
  assert concat["majority"] == [["cyclic", "cyclic", "divergent"], ["cyclic", "cyclic", "divergent"]]
  assert concat["agree"] == [[(2, 3), (2, 3), (3, 3)], [(3, 3), (3, 3), (3, 3)]]
  assert data["panels"][("none", "peri")]["agree"] == [[(3, 3)] * 3] * 2
  assert phase_data([{**r, "overrides": {k: v for k, v in r["overrides"].items()
                                         if k != "model.init_std"}} for r in rows]) is None
  fig = plot_phase(data, None, reference={("concat", "peri"): "unconverged"})
  ax_none, ax_concat = fig.axes[0], fig.axes[1]
  assert ax_concat.get_title() == "concat + peri (paper: unconverged)" and ax_none.get_title() == "none + peri"
  boxes = [p for p in ax_concat.patches]
  assert [to_hex(p.get_facecolor()) for p in boxes] == [records.REGIME_COLORS[r].lower() for r in
                                                        ("cyclic", "cyclic", "divergent") * 2]
  assert [t.get_text() for t in ax_concat.texts] == ["2/3", "2/3", "3/3", "3/3", "3/3", "3/3"]
  assert boxes[0].get_alpha() < boxes[3].get_alpha() == 1.0  # disagreement drawn lighter
  assert [t.get_text() for t in ax_concat.get_xticklabels()] == ["1/√fan_in", "0.02", "0.2"]
  plots.plt.close(fig)
  header, body = reference_table(data, {("concat", "peri"): "cyclic", ("none", "peri"): "not converged",
                                        ("concat", "pre"): "cyclic"})  # concat + pre was not run
  assert header[1] == "paper" and body == [
      ["concat + peri", "cyclic", "4/6", "1/√fan_in, 0.02", "cyclic 4, divergent 2"],
      ["none + peri", "not converged", "0/6", "none", "degenerate 6"]]
  # the paper's "not converged" matches any regime that did not converge, and nothing else
  assert agrees("orbit", "not converged") and agrees("divergent", "not converged")
  assert not agrees("cyclic", "not converged") and not agrees("failed", "not converged")
  assert agrees("cyclic", PAPER_RANDOM_INIT[("concat", "pre")]) and not agrees("degenerate", "cyclic")


def test_report_of_an_init_scale_sweep_compares_with_the_papers_table(tmp_path):
  """A sweep directory over concat x (pre, peri) x init_std x 2 seeds with known regimes: report.md
  and report.html carry the comparison with PAPER_RANDOM_INIT (concat + pre cyclic, concat + peri
  not converged) beside the phase diagram."""
  regimes = {("pre", 0.0): ("cyclic", "cyclic"), ("pre", 0.02): ("cyclic", "orbit"),
             ("peri", 0.0): ("orbit", "slider"), ("peri", 0.02): ("cyclic", "cyclic")}
  sweep_dir, trials = tmp_path / "init", []
  for (norm, std), by_seed in regimes.items():
    for seed, regime in enumerate(by_seed):
      name = f"{norm}-{std}-s{seed}"
      overrides = {"model.injection": "concat", "model.norm": norm, "model.init_std": std,
                   "train.seed": seed}
      cfg = tiny_config(model__injection="concat", model__norm=norm, model__init_std=std,
                        train__seed=seed).to_dict()
      trials.append({"name": name, "overrides": overrides, "config": cfg})
      os.makedirs(sweep_dir / name / "eval" / "40")
      # a sweep directory written before status.json held the sweep's fields: they are in trial.json
      write_json_atomic(str(sweep_dir / name / "trial.json"), {"status": "done", "wall_s": 1.0,
                                                               "overrides": overrides})
      write_json_atomic(str(sweep_dir / name / "status.json"), {"status": "done", "step": 40})
      write_json_atomic(str(sweep_dir / name / "config.json"), cfg)
      write_json_atomic(str(sweep_dir / name / "eval" / "40" / "fixed_points.json"),
                        {"summary": {"fp/regime": regime}, "accuracy_curves": {"8": [1.0] * R},
                         "report": {"series": {"successive_change": [[0.5 ** t] for t in range(R)]}}})
  write_json_atomic(str(sweep_dir / "sweep.json"), {"sweep": "init", "trials": trials})
  paths = report.write_report(str(sweep_dir))
  md = open(paths["md"]).read()
  assert "## Against the paper's random-init table" in md and "phase" in paths
  assert "| concat + pre | cyclic | 2/2 | 1/√fan_in, 0.02 | cyclic 2 |" in md  # a 1-1 tie: first seen
  assert "| concat + peri | not converged | 1/2 | 1/√fan_in | cyclic 1, orbit 1 |" in md
  html = open(paths["html"]).read()
  assert "<h2>Against the paper's random-init table</h2>" in html and "<td>concat + peri</td>" in html
  # the trial records were read from trial.json (regimes above, not "pending"); the next update of a
  # trial moves them into status.json, beside the run's own fields
  trial = str(sweep_dir / "pre-0.0-s0")
  set_trial(trial, status="pending", error="forced")
  assert not os.path.exists(os.path.join(trial, "trial.json"))
  assert read_status(trial) == {**read_status(trial), "status": "pending", "error": "forced",
                                "wall_s": 1.0, "step": 40, "overrides": {
                                    "model.injection": "concat", "model.norm": "pre",
                                    "model.init_std": 0.0, "train.seed": 0}}


def test_figures_are_written_in_the_formats_asked_for(tmp_path):
  assert plots.FORMATS == ("png", "svg")  # the default
  for name, formats in (("both", plots.FORMATS), ("png_only", ("png",))):
    fig, ax = plots.plt.subplots()
    ax.plot([1, 2], label="x")
    assert plots.save(fig, str(tmp_path / f"{name}.png"), formats) == str(tmp_path / f"{name}.png")
  written = sorted(f for f in os.listdir(tmp_path) if f.endswith((".png", ".svg")))
  assert written == ["both.png", "both.svg", "png_only.png"]
  plots.accuracy_curves({8: np.ones(3)}, str(tmp_path / "acc.png"), 8, formats=("png",))
  assert not os.path.exists(tmp_path / "acc.svg") and os.path.getsize(tmp_path / "acc.png") > 1000
