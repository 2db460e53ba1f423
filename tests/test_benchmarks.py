"""The lm-eval bridge (eval/benchmarks.py) and `python -m eval benchmarks`: its log-likelihoods are the
model's own forward pass (rolling windows past the context included), adaptive exit is the project's
halting, generation is the generator's, the harness's accuracy tells a trained model from one at
initialisation, and the command writes its record and figure without overwriting anything; bad input
is one line."""

import json
import os
import shutil
import subprocess
import sys

# Offline as the command is (eval/benchmarks.py sets these where it is imported; lm_eval, which reads
# them through the datasets library, is imported first here).
for _key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "DISABLE_MULTIPROC"):
  os.environ.setdefault(_key, "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from configs.errors import ConfigError  # noqa: E402
from eval.benchmarks import LoopedLM, Programs, cut, until_eos  # noqa: E402
from eval.benchmarks_run import check_inputs, task_manager, task_specs  # noqa: E402
from eval.generate import parse_exit  # noqa: E402
from looped_models.generate import generate  # noqa: E402
from rundir.run import load_run_config, open_run  # noqa: E402
from rundir.workdir import RunDirError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS, L, R = 256, 257, 32, 3   # the byte tokenizer's specials; the tiny text model's window
EXIT = ("argmax_stable", 1)        # exits that differ between tokens on the tiny trained model
LONG = ("the king is dead long live the queen a horse my kingdom for a horse to be or not to be, "
        "all the world is a stage")  # 111 bytes: four windows of 32


@pytest.fixture(scope="module")
def opened(trained):
  """The tiny trained text run, opened once, with its scoring programs."""
  run = open_run(trained[0])
  return run, Programs(run)


def request(kind, args, task="t"):
  return Instance(kind, {}, args, 0, metadata=(task, 0, 1))


def log_probs(model, tokens, iterations=R):
  """log-softmax of the model's logits at R iterations of one sequence, zero-padded at the end to L
  (the model is causal: no position reads the padding after it; one shape, so the eager operations
  compile once)."""
  padded = np.zeros((1, L), np.int32)
  padded[0, :len(tokens)] = tokens
  logits = model(jnp.asarray(padded), iterations).logits_BSV[0, :len(tokens)]
  return np.asarray(jax.nn.log_softmax(logits, -1))


def windowed(model, prefix, targets):
  """(summed log-probability, all greedy) of `targets` after `prefix`, each target predicted once
  from the longest run of the tokens before it that ends with its window (at most L tokens read)."""
  seq, total, greedy = [prefix] + list(targets), 0.0, True
  for start in range(0, len(targets), L):
    end = min(start + L, len(targets))     # predict targets[start:end] ...
    first = max(0, end - L)                 # ... reading seq[first:end]
    lp = log_probs(model, seq[first:end])
    for j in range(start, end):
      total += float(lp[j - first, targets[j]])
      greedy &= int(lp[j - first].argmax()) == targets[j]
  return total, greedy


def reference(model, context, continuation):
  """What loglikelihood must give: BOS + context + continuation, its last L + 1 tokens kept."""
  ctx, cont = [BOS] + list(context.encode()), list(continuation.encode())
  if len(cont) > L:
    return windowed(model, ctx[-1], cont)
  seq = (ctx + cont)[-(L + 1):]
  lp = log_probs(model, seq[:-1])
  rows = range(len(seq) - 1 - len(cont), len(seq) - 1)
  return (sum(float(lp[i, seq[i + 1]]) for i in rows),
          all(int(lp[i].argmax()) == seq[i + 1] for i in rows))


PAIRS = [("the king is", " dead long live"),          # a multi-token continuation
         ("", "a horse"),                              # no context: BOS alone
         (LONG, " or not"),                            # context + continuation past the window
         ("to be", " or not to be, all the world is a stage and all"),  # a continuation > L
         ("a", " horse")]


def test_loglikelihoods_equal_the_models_own_forward_pass(opened):
  run, programs = opened
  model = run.model()
  lm = LoopedLM(run, iterations=R, batch_size=2, programs=programs)  # several batches, padded rows
  got = lm.loglikelihood([request("loglikelihood", pair) for pair in PAIRS])
  for pair, (logp, greedy) in zip(PAIRS, got):
    want, want_greedy = reference(model, *pair)
    assert logp == pytest.approx(want, abs=1e-4), pair
    assert greedy == want_greedy
  [rolled] = lm.loglikelihood_rolling([request("loglikelihood_rolling", (LONG,))])
  assert rolled == pytest.approx(windowed(model, BOS, list(LONG.encode()))[0], abs=1e-4)
  # R matters: at one iteration the scores are not those of R
  one = LoopedLM(run, iterations=1, batch_size=2, programs=programs)
  assert abs(one.loglikelihood([request("loglikelihood", PAIRS[0])])[0][0] - got[0][0]) > 1e-3
  stats = lm.stats["t"]
  assert stats.requests == len(PAIRS) + 1 and set(stats.per_request) == {float(R)}
  assert stats.scored == sum(len(c.encode()) for _, c in PAIRS) + len(LONG.encode())


def test_adaptive_exit_is_the_models_halting_and_stays_under_the_cap(opened):
  run, programs = opened
  model, cap = run.model(), 6
  lm = LoopedLM(run, iterations=cap, exit=EXIT, batch_size=4, programs=programs)
  pairs = [p for p in PAIRS if len(p[0].encode()) + len(p[1].encode()) < L]
  got = lm.loglikelihood([request("loglikelihood", p) for p in pairs])
  means = []
  for (context, continuation), (logp, _) in zip(pairs, got):
    seq = [BOS] + list((context + continuation).encode())
    out = model.halt(jnp.asarray([seq[:-1]]), criterion=EXIT[0], threshold=EXIT[1], max_iters=cap)
    lp, exits = np.asarray(jax.nn.log_softmax(out.logits_BSV[0], -1)), np.asarray(out.exit_BS[0])
    rows = range(len(seq) - 1 - len(continuation.encode()), len(seq) - 1)
    assert logp == pytest.approx(sum(float(lp[i, seq[i + 1]]) for i in rows), abs=1e-4)
    means.append(float(np.mean([exits[i] for i in rows])))
  per_request = lm.stats["t"].per_request
  np.testing.assert_allclose(per_request, means)
  assert all(1 <= m <= cap for m in per_request) and min(per_request) < cap  # exits happened


@pytest.mark.parametrize("exit", [None, EXIT])
def test_generate_until_is_the_generators_output_cut_at_the_stop_strings(opened, exit):
  run, programs = opened
  model, max_new, until = run.model(), 10, ["he t", "\n"]
  contexts = ["the king is dead", "a horse my kingdom for a", LONG]  # the last one is cut to fit
  lm = LoopedLM(run, iterations=R, exit=exit, batch_size=2, programs=programs)
  got = lm.generate_until([request("generate_until", (c, {"until": until, "max_gen_toks": max_new}))
                           for c in contexts])
  prompts = [([BOS] + list(c.encode()))[-(L - max_new + 1):] for c in contexts]
  out = generate(model, prompts, max_new=max_new, iterations=R, exit=exit, eos_id=EOS, slots=1)
  texts = [run.tokenizer.decode(until_eos(t, EOS)) for t in out.tokens]
  assert got == [cut(t, until) for t in texts]
  assert any(g != t for g, t in zip(got, texts))  # a stop string cut one
  per_request = lm.stats["t"].per_request
  np.testing.assert_allclose(per_request, [float(np.mean(i)) for i in out.iterations])
  assert all(1 <= m <= R for m in per_request)


def accuracy(run, programs, limit=12):
  names = ["random_bytes_choice"]
  manager = task_manager(names)
  specs, _ = task_specs(manager, names)
  lm = LoopedLM(run, iterations=R, batch_size=16, programs=programs)
  results = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager,
                                    log_samples=False, bootstrap_iters=0)
  return results["results"]["random_bytes_choice"]["acc,none"]


