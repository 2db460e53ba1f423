"""Faults and bad input, done for real: a run directory nothing can corrupt (docs/run_directory.md,
Reliability). Each case checks the exit status, the one line on stderr, status.json, and that nothing
already written changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest

from rundir import lock
from rundir.logger import JsonlFile, read_metrics
from rundir.workdir import read_status
from tasks import DataError
from tasks.text import TextData
from test_cli import ROOT, one_error_line, run_all

TINY = ["--config", "tests/tiny_config.py"]


def snapshot(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory` (empty if it does not exist)."""
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      p = os.path.join(base, name)
      out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


@contextmanager
def mounted_tmpfs(where, size: str, *options: str):
  """A tmpfs of `size` at `where` (root only: the test is skipped where it cannot be mounted)."""
  os.makedirs(where, exist_ok=True)
  opts = ",".join((f"size={size}",) + options)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    yield str(where)
  finally:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT}/tests",
          "WANDB_MODE": "disabled"}


# -- bad input: one line, exit status 2, nothing written (all run at once) -------------------------

@pytest.fixture(scope="module")
def bad(tmp_path_factory, corpus):
  """Every bad-input command line run at once, while this process holds a run and a sweep."""
  tmp = tmp_path_factory.mktemp("bad")
  (tmp / "afile").write_text("not a directory\n")
  (tmp / "syntax.py").write_text("def get_config(:\n  pass\n")
  (tmp / "imports.py").write_text("import no_such_module\n\ndef get_config():\n  pass\n")
  held, held_sweep = tmp / "held", tmp / "sweeps" / "one"
  held.mkdir()
  (held / "notes.txt").write_text("written before\n")
  broken = tmp / "broken_corpus"
  shutil.copytree(corpus[0], broken)
  shard = sorted(broken.glob("train-*.bin"))[0]
  ids = np.fromfile(shard, np.uint16)
  ids[len(ids) // 2] = 60000  # same size, one id past the byte vocabulary
  ids.tofile(shard)
  cases = {
      "key": (["train", *TINY, "--workdir", f"{tmp}/r1", "--config.model.n_layrs=2"],
              "unknown config key model.n_layrs; nearest: model.n_heads"),
      "section": (["train", *TINY, "--workdir", f"{tmp}/r1", "--config.modle.d_model=8"],
                  "unknown config key modle; nearest: model"),
      "missing": (["train", "--config", f"{tmp}/nope.py", "--workdir", f"{tmp}/r1"],
                  f"cannot load config file {tmp}/nope.py ([Errno 2] No such file or directory"),
      "syntax": (["sweeps", "--config", f"{tmp}/syntax.py", "--workdir", f"{tmp}/s"],
                 f"config file {tmp}/syntax.py line 1: SyntaxError"),
      "import": (["sweeps", "--config", f"{tmp}/imports.py", "--workdir", f"{tmp}/s"],
                 f"config file {tmp}/imports.py line 1: ModuleNotFoundError"),
      "type": (["train", *TINY, "--workdir", f"{tmp}/r1", "--config.train.steps=abc"],
               "flag --config.train.steps=abc"),
      "huge": (["train", *TINY, "--workdir", f"{tmp}/r1", "--config.model.max_len=1000000000000",
                "--config.model.positions=learned"], "GiB per device"),
      "file": (["train", *TINY, "--workdir", f"{tmp}/afile"], "a file is in the way"),
      "under": (["train", *TINY, "--workdir", f"{tmp}/afile/run"], "a file is in the way"),
      "held": (["train", *TINY, "--workdir", str(held)], f"is in use by pid {os.getpid()}"),
      "sweep": (["sweeps", "--config", "tests/sweeps/one.py", "--workdir", f"{tmp}/sweeps"],
                f"is in use by pid {os.getpid()}"),
      "shard": (["train", *TINY, "--workdir", f"{tmp}/r1", "--config.task.name=text",
                 f"--config.task.path={broken}", "--config.task.train_length=32",
                 "--config.task.test_lengths=()", "--config.model.attention=full"],
                f"{shard} holds token id 60000, past the vocabulary of"),
  }
  before = snapshot(tmp)
  with lock.hold(held), lock.hold(held_sweep):
    results = dict(zip(cases, run_all([argv for argv, _ in cases.values()])))
  return tmp, cases, results, before


@pytest.mark.parametrize("case", ["key", "section", "missing", "syntax", "import", "type", "huge",
                                  "file", "under", "held", "sweep", "shard"])
def test_bad_input_is_one_line_and_writes_nothing(bad, case):
  tmp, cases, results, before = bad
  line = one_error_line(results[case])
  assert cases[case][1] in line, line
  after = snapshot(tmp)
  assert {k: v for k, v in after.items() if not k.endswith(lock.LOCK)} == \
      {k: v for k, v in before.items() if not k.endswith(lock.LOCK)}
  assert not os.path.exists(tmp / "r1")


def test_a_read_only_workdir_is_one_line(tmp_path):
  with mounted_tmpfs(tmp_path / "ro", "1m", "ro") as ro:
    out = run_all([["train", *TINY, "--workdir", f"{ro}/run"]])[0]
  assert "cannot write in" in one_error_line(out) and "Read-only file system" in out.stderr


# -- one writer at a time ---------------------------------------------------------------------------

def test_a_second_trainer_on_a_run_is_refused_and_the_first_finishes_alone(tmp_path):
  run = tmp_path / "run"
  first = subprocess.Popen([sys.executable, "-m", "train", *TINY, "--workdir", str(run),
                            "--config.train.steps=300", "--config.train.checkpoint_every=100"],
                           cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  deadline = time.time() + 120
  while (read_status(run) or {}).get("status") != "running":
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.2)
  second = run_all([["train", *TINY, "--workdir", str(run), "--config.train.seed=1"]])[0]
  line = one_error_line(second)
  assert f"is in use by pid {first.pid}" in line and "python -m train" in line
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in l]
  assert steps == sorted(set(steps)) and steps[-1] == 300  # one writer: no step logged twice
  assert json.loads((run / "config.json").read_text())["train"]["seed"] == 0
  assert read_status(run)["status"] == "done"


