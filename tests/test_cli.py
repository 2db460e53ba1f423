"""The one command-line style and error path (rundir/cli.py): every command answers a bad command line
with one line `error: ...` on stderr and exit status 2, and lists its flags under --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from absl import flags

import convert
from rundir.cli import UsageError, call, command, guard, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["train", "eval", "sweeps", "convert", "train.data"]


def run_all(argvs: list[list[str]], cwd: str = ROOT) -> list[subprocess.CompletedProcess]:
  """`python -m ARGV...` for each of `argvs`, at once; their results in order."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT}/tests", "WANDB_MODE": "disabled"}
  procs = [subprocess.Popen([sys.executable, "-m", *a], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]
  out = []
  for a, p in zip(argvs, procs):
    stdout, stderr = p.communicate(timeout=300)
    out.append(subprocess.CompletedProcess([sys.executable, "-m", *a], p.returncode, stdout, stderr))
  return out


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a command that stopped on bad input (exit status 2)."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
      proc.args, proc.returncode, proc.stderr[-3000:])
  return lines[0]


BAD = [([c, "--no-such-flag"], "Unknown command line flag 'no-such-flag'") for c in COMMANDS] + [
    (["train", "--config", "tests/tiny_config.py"], "--workdir is required"),
    (["eval", "no-such-command", "--workdir", "{tmp}/r"], "unexpected arguments ['no-such-command']"),
    (["convert", "import", "x", "--out", "{tmp}/x"], "unknown command 'import'"),
    (["train.data", "prepare", "--out", "{tmp}/c"], "--input is required"),
    (["train.data", "prepare", "--input", "x.txt", "--val-fraction", "a lot", "--out", "{tmp}/c"],
     "flag --val-fraction=a lot"),
    (["train.data", "check", "{tmp}"], "unknown command 'check'; allowed: prepare, verify"),
]
HELP = {"train": ["--workdir", "--config"], "eval": ["--workdir", "--max-new"],
        "sweeps": ["--parallel", "--dry-run"], "convert": ["--out", "--shard_gb", "--state0"],
        "train.data": ["--input", "--val-fraction", "--lines"]}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """Every command line of BAD, `--help` of each command and a `train.data prepare` with `--input`
  twice, run at once: (their results, the bad lines' directory, the corpus's texts directory)."""
  tmp, texts = tmp_path_factory.mktemp("bad"), tmp_path_factory.mktemp("texts")
  (texts / "a.txt").write_text("first document\n")
  (texts / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "x"}))
  argvs = [[a.format(tmp=tmp) for a in argv] for argv, _ in BAD] + [[c, "--help"] for c in HELP]
  argvs.append(["train.data", "prepare", "--input", str(texts / "a.txt"), f"--input={texts}/b.jsonl",
                "--val-fraction=0", "--out", str(texts / "corpus")])
  return run_all(argvs), tmp, texts


def test_every_command_answers_a_bad_command_line_with_one_line_and_exit_2(ran):
  procs, tmp, _ = ran
  for (argv, message), proc in zip(BAD, procs):
    assert message in one_error_line(proc), (argv, proc.stderr)
  assert os.listdir(tmp) == []  # nothing written


def test_help_lists_the_flags_and_exits_0(ran):
  for (c, names), proc in zip(HELP.items(), ran[0][len(BAD):]):
    assert proc.returncode == 0, (c, proc.stderr[-2000:])
    for name in names:
      assert f"{name.lstrip('-')}:" in proc.stdout, (c, name, proc.stdout)  # bools: --[no]NAME


def test_repeatable_input_flag(ran):
  """`--input` is repeatable (DEFINE_multi_string): both files' documents are prepared."""
  proc, texts = ran[0][-1], ran[2]
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "train 3 documents" in proc.stdout, proc.stdout
  assert json.load(open(texts / "corpus" / "meta.json"))["splits"]["train"]["documents"] == 3


@pytest.mark.parametrize("argv,message", [
    ([], "a command is required; allowed: from-raven, to-raven, logits"),
    (["to-raven", "{tmp}/r"], "--out is required"),
    (["logits", "{tmp}/r", "--out", "{tmp}/o.npz"], "--tokens is required"),
    (["from-raven", "--out", "{tmp}/x"], "from-raven needs HF_DIR"),
    (["from-raven", "a", "b", "--out", "{tmp}/x"], "unexpected arguments ['b']"),
    (["to-raven", "{tmp}/r", "--out", "{tmp}/x", "--shard_gb", "big"], "flag --shard_gb=big"),
])
def test_convert_command_line_in_process(tmp_path, capsys, argv, message):
  """`convert.main` parses flags of its own: the same one line and exit status 2."""
  assert convert.main([a.format(tmp=tmp_path) for a in argv]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not any((tmp_path / name).exists() for name in ("r", "x", "o.npz"))


def test_command_splits_subcommand_and_arguments():
  table = {None: [], "report": ["DIR"], "export": []}
  assert command(["p"], table) == (None, [])
  assert command(["p", "report", "runs/x"], table) == ("report", ["runs/x"])
  assert command(["p", "export"], table) == ("export", [])
  for argv, message in ((["p", "what"], "unexpected arguments ['what']"),
                        (["p", "report"], "report needs DIR"),
                        (["p", "report", "a", "b"], "unexpected arguments ['b']")):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
      command(argv, table)
  with pytest.raises(UsageError, match="a command is required; allowed: report, export"):
    command(["p"], {"report": ["DIR"], "export": []})


def test_call_parses_its_own_flags_and_reports_bad_input(capsys):
  fv = flags.FlagValues()
  out = flags.DEFINE_string("out", None, "the output", flag_values=fv)
  n = flags.DEFINE_integer("n", 1, "a count", flag_values=fv)

  def main(argv):
    require(out)
    return n.value + len(argv)

  assert call(main, ["p", "--out", "x", "--n", "3", "word"], fv) == 5
  fv.unparse_flags()
  assert call(main, ["p", "--n", "3"], fv) == 2
  fv.unparse_flags()
  assert call(main, ["p", "--n=three"], fv) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == ["error: --out is required", "error: flag --n=three: invalid literal for int() with "
                 "base 10: 'three'"], err

  class Other(Exception):
    pass

  def fails(kind):
    raise kind("line one\nline two")
  assert guard(fails, also=(Other,))(Other) == 2
  assert capsys.readouterr().err == "error: line one; line two\n"
  with pytest.raises(KeyError):  # not bad input: a bug, with its traceback
    guard(fails)(KeyError)
