"""Every command that README.md and docs/*.md show runs as shown, so the pages and the code cannot
drift apart.

Each fenced ```bash block is split into commands. The `python -m PACKAGE ...` commands of ours run in
two worker processes (the smoke sweep in one, the rest in the other), each command in-process through
`runpy`, one of two ways:
  run    for real, where that is cheap: every sweep with `--dry-run` added (which expands the trials
         and checks each one's config; not a `--topology` preflight, which compiles for a TPU slice), `sweeps report` and `export-wandb`, `train.data prepare` and
         `verify` on a tiny corpus, `eval generate --prompt` on the Shakespeare preset trained for one
         step (the preset's real context, so a prompt and --max-new that do not fit fail), and the
         smoke sweep of `make smoke`: its first trial with tiny overrides, trained, evaluated and
         reported;
  parse  the command line parsed by the program's own parser (absl flags with the config file loaded
         and every --config.KEY=VALUE applied, or argparse) and stopped before its main work: a
         renamed command, flag, config file or config key fails. (absl's `--help` would not do: it
         prints and exits before it reads the flags after it.)
`runs/...`, `data/...`, `gs://...` and output files are redirected into a temporary directory.
`.venv-tpu/bin/python -m ...` (the TPU compiler's environment) is checked as `python -m ...`.
`make TARGET` must be a Makefile target, and its recipe's python commands are checked as above (`make
run` and `make test` are not run); other programs must be on a short list, install lines must name
requirements.txt's pins. ```python blocks must parse and their imports resolve. Links between the
pages must point to files that exist (tests/test_layers.py checks that none points outside the
repository), and every key of configs/base.py must be in docs/config.md with its default.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"configs", "looped_models", "tasks", "rundir", "train", "eval", "convert", "sweeps", "bench"}
EXTERNAL = {"wandb", "huggingface-cli", "cd", "source"}  # programs not ours, shown as they are
# The smoke sweep at a tiny size: a couple of steps, the evaluation at its smallest.
TINY = ["--config.train.steps=2", "--config.eval.iterations=3", "--config.eval.batch_size=2",
        "--config.train.eval_batch_size=8"]


def doc_files() -> list[Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(lang: str) -> list[tuple[str, int, str]]:
  """(file, line, text) of every fenced block of `lang` in the pages."""
  out = []
  for f in doc_files():
    text = f.read_text()
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.M | re.S):
      out.append((f.name, text.count("\n", 0, m.start()) + 2, m.group(1)))
  return out


def split_commands(script: str) -> list[list[str]]:
  """The commands of a shell block: lines joined at trailing backslashes, comments dropped, split
  at && and ;."""
  out = []
  for line in script.replace("\\\n", " ").splitlines():
    words = shlex.split(line, comments=True)
    cmd: list[str] = []
    for w in words + ["&&"]:
      if w in ("&&", ";"):
        if cmd:
          out.append(cmd)
        cmd = []
      else:
        cmd.append(w)
  return out


def make_targets() -> set[str]:
  return set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))


def make_recipe(target: str) -> list[list[str]]:
  """The python commands of ours that `make TARGET` would run, as `python -m ...`."""
  out = subprocess.run(["make", "-n", "-s", target], cwd=ROOT, capture_output=True, text=True,
                       timeout=30).stdout
  cmds = []
  for line in out.replace("\\\n", " ").splitlines():
    words = shlex.split(line)
    if len(words) > 2 and words[0].endswith("/python") and words[1] == "-m" and \
        words[2].split(".")[0] in OURS:
      cmds.append(["python"] + words[1:])
  return cmds


def localize(argv: list[str], tmp: str) -> list[str]:
  """`argv` with the paths it would write or read redirected into `tmp`."""
  out, flag = [], None
  for w in argv:
    name, eq, value = w.partition("=") if w.startswith("--") else ("", "", w)
    key = name if eq else flag
    if w.startswith("--") and not eq:
      flag = w
      out.append(w)
      continue
    flag = None
    if key == "--input":
      value = f"{tmp}/texts.jsonl" if value.endswith(".jsonl") else f"{tmp}/texts/*.txt"
    elif value == "runs" or value.startswith(("runs/", "data/")):
      value = f"{tmp}/{value}"
    elif re.match(r"configs/.*\.py:runs/", value):  # a sweep file's argument: a run directory
      value = value.replace(":runs/", f":{tmp}/runs/")
    elif value.startswith("gs://"):
      value = f"{tmp}/gs/{value[5:]}"
    elif key in ("--out", "--batch") and not value.startswith(("/", "~")):
      value = f"{tmp}/{value}"
    out.append(f"{name}={value}" if eq else value)
  return out


def plan(argv: list[str], where: str, tmp: str, smoke: bool = False) -> dict:
  """How one `python -m ...` command is checked (see the module's docstring)."""
  module, args = argv[2], localize(argv[3:], tmp)
  sub = next((a for a in args if not a.startswith("-")), None) if module in ("sweeps", "eval") else None
  mode, needs = "parse", None
  if module == "sweeps":
    if smoke:
      mode, args = "smoke", args + TINY
    elif sub == "report":
      mode, needs = "run if it exists", f"{args[-1]}/sweep.json"
    elif sub == "export-wandb":
      mode = "run"
    elif any(a.startswith("--topology") for a in args):
      mode = "parse"  # compiling a pod preset for its slice takes minutes: tests/test_aot.py runs it
    else:
      mode, args = "run", args + ([] if "--dry-run" in args else ["--dry-run"])
    if sub != "report" and not any(a.startswith("--workdir") for a in args):
      args += ["--workdir", f"{tmp}/runs"]
  elif module == "train.data":
    tok = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--tokenizer"), "byte")
    if args[:1] == ["prepare"] and (tok == "byte" or tok.startswith("bpe:")):
      mode = "run"
    elif args[:1] == ["verify"]:
      mode, needs = "run if it exists", f"{args[-1]}/meta.json"
  elif module == "eval" and sub == "generate" and f"{tmp}/runs/shakespeare" in args and \
      any(a.startswith("--prompt") for a in args):
    mode = "run"
  same = [a for i, a in enumerate(args) if not a.startswith(("--parallel", "--workdir")) and
          not (i and args[i - 1] in ("--parallel", "--workdir"))]
  return {"module": module, "args": args, "mode": mode, "needs": needs, "where": where, "same": same,
          "shown": " ".join(shlex.quote(a) for a in argv)}


def check_other(argv: list[str], where: str, tmp: str, jobs: list[dict], problems: list[str]) -> None:
  """A command that is not `python -m OURS`: a make target, an install line, a known program."""
  prog = argv[0]
  if prog == "make":
    for target in argv[1:] or ["run"]:
      if target not in make_targets():
        problems.append(f"{where}: `make {target}`: no such Makefile target")
      elif target not in ("run", "test"):  # the main job and the suite are not run here
        for cmd in make_recipe(target):
          jobs.append(plan(cmd, f"{where} (make {target})", tmp, smoke=target == "smoke"))
  elif prog == "pip":
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    for w in argv:
      m = re.match(r"([\w.-]+)(\[[\w,]+\])?==(\S+)$", w)
      if m and m.group(1) in pins and pins[m.group(1)] != m.group(3):
        problems.append(f"{where}: {w} but requirements.txt pins {m.group(1)}=={pins[m.group(1)]}")
    if "-r" in argv and not (ROOT / argv[argv.index("-r") + 1]).is_file():
      problems.append(f"{where}: {' '.join(argv)}: no such requirements file")
  elif argv[:3] == ["python3", "-m", "venv"]:
    pass
  elif prog == "bash":
    script = ROOT / argv[1]
    if not script.is_file() or subprocess.run(["bash", "-n", str(script)]).returncode:
      problems.append(f"{where}: {' '.join(argv)}: no such script, or not valid bash")
  elif prog == "gcloud":  # the command each worker runs is ours: check it
    if "--command" in argv:
      for cmd in split_commands(argv[argv.index("--command") + 1]):
        classify(cmd, where, tmp, jobs, problems)
  elif prog not in EXTERNAL:
    problems.append(f"{where}: {' '.join(argv)}: a program this test does not know; show `python -m`")


def classify(argv: list[str], where: str, tmp: str, jobs: list[dict], problems: list[str]) -> None:
  if argv[0] == ".venv-tpu/bin/python":  # the TPU compiler's environment (make tpu-setup)
    argv = ["python", *argv[1:]]
  if argv[:2] == ["python", "-m"] and len(argv) > 2 and argv[2].split(".")[0] in OURS:
    jobs.append(plan(argv, where, tmp))
  elif argv[0].endswith("python") or argv[0].endswith("/python3"):
    problems.append(f"{where}: {' '.join(argv)}: commands are shown as `python -m PACKAGE ...`")
  else:
    check_other(argv, where, tmp, jobs, problems)


def test_every_documented_command_runs(tmp_path):
  tmp = str(tmp_path)
  jobs: list[dict] = []
  problems: list[str] = []
  shown = blocks("bash")
  assert shown, "no ```bash blocks found"
  for file, line, script in shown:
    for argv in split_commands(script):
      classify(argv, f"{file}:{line}", tmp, jobs, problems)
  assert not problems, "\n".join(problems)
  modules = {j["module"] for j in jobs}
  assert {"sweeps", "train", "eval", "train.data", "convert"} <= modules, modules

  smoke = [j for j in jobs if "(make smoke)" in j["where"] or
           (j["module"] == "sweeps" and f"{tmp}/runs/smoke" in j["args"] and "report" in j["args"])]
  assert smoke and smoke[0]["mode"] == "smoke", "the README shows `make smoke`"
  rest = [j for j in jobs if j not in smoke]
  env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": f"{tmp}/wandb",
         "PYTHONPATH": str(ROOT)}
  os.makedirs(f"{tmp}/wandb", exist_ok=True)
  procs = []
  for name, batch in (("smoke", smoke), ("rest", rest)):
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"tmp": tmp, "jobs": batch, "fixtures": name == "rest",
                                "python_blocks": blocks("python") if name == "rest" else []}))
    procs.append(subprocess.Popen([sys.executable, __file__, str(spec)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  failures = []
  for name, p in zip(("smoke", "rest"), procs):
    out, _ = p.communicate(timeout=600)
    result = tmp_path / f"{name}.json.failures"
    assert result.is_file(), f"the {name} worker stopped early:\n{out[-4000:]}"
    failures += json.loads(result.read_text())
  assert not failures, "\n\n".join(failures)
  assert (tmp_path / "runs/smoke/report.md").is_file(), "make smoke wrote no runs/smoke/report.md"


def test_pages_link_to_files_that_exist():
  bad = []
  for f in doc_files():
    text = f.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
      if not target.startswith(("http://", "https://")) and not (f.parent / target).exists():
        bad.append(f"{f.name}: link to {target}, which does not exist")
  assert not bad, "\n".join(bad)
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 160, "README.md is meant to be read in five minutes"
  for page in (ROOT / "docs").glob("*.md"):
    assert f"docs/{page.name}" in readme, f"README.md does not link to docs/{page.name}"


def test_makefile_targets():
  assert {"setup", "run", "smoke", "test", "shakespeare", "gpu-wheels", "bench"} <= make_targets()
  assert make_recipe("smoke") == [["python", "-m", "sweeps", "--config", "configs/sweeps/smoke.py",
                                   "--workdir", "runs"]]


def _documented_keys() -> dict[str, str]:
  """key -> its default's text, from docs/config.md's table (`section.a, b` rows name several)."""
  keys = {}
  for line in (ROOT / "docs/config.md").read_text().splitlines():
    if not line.startswith("| `"):
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    names = [n.strip() for n in ",".join(re.findall(r"`([^`]+)`", cells[0])).split(",")]
    section = names[0].split(".")[0]
    names = [n if "." in n else f"{section}.{n}" for n in names]
    defaults = _split_top(cells[1])
    for i, n in enumerate(names):
      keys[n] = defaults[i] if len(defaults) == len(names) else None
  return keys


def _split_top(text: str) -> list[str]:
  """`a, (b, c), d` -> [a, (b, c), d]."""
  parts, depth, cur = [], 0, ""
  for ch in text:
    depth += ch in "([" and 1 or 0
    depth -= ch in ")]" and 1 or 0
    if ch == "," and depth == 0:
      parts.append(cur.strip())
      cur = ""
    else:
      cur += ch
  return [p for p in parts + [cur.strip()] if p]


def test_every_config_key_is_documented_with_its_default():
  sys.path.insert(0, str(ROOT))
  from configs.base import get_config

  flat = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        flat[f"{prefix}{k}"] = v

  walk(get_config().to_dict(), "")
  documented = _documented_keys()
  assert not set(flat) - set(documented), f"keys missing from docs/config.md: {set(flat) - set(documented)}"
  assert not set(documented) - set(flat), f"docs/config.md names unknown keys: {set(documented) - set(flat)}"
  wrong = []
  for key, text in documented.items():
    if text is None:
      continue
    try:
      shown = ast.literal_eval(text.replace("`", "'") if text != '""' else "''")
    except (ValueError, SyntaxError):
      continue
    value = flat[key]
    if isinstance(value, (list, tuple)):
      value, shown = tuple(value), tuple(shown) if isinstance(shown, (list, tuple)) else shown
    if shown != value:
      wrong.append(f"{key}: docs/config.md says {text}, configs/base.py has {value!r}")
  assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- the worker (a separate process)

class _Parsed(Exception):
  """Raised once a command line has been parsed, in `parse` mode."""


def _run_in_process(job: dict, output: bool = False) -> str | None:
  """Run or parse one command in this process; the failure's text, or None (or, with `output`, what
  it printed)."""
  import argparse
  import io
  import runpy
  import traceback
  from contextlib import redirect_stderr, redirect_stdout

  from absl import app, flags

  module, args, mode = job["module"], job["args"], job["mode"]
  if mode == "run if it exists":  # what a documented command made earlier, else parse only
    mode = "run" if Path(job["needs"]).exists() else "parse"
  if mode == "smoke":  # one trial of the sweep (the first its --dry-run lists), at a tiny size
    listing = _run_in_process({**job, "mode": "run", "args": args + ["--dry-run"]}, output=True)
    args, mode = args + ["--trial", listing.split()[0]], "run"
  FLAGS = flags.FLAGS
  before = set(FLAGS)
  source = _module_source(module)
  real_parse, real_run = argparse.ArgumentParser.parse_args, app.run

  parsed = []

  def parse_args(self, args=None, namespace=None):
    ns = real_parse(self, args, namespace)
    parsed.append(True)
    if mode == "parse":
      raise _Parsed
    return ns

  def run(main, argv=None, **kw):
    rest = FLAGS(sys.argv)  # unknown flags, bad values, a missing config file or key raise here
    parsed.append(True)
    if mode == "parse":
      if len(rest) > 1 and f'"{rest[1]}"' not in source:
        raise SystemExit(f"error: {module} has no command {rest[1]!r}")
      raise _Parsed
    raise SystemExit(main(rest))

  argparse.ArgumentParser.parse_args, app.run = parse_args, run
  sys.argv = [module] + args
  out = io.StringIO()
  code: object = 0
  try:
    with redirect_stdout(out), redirect_stderr(out):
      runpy.run_module(module, run_name="__main__", alter_sys=True)
  except _Parsed:
    pass
  except SystemExit as e:
    code = e.code
  except BaseException:  # noqa: BLE001 - any error is the command's failure
    code = traceback.format_exc()
  finally:
    argparse.ArgumentParser.parse_args, app.run = real_parse, real_run
    FLAGS.unparse_flags()
    for name in set(FLAGS) - before:
      delattr(FLAGS, name)
  if mode == "parse" and not parsed and code in (0, None):
    code = "its command line was not read through absl.app.run or argparse: it ran, unchecked"
  if code in (0, None):
    return out.getvalue() if output else None
  return f"exit {code}\n{out.getvalue()[-3000:]}" if isinstance(code, int) else f"{code}\n{out.getvalue()[-3000:]}"


def _module_source(module: str) -> str:
  path = ROOT / module.replace(".", "/")
  path = path / "__main__.py" if path.is_dir() else path.with_suffix(".py")
  return path.read_text() if path.is_file() else ""


def _fixtures(tmp: str) -> list[str]:
  """A tiny corpus (text files, JSONL, prompts), and the Shakespeare preset trained for one step on
  it in runs/shakespeare: what the documented commands read."""
  import random
  rng = random.Random(0)
  words = ("now is the winter of our discontent made glorious summer by this sun of york and all the "
           "clouds that lour'd upon our house in the deep bosom of the ocean buried").split()
  os.makedirs(f"{tmp}/texts", exist_ok=True)
  for i in range(6):
    Path(f"{tmp}/texts/doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(800)))
  Path(f"{tmp}/texts.jsonl").write_text("".join(
      json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n" for _ in range(4)))
  Path(f"{tmp}/prompts.txt").write_text("ROMEO. \nJULIET. \n")
  steps = [
      {"module": "train.data", "mode": "run", "args": ["prepare", "--input", f"{tmp}/texts/*.txt",
                                                       "--out", f"{tmp}/corpus"]},
      {"module": "train", "mode": "run", "args": [
          "--config", "configs/lm_shakespeare.py", "--workdir", f"{tmp}/runs/shakespeare",
          f"--config.task.path={tmp}/corpus", "--config.train.steps=1", "--config.train.batch_size=2",
          "--config.train.eval_every=-1", "--config.wandb.mode=disabled"]},
  ]
  return [f"fixture {s['module']} {s['args']}: {err}" for s in steps if (err := _run_in_process(s))]


def _worker(spec_file: str) -> int:
  spec = json.loads(Path(spec_file).read_text())
  failures = _fixtures(spec["tmp"]) if spec["fixtures"] else []
  for file, line, code in spec["python_blocks"]:
    try:
      tree = ast.parse(code)
    except SyntaxError as e:
      failures.append(f"{file}:{line}: ```python block does not parse: {e}")
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        try:
          exec(compile(ast.Module([node], []), file, "exec"), {})
        except Exception as e:  # noqa: BLE001
          failures.append(f"{file}:{line}: {ast.unparse(node)}: {e!r}")
  seen = set()
  for job in spec["jobs"]:
    if job["mode"] == "run" and json.dumps([job["module"], job["same"]]) in seen:
      continue  # a sweep listed again with another --parallel or --workdir: nothing new to check
    seen.add(json.dumps([job["module"], job["same"]]))
    err = _run_in_process(job)
    if err:
      failures.append(f"{job['where']}: `{job['shown']}` ({job['mode']}: {job['module']} "
                      f"{' '.join(job['args'])}): {err}")
  Path(spec_file + ".failures").write_text(json.dumps(failures))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.path[0] = str(ROOT)  # not tests/, whose folders would shadow the packages
  sys.exit(_worker(sys.argv[1]))