def test_a_sweep_leaves_a_trial_another_process_holds(tmp_path):
  trial = tmp_path / "one" / "k2"
  trial.mkdir(parents=True)
  (trial / "status.json").write_text('{"status": "running", "step": 3}')
  before = snapshot(trial)
  with lock.hold(trial):
    out = run_all([["sweeps", "--config", "tests/sweeps/one.py", "--workdir", str(tmp_path)]])[0]
  assert out.returncode == 1, out.stderr[-2000:]
  assert f"skipped: {trial} is in use by pid {os.getpid()}" in out.stderr
  assert {k: v for k, v in snapshot(trial).items() if k != lock.LOCK} == before


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
  code = f"from rundir import lock; lock.acquire({str(tmp_path)!r}); print('held', flush=True); " \
         "import time; time.sleep(60)"
  holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(lock.Locked, match=f"in use by pid {holder.pid} on host"):
    lock.acquire(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with lock.hold(tmp_path), lock.hold(tmp_path):  # taken, and re-entrant within one process
    assert lock.held(tmp_path) and lock.holder(tmp_path)["pid"] == os.getpid()
  assert not lock.held(tmp_path)


def test_a_lease_refuses_a_live_holder_and_takes_over_a_dead_or_silent_one(tmp_path, monkeypatch):
  """The object-store lease (its code is path-agnostic; exercised on a local directory)."""
  d = str(tmp_path)
  first = lock._lock_lease(d, shared=False)
  with pytest.raises(lock.Locked, match=f"in use by pid {os.getpid()}"):
    lock._lock_lease(d, shared=False)
  first.beat.set()
  record = json.loads((tmp_path / lock.LOCK).read_text())
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True).stdout.strip()
  (tmp_path / lock.LOCK).write_text(json.dumps({**record, "pid": int(dead)}))
  lock._lock_lease(d, shared=False).beat.set()  # its holder is a dead process on this host
  (tmp_path / lock.LOCK).write_text(json.dumps({**record, "host": "elsewhere",
                                                "heartbeat": time.time() - lock.STALE_S - 1}))
  lock._lock_lease(d, shared=False).beat.set()  # its heartbeat stopped
  assert json.loads((tmp_path / lock.LOCK).read_text())["host"] != "elsewhere"


# -- failures are recorded ----------------------------------------------------------------------------

def test_a_disk_that_fills_mid_run_is_recorded_and_the_run_resumes_elsewhere(tmp_path):
  with mounted_tmpfs(tmp_path / "small", "1200k") as small:
    run = os.path.join(small, "run")
    out = run_all([["train", *TINY, "--workdir", run, "--config.train.checkpoint_every=5",
                    "--config.train.keep_checkpoints=10"]])[0]
    errors = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith("train:")]
    assert out.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: disk full: "), \
        out.stderr[-3000:]
    status = read_status(run)
    assert status["status"] == "failed", (out.stderr[-600:], status)
    assert status["status"] == "failed" and status["error"].startswith("disk full: ")
    steps = sorted(int(d) for d in os.listdir(f"{run}/checkpoints") if d.isdigit())
    assert steps and status["step"] == steps[-1] < 40
    assert "Traceback" in open(f"{run}/error.log").read()
    shutil.copytree(run, tmp_path / "moved", ignore=shutil.ignore_patterns("*-tmp"))
    with pytest.raises(OSError, match="No space left"):  # the disk full from the start
      with open(os.path.join(small, "filler"), "wb") as f:  # (opening may already fail)
        while True:
          f.write(b"\0" * 65536)
          f.flush()
    full = run_all([["train", *TINY, "--workdir", f"{small}/second"]])[0]
    assert "No space left on device" in one_error_line(full)
  again = run_all([["train", *TINY, "--workdir", str(tmp_path / "moved")]])[0]
  assert again.returncode == 0, again.stderr[-2000:]
  assert read_status(tmp_path / "moved")["status"] == "done"
  assert read_status(tmp_path / "moved")["resumed_from"] == steps[-1]


# -- data is checked before it is trained on -------------------------------------------------------

def test_a_torn_metrics_line_is_cut_on_resume_and_skipped_by_readers(tmp_path, capsys):
  file = tmp_path / "metrics.jsonl"
  file.write_text('{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/lo')
  JsonlFile(file).write({"step": 10, "train/loss": 0.5})
  assert "removed a torn last line" in capsys.readouterr().err
  assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10]
  file.write_text('{"step": 5, "train/loss": 1.0}\n{"step": 10, "tr\n{"step": 15, "train/loss": 0.2}\n')
  assert [r["step"] for r in read_metrics(tmp_path)] == [5, 15]
  assert "line 2 is torn" in capsys.readouterr().err


def test_a_shard_with_ids_past_the_vocabulary_is_refused(corpus, tmp_path):
  copy = tmp_path / "c"
  shutil.copytree(corpus[0], copy)
  TextData(str(copy))
  shard = sorted(copy.glob("val-*.bin"))[0]
  ids = np.fromfile(shard, np.uint16)
  ids[-1] = 300
  time.sleep(0.01)  # a new modification time: the shard is checked again
  ids.tofile(shard)
  with pytest.raises(DataError, match=f"{shard} holds token id 300, past the vocabulary of 258"):
    TextData(str(copy))
