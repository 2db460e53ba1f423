"""Sweeps: expansion, a SIGKILLed runner resumed, failure isolation, the report, W&B groups."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import fake_devices, tiny_config
from wandb_records import offline_run

from configs.errors import ConfigError
from looped_models.config import validate_model_config
from rundir.outputs import latest
from rundir.workdir import RunDirError, read_status, write_json_atomic
from sweeps import hyper
from sweeps.expand import apply_overrides, base_config, expand, load_sweep_module, trial_name
from sweeps.records import load
from sweeps.runner import Runner, next_trial, program_key, trial_config, units
from sweeps.status import set_trial, trial_record
from sweeps.tables import regime_grids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweeps_cli(*args, wait=True):
  env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}
  cmd = [sys.executable, "-m", "sweeps", *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_expansion_products_zips_chains_and_names():
  grid = hyper.product([hyper.sweep("model.block_size", [1, 2]), hyper.sweep("model.norm", ["pre", "peri"])])
  assert grid == [{"model.block_size": 1, "model.norm": "pre"}, {"model.block_size": 1, "model.norm": "peri"},
                  {"model.block_size": 2, "model.norm": "pre"}, {"model.block_size": 2, "model.norm": "peri"}]
  zipped = hyper.zip([hyper.sweep("train.lr", [1e-3, 3e-3]), hyper.sweep("train.warmup", [10, 20])])
  assert zipped == [{"train.lr": 1e-3, "train.warmup": 10}, {"train.lr": 3e-3, "train.warmup": 20}]
  assert len(hyper.chain(grid, zipped)) == 6
  with pytest.raises(ValueError):
    hyper.zip([hyper.sweep("a", [1]), hyper.sweep("b", [1, 2])])
  assert trial_name({"model.block_size": 4, "model.injection": "concat", "model.norm": "sandwich",
                     "train.seed": 0}) == "k4-concat-sandwich-s0"
  assert trial_name({"train.lr": 0.003}) == "lr=0.003"


def test_default_sweep_has_the_three_axes_and_two_seeds():
  module = load_sweep_module(os.path.join(ROOT, "configs/sweeps/default.py"))
  trials = expand(module.get_config(), module)
  assert len(trials) == 54 and len({t.name for t in trials}) == 54  # 27 cells x 2 seeds
  assert {t.config.train.seed for t in trials} == {0, 1}
  assert {t.config.model.block_size for t in trials} == {1, 2, 4}
  assert {t.config.model.injection for t in trials} == {"none", "add", "concat"}
  assert {t.config.model.norm for t in trials} == {"pre", "sandwich", "peri"}
  assert not any(t.invalid for t in trials)


def test_seeds_of_a_cell_do_not_compile_side_by_side():
  module = load_sweep_module(os.path.join(ROOT, "configs/sweeps/default.py"))
  trials = expand(module.get_config(), module)
  assert units(trials, "default") == [[t] for t in trials]  # trained trials: one process each
  a0, a1, b0, b1, c0, c1 = [[t] for t in trials[:6]]
  assert next_trial([a0, a1, b0, b1], [], set()) == 0
  # a0 compiles the cell's programs: its sibling waits, the next cell starts.
  assert next_trial([a1, b0, b1], [a0], set()) == 1
  # a0 is done (its programs are in the cache): a1 goes first again, b1 waits on b0.
  assert next_trial([a1, b1, c0, c1], [b0], {program_key(a0[0])}) == 0
  assert next_trial([b1, c0, c1], [a1, b0], {program_key(a0[0])}) == 1
  # Every queued trial waits on a running sibling: the first starts anyway (no core left idle).
  assert next_trial([b1], [b0], set()) == 0


def test_the_regime_map_runs_one_vmapped_group_per_cell():
  module = load_sweep_module(os.path.join(ROOT, "configs/sweeps/regime_map.py"))
  groups = units(expand(module.get_config(), module), "regime_map")
  assert len(groups) == 4 * 3 * 2 and all(len(g) == 7 * 2 * 3 for g in groups)
  for g in groups:  # injection x norm x width per group; seeds and init scales within
    assert len({(t.config.model.injection, t.config.model.norm, t.config.model.d_model) for t in g}) == 1


def test_unknown_override_key_is_a_config_error():
  with pytest.raises(ConfigError, match="model.blocksize"):
    apply_overrides(tiny_config(), {"model.blocksize": 2})


def test_stopped_runner_resumes_skipping_finished_trials(tmp_path):
  """One sweep, launched three times: stopped by SIGTERM mid-trial (cleanly: the trial interrupted,
  the report written), resumed and SIGKILLed once a trial is done, then resumed to the end."""
  sweep_dir = tmp_path / "tiny"
  first = sweep_dir / "k1-pre"
  deadline = time.time() + 300
  proc = sweeps_cli("--config", "tests/sweeps/tiny.py", "--workdir", str(tmp_path), wait=False)
  while not os.path.exists(first / "metrics.jsonl"):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  record = trial_record(str(first))
  assert record["status"] in ("pending", "done")  # stopped mid-trial, or it had just finished
  if record["status"] == "pending":
    assert "interrupted" in record["error"]
  assert all(trial_record(str(sweep_dir / n))["status"] == "pending" for n in ("k2-pre", "k3-pre"))
  assert os.path.exists(sweep_dir / "report.md")  # written on the way out, nothing lost

  proc = sweeps_cli("--config", "tests/sweeps/tiny.py", "--workdir", str(tmp_path), wait=False)
  while trial_record(str(first))["status"] != "done":
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_record = trial_record(str(first))
  statuses = [trial_record(str(sweep_dir / n))["status"] for n in ("k2-pre", "k3-pre")]
  assert "done" not in statuses[1:]  # killed mid-sweep
  # the running trial got SIGTERM when its runner died: wait for it to save and exit
  for name in ("k2-pre", "k3-pre"):
    pid = trial_record(str(sweep_dir / name)).get("pid")
    while pid and os.path.exists(f"/proc/{pid}") and time.time() < deadline:
      time.sleep(0.05)

  out = sweeps_cli("--config", "tests/sweeps/tiny.py", "--workdir", str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  assert trial_record(str(first)) == done_record  # skipped, not rerun
  for name in ("k1-pre", "k2-pre", "k3-pre"):
    assert trial_record(str(sweep_dir / name))["status"] == "done"
    fp = latest(str(sweep_dir / name), "fixed_points.json")
    assert fp.startswith(str(sweep_dir / name / "eval"))
    figures = os.listdir(os.path.join(os.path.dirname(fp), "plots"))  # a trial's: PNG alone
    assert "convergence.png" in figures and not [f for f in figures if f.endswith(".svg")]
    assert read_status(str(sweep_dir / name))["step"] == 12

  # the report, from disk alone
  report = open(sweep_dir / "report.md").read()
  for name in ("k1-pre", "k2-pre", "k3-pre"):
    assert f"| {name} |" in report
  html = open(sweep_dir / "report.html").read()
  assert html.count("data:image/png;base64,") >= 3
  _, rows = load(str(sweep_dir))
  grids = regime_grids(rows)
  assert set(grids) == {"block_size = 1", "block_size = 2", "block_size = 3"}
  assert os.path.exists(sweep_dir / "report_regimes.png") and os.path.exists(sweep_dir / "report_regimes.svg")
  os.remove(sweep_dir / "report.md")
  again = sweeps_cli("report", str(sweep_dir))
  assert again.returncode == 0 and open(sweep_dir / "report.md").read() == report

  # every trial is an offline W&B run in the sweep's group; one more run carries the report
  wandb_dir = os.environ["WANDB_DIR"]
  for name in ("k1-pre", "k2-pre", "k3-pre"):
    run = offline_run(wandb_dir, read_status(str(sweep_dir / name))["wandb_run_id"])
    assert run["run"].run_group == "tiny" and run["run"].display_name == name
    assert run["config"]["model.block_size"] == int(name[1])
    assert "fp/regime" in run["summary"]
  reports = [d for d in os.listdir(os.path.join(wandb_dir, "wandb")) if d.startswith("offline-run")]
  assert len(reports) >= 4


def test_failures_are_isolated(tmp_path):
  out = sweeps_cli("--config", "tests/sweeps/mixed.py", "--workdir", str(tmp_path))
  assert out.returncode == 1, out.stderr[-3000:]
  sweep_dir = tmp_path / "mixed"
  names = [t["name"] for t in json.load(open(sweep_dir / "sweep.json"))["trials"]]
  records = {n: trial_record(str(sweep_dir / n)) for n in names}
  good, bad, nan = names
  assert records[good]["status"] == "done"
  assert records[bad]["status"] == "failed" and "model.injection" in records[bad]["error"]
  assert records[nan]["status"] == "diverged" and "diverged" in records[nan]["error"]
  report = open(sweep_dir / "report.md").read()
  assert "failed: config error: model.injection='bogus'" in report
  # the good trial measured adaptive halting (eval.halting); the report has its line, and only its
  halting = json.load(open(latest(str(sweep_dir / good), "halting.json")))["summary"]
  assert halting["R_fixed"] >= 1 and halting["oracle_mean_iterations"] >= 1
  assert latest(str(sweep_dir / nan), "halting.json") is None
  section = report.split("## Adaptive halting")[1].split("## Figures")[0]
  lines = [line for line in section.splitlines() if line.startswith(f"| {good} |")]
  assert len(lines) == 1 and f"| {bad} |" not in section and f"| {nan} |" not in section
  assert f"| {halting['R_fixed']} |" in lines[0]
  assert "Adaptive halting" in open(sweep_dir / "report.html").read()


def test_bad_sweep_input(tmp_path):
  out = sweeps_cli("--config", "tests/sweeps/nope.py", "--workdir", str(tmp_path))
  assert out.returncode != 0
  out = sweeps_cli("report", str(tmp_path / "missing"))
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
  out = sweeps_cli("--config", "tests/sweeps/tiny.py", "--dry-run")
  assert out.returncode == 0 and "k3-pre" in out.stdout and "3 trials" in out.stdout


def test_pod_mode_two_processes_run_trials_over_the_whole_mesh(tmp_path):
  """Every host runs the same command; trials run in-process over all devices; process 0 writes."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests",
         "XLA_FLAGS": fake_devices(2)}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sweeps", "--config", "tests/sweeps/one.py", "--workdir", str(tmp_path),
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  trial = tmp_path / "one" / "k2"
  assert trial_record(str(trial))["status"] == "done"
  assert read_status(str(trial))["step"] == 8
  assert latest(str(trial), "fixed_points.json") and os.path.exists(tmp_path / "one" / "report.md")
  assert json.load(open(latest(str(trial), "halting.json")))["summary"]["R"] == 6  # on every process
  assert "report:" in logs[0] and "report:" not in logs[1]  # process 0 alone writes and prints
  assert "train:" not in logs[1]


