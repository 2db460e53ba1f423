"""`python -m train.aot`: the trainer's programs compiled for a TPU slice that is not attached (libtpu
in .venv-tpu, made by `make tpu-setup`, which `make test` runs first), on a tiny config."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from rundir.workdir import read_status
from train import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.path.join(ROOT, ".venv-tpu", "bin", "python")
TINY = ["--config", "tests/tiny_config.py"]
# Past a v5e chip's 16 GiB: about 3.4e9 parameters and their Adam moments on every chip (the mesh is
# data-parallel only).
HUGE = ["--config.model.d_model=8192", "--config.model.n_heads=64", "--config.model.d_ff=32768",
        "--config.model.vocab_size=65536", "--config.model.max_len=64",
        "--config.train.batch_size=4", "--config.train.eval_batch_size=4"]


def test_accelerator_type_names():
  assert tpu.parse("v5e-16").grid == (4, 4) and tpu.parse("v5e-256").chips == 256
  assert tpu.parse("v5p-128").chips == 64 and tpu.parse("v5p-128").grid == (4, 4, 4)
  assert tpu.parse("v4-64").compiler_name == "v4:2x4x4" and tpu.parse("v6e-8").grid == (2, 4)
  assert tpu.parse("v5e:4x8").chips == 32
  for bad in ("v5e-3", "v5p-6", "v9-8", "tpu", "v5e:4x4x4"):
    with pytest.raises(tpu.ConfigError, match="--topology"):
      tpu.parse(bad)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  """The tiny config on v5e-4, 2 slices of v5e-4, a model too large for it, and a bad topology,
  compiled at once."""
  if not os.path.exists(TPU_PYTHON):
    pytest.fail(".venv-tpu is missing: run `make tpu-setup` (make test does)")
  tmp = tmp_path_factory.mktemp("aot")
  env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests", "WANDB_MODE": "disabled"}
  env.pop("JAX_PLATFORMS", None)
  runs = {"tiny": [*TINY, "--topology", "v5e-4", "--out", f"{tmp}/tiny.json"],
          "slices": [*TINY, "--topology", "v5e-4", "--slices", "2", "--config.mesh.data=2",
                     "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--programs", "train_step",
                     "--out", f"{tmp}/slices.json"],
          "huge": [*TINY, *HUGE, "--topology", "v5e-4", "--programs", "train_step",
                   "--out", f"{tmp}/huge.json"],
          "unknown": [*TINY, "--topology", "v5e-3"]}
  runs = {k: ["train.aot", *a] for k, a in runs.items()}
  sweep = ["sweeps", "--config", "tests/sweeps/aot.py", "--topology", "v5e-4", "--workdir", str(tmp)]
  runs.update(preflight=[*sweep, "--dry-run"], launch=sweep)
  procs = {k: subprocess.Popen([TPU_PYTHON, "-m", *a], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               env={**env, "JAX_PLATFORMS": "cpu"} if k == "launch" else env)
           for k, a in runs.items()}
  out = {}
  for k, p in procs.items():
    stdout, stderr = p.communicate(timeout=600)
    path = f"{tmp}/{k}.json"
    out[k] = (p.returncode, stdout, stderr, json.load(open(path)) if os.path.exists(path) else None)
  out["sweep_dir"] = tmp / "aot"
  return out


def test_a_tiny_config_fits_and_every_program_is_reported(compiled):
  code, stdout, stderr, report = compiled["tiny"]
  assert code == 0, stderr[-3000:]
  assert stdout.strip().splitlines()[-1].startswith("fits: 0.0 of 16 GiB")
  assert "Failed to find host bounds" not in stderr  # libtpu told there is no TPU to look for
  assert report["topology"] == "v5e-4" and report["chips"] == 4 and report["fits"] is True
  assert report["hbm_bytes_per_chip"] == 16 * 1024 ** 3 and report["mesh"]["data"] == 4
  assert set(report["programs"]) == {"train_step", "eval_step", "decode_step"}
  for name, p in report["programs"].items():
    assert p["fits"] is True and p["argument_bytes"] > 0 and p["temp_bytes"] >= 0, name
    assert p["flops"] > 0 and p["compile_s"] > 0 and p["step_time_lower_bound_s"] > 0, name
    assert 0 < p["mfu_upper_bound"] <= 1, name
  # Data parallelism over 4 chips: the gradients are summed by an all-reduce.
  assert report["programs"]["train_step"]["collectives"]["all-reduce"]["count"] >= 1


def test_two_slices_lay_the_data_axis_across_them(compiled):
  code, _, stderr, report = compiled["slices"]
  assert code == 0, stderr[-3000:]
  assert report["slices"] == 2 and report["chips"] == 8
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report["axes_across_slices"] == ["data"]  # FSDP and tensor stay within a slice
  coll = report["programs"]["train_step"]["collectives"]
  assert coll["all-gather"]["count"] >= 1 and coll["all-reduce"]["count"] >= 1


def test_a_model_too_large_for_the_chip_does_not_fit(compiled):
  code, stdout, stderr, report = compiled["huge"]
  assert code == 1, stderr[-3000:]
  need = report["programs"]["train_step"]["total_bytes"] / 1024 ** 3
  assert report["fits"] is False and need > 16
  assert stdout.strip().splitlines()[-1] == f"does not fit: needs {need:.1f} of 16 GiB"


def test_an_unknown_topology_is_one_line(compiled):
  code, _, stderr, report = compiled["unknown"]
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert code == 2 and report is None and len(lines) == 1, stderr[-2000:]
  assert lines[0].startswith("error: config error: --topology='v5e-3'") and "no v5e slice has 3" in lines[0]


def test_a_sweep_preflight_lists_each_trial_and_a_launch_refuses_what_does_not_fit(compiled):
  code, stdout, stderr, _ = compiled["preflight"]
  assert code == 0, stderr[-3000:]
  rows = dict(line.split("\t")[::2] for line in stdout.splitlines() if "\t" in line)
  huge = next(name for name in rows if name.startswith("d8192"))
  assert rows["d32"] == "fits: 0.0 of 16 GiB" and rows[huge].startswith("does not fit: needs ")
  assert stderr.count("compiling ") == 2  # one compile per trial shape
  code, _, stderr, _ = compiled["launch"]
  assert code == 1, stderr[-3000:]  # one trial refused, the other done
  refused = read_status(compiled["sweep_dir"] / huge)
  assert refused["status"] == "failed" and refused["error"].startswith("does not fit v5e-4 (")
  assert not (compiled["sweep_dir"] / huge / "checkpoints").exists()
  assert read_status(compiled["sweep_dir"] / "d32")["status"] == "done"