def test_the_harness_tells_a_trained_model_from_one_at_initialisation(opened, trained):
  run, programs = opened
  assert accuracy(run, programs) >= 0.9
  fresh = open_run(trained[0], cfg=load_run_config(trained[0]), init=True)
  assert accuracy(fresh, Programs(fresh)) <= 0.5  # chance is 1/4


def cli(*args, cwd=ROOT):
  return subprocess.Popen([sys.executable, "-m", "eval", "benchmarks", *args], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline",
                               "PYTHONPATH": ROOT})


def test_cli_writes_the_record_and_figure_and_never_overwrites(trained, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(trained[0], run)
  out = tmp_path / "bench.json"
  args = ["--workdir", run, "--tasks", "random_bytes_choice", "--iterations", "1,2", "--exit",
          "argmax_stable:1", "--limit", "3", "--batch-size", "8"]
  first = cli(*args, "--out", str(out), cwd=str(tmp_path))  # any working directory
  stdout, stderr = first.communicate(timeout=600)
  assert first.returncode == 0, stderr[-3000:]
  rec = json.loads(out.read_text())
  assert {"workdir", "step", "harness", "settings", "tasks", "options", "figure"} <= set(rec)
  assert rec["harness"] == {"name": "lm-eval", "version": lm_eval.__version__}
  assert [s["name"] for s in rec["settings"]] == ["R=1", "R=2", "exit=argmax_stable:1"]
  task = rec["tasks"]["random_bytes_choice"]
  assert len(task["config_sha256"]) == 64 and task["samples"] == 3
  assert set(task["data_sha256"]) == {"random_bytes_choice.jsonl"}
  for name, row in task["results"].items():
    assert row["main_metric"] == "acc,none" and 0 <= row["value"] <= 1 and row["tokens_per_s"] > 0
    assert "acc,none" in row["metrics"] and len(row["iterations_per_request"]) == 3 * 4
    assert row["mean_iterations"] == {"R=1": 1, "R=2": 2}.get(name, row["mean_iterations"])
    assert 1 <= row["mean_iterations"] <= 2
  assert "random_bytes_choice R=2: acc,none" in stdout
  where = os.path.join(run, "eval", str(rec["step"]))
  assert json.loads(open(os.path.join(where, "benchmarks.json")).read()) == rec
  assert os.path.isfile(os.path.join(where, rec["figure"]))
  second = cli(*args)
  assert second.wait(timeout=600) == 0, second.stderr.read()[-3000:]
  again = os.path.join(run, "eval", f"{rec['step']}.1", "benchmarks.json")
  assert os.path.isfile(again)
  assert json.loads(open(os.path.join(where, "benchmarks.json")).read()) == rec  # not overwritten


@pytest.fixture(scope="module")
def bad_lines(trained, tmp_path_factory):
  """Bad command lines, run at once: {case: (exit status, stderr)}; and the run they name."""
  run = str(tmp_path_factory.mktemp("bad") / "run")
  shutil.copytree(trained[0], run)
  base = ["--workdir", run, "--tasks", "random_bytes_choice"]
  procs = {"task": cli(*base[:3], "random_bytes_choice,no_such_task"),  # lm-eval's own are indexed
           "iterations": cli(*base, "--iterations", "4,x"),
           "tasks": cli("--workdir", run),
           "one R": subprocess.Popen([sys.executable, "-m", "eval", "generate", "--workdir", run,
                                      "--prompt", "a", "--iterations", "1,2"], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})}
  return {k: (p.wait(timeout=600), p.stderr.read()) for k, p in procs.items()}, run