@pytest.mark.parametrize("key,value,expected", [
    ("state_init", "zeros", "model.injection='none'"),  # the block would never see the input
    ("window", 40, "model.max_len=32"),
    ("block_size", 0, ">= 1"),
    ("state_std", 0.0, "state_init='normal'"),
])
def test_meaningless_model_configs_are_one_line_errors(key, value, expected):
  cfg = tiny_config()
  cfg.model.update(injection="none" if key == "state_init" else "add", attention="local", vocab_size=8,
                   state_init="normal" if key == "state_std" else "embed")
  cfg.model[key] = value
  with pytest.raises(ConfigError) as info:
    validate_model_config(cfg.model)
  assert info.value.key == f"model.{key}" and expected in str(info.value) and "\n" not in str(info.value)


def test_meaningless_trials_are_rejected_before_running():
  class Sweep:
    @staticmethod
    def get_hyper(h):
      return h.product([h.sweep("model.injection", ["none", "add"]),
                        h.sweep("model.state_init", ["embed", "zeros"])])

  trials = {t.name: t.invalid for t in expand(tiny_config(), Sweep)}
  assert [n for n, bad in trials.items() if bad] == ["none-init-zeros"]
  assert "model.state_init='zeros'" in trials["none-init-zeros"]


def test_export_wandb_runs_one_trial_as_an_agent_and_a_changed_config_is_refused(tmp_path):
  import yaml

  from sweeps.wandb_export import agent_command

  out = sweeps_cli("export-wandb", "--config", "tests/sweeps/tiny.py", "--workdir", str(tmp_path),
                   "--out", str(tmp_path / "sweep.yaml"))
  assert out.returncode == 0, out.stderr[-2000:]
  defn = yaml.safe_load(open(tmp_path / "sweep.yaml"))
  assert defn["method"] == "grid" and defn["name"] == "tiny"
  assert defn["parameters"]["trial"] == {"values": ["k1-pre", "k2-pre", "k3-pre"]}
  assert defn["parameters"]["config.wandb.group"] == {"value": "tiny"}
  assert defn["command"][:4] == ["${env}", "${interpreter}", "-m", "sweeps"]
  assert defn["command"][-1] == "${args}"
  assert set(defn) <= {"name", "description", "method", "parameters", "command", "project", "entity",
                       "program", "metric"}
  # the exact command `wandb agent` runs for one trial (W&B offline: no API key here)
  cmd = agent_command(defn, "k2-pre")
  assert cmd[-3:] == ["--trial=k2-pre", "--config.wandb.group=tiny", "--config.wandb.mode=online"]
  env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
  env.update(PYTHONPATH=f"{ROOT}:{ROOT}/tests", WANDB_MODE="offline")
  run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  sweep_dir = tmp_path / "tiny"
  assert trial_record(str(sweep_dir / "k2-pre"))["status"] == "done"
  assert trial_record(str(sweep_dir / "k1-pre"))["status"] == "pending"  # not this agent's trial
  wb = offline_run(os.environ["WANDB_DIR"], read_status(str(sweep_dir / "k2-pre"))["wandb_run_id"])
  assert wb["run"].run_group == "tiny" and wb["config"]["model.block_size"] == 2
  assert "fp/regime" in wb["summary"]

  # the same trial with another config: refused (one line naming the key), nothing run or recorded
  again = subprocess.run(cmd + ["--config.train.steps=14"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 2 and "train.steps: 12 -> 14" in again.stderr
  assert len(again.stderr.strip().splitlines()) == 1 and "--force" in again.stderr
  assert len(json.load(open(sweep_dir / "sweep.json"))["invocations"]) == 1


def test_export_wandb_keeps_the_command_lines_config_overrides(tmp_path):
  from sweeps.wandb_export import agent_command
  out = sweeps_cli("export-wandb", "--config", "tests/sweeps/tiny.py", "--workdir", str(tmp_path),
                   "--out", str(tmp_path / "sweep.yaml"), "--config.train.steps=14",
                   "--config.wandb.mode=offline")
  assert out.returncode == 0, out.stderr[-2000:]
  import yaml
  defn = yaml.safe_load(open(tmp_path / "sweep.yaml"))
  assert defn["parameters"]["config.train.steps"] == {"value": 14}
  assert defn["parameters"]["config.wandb.mode"] == {"value": "offline"}  # the user's, not online
  cmd = agent_command(defn, "k1-pre")
  assert "--config.train.steps=14" in cmd and "--config.wandb.mode=offline" in cmd


def test_force_reruns_a_changed_trial_and_sweep_json_keeps_every_invocation(tmp_path):
  module = load_sweep_module(os.path.join(ROOT, "tests/sweeps/tiny.py"))
  trials = expand(module.get_config(), module)
  runner = Runner("tiny", trials, str(tmp_path), argv=["first"])
  os.makedirs(runner.trial_dir(trials[0]))
  set_trial(runner.trial_dir(trials[0]), status="done", config=trial_config(trials[0], "tiny"))
  assert runner.changed_trials() == {}
  # another host of a pod (or a relaunch with another coordinator) runs the same trials
  elsewhere = expand(apply_overrides(module.get_config(), {
      "distributed.process_id": 1, "distributed.num_processes": 2,
      "distributed.coordinator_address": "10.0.0.2:1234"}), module)
  assert Runner("tiny", elsewhere, str(tmp_path)).changed_trials() == {}
  runner.record_invocation(runner.check_changed())
  longer = expand(apply_overrides(module.get_config(), {"train.steps": 14}), module)
  with pytest.raises(RunDirError, match="train.steps: 12 -> 14.*--force"):
    Runner("tiny", longer, str(tmp_path)).check_changed()
  forced = Runner("tiny", longer, str(tmp_path), force=True, argv=["second", "--force"])
  assert forced.check_changed() == ["k1-pre"]  # only the trial that ran; the others never did
  forced.record_invocation(["k1-pre"])
  index = json.load(open(tmp_path / "tiny" / "sweep.json"))
  assert [(i["argv"], i["forced"]) for i in index["invocations"]] == [(["first"], []),
                                                                     (["second", "--force"], ["k1-pre"])]
  assert [t["config"]["train"]["steps"] for t in index["trials"]] == [14, 14, 14]


def test_boolean_overrides_name_a_trial_by_their_key():
  from sweeps.expand import trial_name
  assert trial_name({"model.block_size": 12, "eval.control": True}) == "k12-control"
  assert trial_name({"eval.control": False}) == "no-control"


def test_a_sweep_directory_written_with_trial_json_is_resumed(tmp_path):
  """Before status.json held a trial's sweep fields they were in TRIAL/trial.json: such a directory
  is read as it was (done trials skipped, a changed config refused)."""
  module = load_sweep_module(os.path.join(ROOT, "tests/sweeps/tiny.py"))
  trials = expand(module.get_config(), module)
  runner = Runner("tiny", trials, str(tmp_path), only=["k1-pre"])
  tdir = runner.trial_dir(trials[0])
  os.makedirs(tdir)
  write_json_atomic(os.path.join(tdir, "trial.json"), {
      "status": "done", "overrides": trials[0].overrides, "config": trial_config(trials[0], "tiny"),
      "wall_s": 3.0, "error": None})
  write_json_atomic(os.path.join(tdir, "status.json"), {"status": "running", "step": 12})
  record = trial_record(tdir)
  assert (record["status"], record["wall_s"], record["step"]) == ("done", 3.0, 12)
  assert runner.run() == {"k1-pre": "done"}  # skipped: nothing started
  assert os.path.exists(os.path.join(tdir, "trial.json")) and read_status(tdir)["status"] == "running"
  longer = expand(apply_overrides(module.get_config(), {"train.steps": 14}), module)
  with pytest.raises(RunDirError, match="train.steps: 12 -> 14"):
    Runner("tiny", longer, str(tmp_path)).check_changed()


def test_a_sweep_over_an_existing_run_starts_from_its_config(tmp_path):
  """configs/sweeps/imported.py:RUN: the run's own config, the file's settings over it (no training,
  no halting), then the command line's."""
  run = str(tmp_path / "run")
  os.makedirs(run)
  write_json_atomic(os.path.join(run, "config.json"),
                    tiny_config(model__block_size=3, eval__halting=True, wandb__group="old").to_dict())
  module = load_sweep_module(os.path.join(ROOT, "configs/sweeps/imported.py"))
  base = base_config(module.get_config(run), module, {"eval.batch_size": 3})
  assert (base.model.block_size, base.train.init_from, base.train.steps) == (3, run, 0)
  assert (base.eval.halting, base.eval.batch_size, base.wandb.group) == (False, 3, "")
  trials = expand(base, module)
  assert [t.name for t in trials] == ["R32-starts0", "R32-starts3", "R128-starts0", "R128-starts3"]
  assert not any(t.invalid for t in trials) and trials[0].config.model.block_size == 3
  out = sweeps_cli("--config", f"configs/sweeps/imported.py:{run}", "--dry-run",
                   "--config.eval.batch_size=3")
  assert out.returncode == 0 and "4 trials" in out.stdout, out.stderr[-2000:]
  out = sweeps_cli("--config", f"configs/sweeps/imported.py:{tmp_path}/nope", "--dry-run")
  assert out.returncode == 2 and "does not exist" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