@pytest.mark.parametrize("case,needle", [
    ("task", "no_such_task"), ("iterations", "flag --iterations=4,x"),
    ("tasks", "--tasks is required"), ("one R", "takes one R here")])
def test_cli_bad_input_is_one_line_before_anything_is_compiled(bad_lines, case, needle):
  out, run = bad_lines
  status, stderr = out[case]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert status == 2 and len(lines) == 1 and needle in lines[0], stderr[-3000:]
  assert not os.path.exists(os.path.join(run, "eval"))


@pytest.mark.parametrize("change,error,needle", [
    ({"iterations": "4,0"}, ConfigError, "--iterations"),
    ({"iterations": (2, 0)}, ConfigError, "--iterations"),
    ({"exit": ("sometimes", 1.0)}, ConfigError, "sometimes"),
    ({"exit": ("kl", 0.0)}, ConfigError, "a threshold > 0"),
    ({"exit": ("argmax_stable", 1.5)}, ConfigError, "argmax_stable"),
    ({"limit": 0}, ConfigError, "--limit"),
    ({"batch_size": 0}, ConfigError, "--batch-size"),
    ({"out": "taken.json"}, RunDirError, "not overwritten"),
    ({"include_path": ["nowhere"]}, ConfigError, "no such directory"),
])
def test_inputs_are_checked_before_anything_is_compiled(trained, tmp_path, change, error, needle):
  """What the command checks (eval.benchmarks_run.check_inputs), each bad value one line."""
  (tmp_path / "taken.json").write_text("{}")
  for key in ("out", "include_path"):
    if key in change:
      change[key] = (str(tmp_path / change[key]) if isinstance(change[key], str)
                     else [str(tmp_path / d) for d in change[key]])
  kwargs = {"tasks": ["random_bytes_choice"], "iterations": "1,2", **change}
  with pytest.raises(error, match=needle):
    check_inputs(trained[0], load_run_config(trained[0]), **kwargs)
  with pytest.raises(ConfigError, match="CRITERION:THRESHOLD"):
    parse_exit("kl")


def test_a_task_directory_with_local_data_and_one_whose_data_is_missing(trained, tmp_path):
  """--include-path: a task's relative data file is read beside its YAML; a missing one is one line."""
  src = os.path.join(ROOT, "eval", "benchmark_tasks")
  for name, data in (("copied_choice", "random_bytes_choice.jsonl"), ("lost_choice", "lost.jsonl")):
    yaml = open(os.path.join(src, "random_bytes_choice.yaml")).read()
    yaml = yaml.replace("task: random_bytes_choice", f"task: {name}")
    (tmp_path / f"{name}.yaml").write_text(yaml.replace("random_bytes_choice.jsonl", data))
  shutil.copy(os.path.join(src, "random_bytes_choice.jsonl"), tmp_path)
  cfg = load_run_config(trained[0])
  got = check_inputs(trained[0], cfg, tasks=["copied_choice"], include_path=[str(tmp_path)])
  _, written = task_specs(got["manager"], ["copied_choice"])
  data = "random_bytes_choice.jsonl"
  assert written["copied_choice"] == {str(tmp_path / data): data}
  with pytest.raises(ConfigError, match="lost_choice.*its data cannot be read"):
    check_inputs(trained[0], cfg, tasks=["lost_choice"], include_path=[str(tmp_path)])


def test_the_checked_inputs_of_a_good_command_line(trained):
  got = check_inputs(trained[0], load_run_config(trained[0]), tasks=["random_bytes_choice"],
                     iterations=(8, 2, 2), exit=("argmax_stable", 1.0))
  assert got["iterations"] == [2, 8] and got["exit"] == ("argmax_stable", 1)
  assert "random_bytes_choice" in got["manager"].all_tasks
  assert check_inputs(trained[0], load_run_config(trained[0]), tasks=["random_bytes_choice"]
                      )["iterations"] == [4]  # the training maximum
  with pytest.raises(RunDirError, match="does not exist"):
    load_run_config(os.path.join(trained[0], "none"))
