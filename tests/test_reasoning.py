"""The reasoning corpus (tasks/reasoning.py): generated problems mixed into prose, deterministic by
seed, val problems apart from train ones, the extrapolation split, per-token classes that match the
problems' rendered text, the class reader of TextData, and bad input on the command line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_texts

from tasks import DataError, reasoning, text as data
from tasks.corpus import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "var_chain:hops=1-4,extrapolate=5-6,per_doc=4"
BOS, EOS = 256, 257


def build(tmp, name, seed=0, spec=SPEC, ratio=0.5, **kw):
  kw = {"val_fraction": 0.34, "shard_tokens": 8192, "progress": False, **kw}
  prepare([str(tmp / "texts" / "*.txt")], str(tmp / name), seed=seed, synthetic=spec,
                 synthetic_ratio=ratio, **kw)
  return str(tmp / name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Three reasoning corpora of the same texts: seed 0 twice and seed 1 (several shards a split)."""
  tmp = tmp_path_factory.mktemp("reasoning")
  write_texts(tmp / "texts")
  return {"a": build(tmp, "a"), "b": build(tmp, "b"), "c": build(tmp, "c", seed=1), "tmp": tmp}


def split_arrays(directory, split):
  """A split's tokens and classes, its shards joined."""
  meta = data.read_meta(directory)["splits"][split]
  tokens = np.concatenate([np.fromfile(os.path.join(directory, s["file"]), np.uint16)
                           for s in meta["shards"]])
  classes = np.concatenate([np.fromfile(os.path.join(directory, s["file"]), np.uint8)
                            for s in meta["classes"]])
  return tokens, classes


def documents(directory, split):
  """(bytes, classes) of each document of a split, BOS and EOS included."""
  tokens, classes = split_arrays(directory, split)
  assert len(tokens) == len(classes)
  starts, ends = np.nonzero(tokens == BOS)[0], np.nonzero(tokens == EOS)[0]
  assert len(starts) == len(ends) and (starts < ends).all()
  return [(tokens[a:b + 1], classes[a:b + 1]) for a, b in zip(starts, ends)]


def problems(directory, split):
  """(line, answer, hops by its class) of every problem of a split, checked token by token:
  question tokens PROBLEM, answer tokens one class, specials and newlines PROBLEM."""
  out = []
  for ids, classes in documents(directory, split):
    if classes.max() == reasoning.PROSE:
      continue
    assert classes[0] == classes[-1] == reasoning.PROBLEM  # BOS, EOS
    body, body_classes = ids[1:-1], classes[1:-1]
    text = bytes(body.astype(np.uint8).tolist()).decode("ascii")
    assert text.endswith("\n")
    pos = 0
    for line in text[:-1].split("\n"):
      question, answer = line[:line.index("?") + 1], line[line.index("?") + 1:]
      line_classes = body_classes[pos:pos + len(line) + 1]
      assert (line_classes[:len(question)] == reasoning.PROBLEM).all()
      answer_classes = line_classes[len(question):len(line)]
      assert len(set(answer_classes.tolist())) == 1 and answer_classes[0] >= reasoning.ANSWER
      assert line_classes[-1] == reasoning.PROBLEM  # the newline
      out.append((line, answer, int(answer_classes[0]) - reasoning.ANSWER))
      pos += len(line) + 1
  return out


# -- the corpus -----------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_corpus(built):
  a, b, c = built["a"], built["b"], built["c"]
  files = sorted(os.listdir(a))
  assert files == sorted(os.listdir(b))
  assert {"classes-train-00001.bin", "extrapolate-00000.bin",
          "classes-extrapolate-00000.bin"} <= set(files)
  read = lambda directory, name: open(os.path.join(directory, name), "rb").read()
  for name in files:
    if name != data.META:
      assert read(a, name) == read(b, name), name
  meta_a, meta_b = (json.load(open(os.path.join(d, data.META))) for d in (a, b))
  meta_a.pop("created"), meta_b.pop("created")
  assert meta_a == meta_b
  for split in ("train", "val", "extrapolate"):
    assert not np.array_equal(split_arrays(a, split)[0], split_arrays(c, split)[0]), split


def test_answers_are_labelled_with_the_steps_they_need(built):
  for split, (lo, hi) in (("train", (1, 4)), ("val", (1, 4)), ("extrapolate", (5, 6))):
    found = problems(built["a"], split)
    assert len(found) >= 50
    for line, answer, hops in found:
      want_answer, want_hops = reasoning.solve_var_chain(line[:line.index("?") + 1])
      assert (answer, hops) == (want_answer, want_hops), line
    assert {h for _, _, h in found} == set(range(lo, hi + 1)), split  # every step count, no other
    meta = data.read_meta(built["a"])["splits"][split]
    assert meta["problems"] == len(found)
    per_hops = {str(h): sum(f[2] == h for f in found) for h in range(lo, hi + 1)}
    assert meta["problems_per_hops"] == per_hops


def test_a_rendered_problem_and_its_solution():
  p = reasoning.var_chain(np.random.default_rng(3), hops=5, longest=8)
  statements = p.question[:-1].split(";")[:-1]
  assert p.question.endswith(f";{p.question.split(';')[-1]}") and len(statements) > 5
  assert reasoning.solve_var_chain(p.question) == (p.answer, 5)
  assert reasoning.solve_var_chain("c=b;q=3;a=7;b=a;c?") == ("7", 3)
  assert reasoning.solve_var_chain("a=7;q=3;a?") == ("7", 1)


def test_lookups_ask_statements_back_as_one_step_answers():
  p = reasoning.var_chain(np.random.default_rng(4), hops=4, longest=3, lookups=3)
  facts = dict(s.split("=") for s in p.statements.split(";"))
  assert len(p.lookups) == 3 and len(set(p.lookups)) == 3
  assert all(facts[name] == value for name, value in p.lookups)  # each a statement asked back
  runs = p.runs()
  assert "".join(t for t, _ in runs) == p.line[:-1]
  assert [(t, c) for t, c in runs if c != reasoning.PROBLEM] == (
      [(v, reasoning.answer_class(1)) for _, v in p.lookups] + [(p.answer, reasoning.answer_class(4))])
  assert reasoning.solve_var_chain(p.question) == (p.answer, 4)  # the lookups are skipped
  bare = reasoning.var_chain(np.random.default_rng(4), hops=4, longest=3)
  assert bare.key == p.key and bare.line != p.line  # lookups do not make a problem new
  assert reasoning.parse_spec("var_chain:lookups=2").lookups == 2
  with pytest.raises(reasoning.DataError, match="lookups=x is not allowed"):
    reasoning.parse_spec("var_chain:lookups=x")


def test_val_and_extrapolate_problems_are_apart_from_train(built):
  lines = {s: [line for line, _, _ in problems(built["a"], s)]
           for s in ("train", "val", "extrapolate")}
  for split, found in lines.items():
    assert len(set(found)) == len(found), split  # distinct within a split
  assert not set(lines["train"]) & set(lines["val"])
  assert not set(lines["extrapolate"]) & (set(lines["train"]) | set(lines["val"]))
  # the exclusion itself: the same stream again draws other problems where the first ones are barred
  first = reasoning.draw(np.random.default_rng(7), "var_chain", (1, 2), count=40)
  again = reasoning.draw(np.random.default_rng(7), "var_chain", (1, 2), count=40)
  assert [p.line for p in first] == [p.line for p in again]
  barred = reasoning.draw(np.random.default_rng(7), "var_chain", (1, 2), count=40,
                          exclude={p.key for p in first})
  assert len(barred) == 40 and not {p.line for p in barred} & {p.line for p in first}


def test_prose_is_whole_and_class_prose(built):
  texts = built["tmp"] / "texts"
  inputs = sorted(open(os.path.join(texts, f), "rb").read() for f in os.listdir(texts))
  prose = []
  for split in ("train", "val"):
    for ids, classes in documents(built["a"], split):
      if (classes == reasoning.PROSE).any():
        assert (classes == reasoning.PROSE).all()  # no document mixes prose and problems
        prose.append(bytes(ids[1:-1].astype(np.uint8).tolist()))
  assert sorted(prose) == inputs
  assert all(c.max() > reasoning.PROSE for _, c in documents(built["a"], "extrapolate"))


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_the_share_of_problems_is_the_ratio(built, ratio):
  directory = built["a"] if ratio == 0.5 else build(built["tmp"], "r20", ratio=ratio)
  meta = data.read_meta(directory)
  for split in ("train", "val"):
    _, classes = split_arrays(directory, split)
    share = float((classes != reasoning.PROSE).mean())
    assert share == pytest.approx(ratio, abs=0.03), split
    counts = meta["splits"][split]["class_tokens"]
    assert counts["prose"] == int((classes == reasoning.PROSE).sum())
    assert counts["answer"] == int((classes >= reasoning.ANSWER).sum())
  assert meta["synthetic"]["ratio"] == ratio and meta["classes"]["answer"].startswith("2 +")


def test_bpe_tokens_never_span_question_and_answer(built):
  directory = build(built["tmp"], "bpe", spec="var_chain:hops=2-3", tokenizer="bpe:300")
  tok = data.load_tokenizer(directory)
  tokens, classes = split_arrays(directory, "train")
  answers = tokens[classes >= reasoning.ANSWER]
  assert len(answers) and all(tok.decode([int(t)]).isdigit() for t in answers)
  assert set(classes[classes >= reasoning.ANSWER].tolist()) == {4, 5}  # 2 + hops


# -- reading --------------------------------------------------------------------------------------


def old_window(maps, rng, length):
  """TextData.window as it was before classes: the reference it must keep to."""
  arrays = [a for a in maps if len(a) > length]
  sizes = np.array([len(a) - length for a in arrays], np.float64)
  a = arrays[0] if len(arrays) == 1 else arrays[int(rng.choice(len(arrays), p=sizes / sizes.sum()))]
  start = int(rng.integers(0, len(a) - length))
  return np.asarray(a[start:start + length + 1], np.int32)


def test_window_is_unchanged_for_an_ordinary_corpus(corpus, tmp_path):
  texts = corpus[1]
  several = str(tmp_path / "several")
  corpus_meta = prepare([os.path.join(texts, "*.txt")], several, val_fraction=0.34,
                        shard_tokens=900, progress=False)
  assert "classes" not in corpus_meta and "synthetic" not in corpus_meta
  assert len(corpus_meta["splits"]["train"]["shards"]) > 3
  assert not [f for f in os.listdir(several) if f.startswith("classes")]
  for directory in (corpus[0], several):
    d = data.TextData(directory)
    assert list(d.maps) == ["train", "val"] and d.class_maps == {}
    for seed in range(40):
      for length, split in ((8, "train"), (32, "val"), (500, "train")):
        got_rng, want_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        np.testing.assert_array_equal(d.window(got_rng, length, split),
                                      old_window(d.maps[split], want_rng, length))
        assert got_rng.integers(1 << 30) == want_rng.integers(1 << 30)  # the same draws used
    with pytest.raises(DataError, match="holds no token classes"):
      d.classes("train")


def test_classes_reader_and_windows_with_classes(built):
  d = data.TextData(built["a"])
  assert list(d.maps) == ["train", "val", "extrapolate"]
  for split in d.maps:
    assert [len(c) for c in d.classes(split)] == [len(a) for a in d.maps[split]]
    assert all(c.dtype == np.uint8 for c in d.classes(split))
  for seed in range(60):
    split = ("train", "val", "extrapolate")[seed % 3]
    tokens, classes = d.window_with_classes(np.random.default_rng(seed), 64, split)
    np.testing.assert_array_equal(tokens, d.window(np.random.default_rng(seed), 64, split))
    answers = classes >= reasoning.ANSWER
    assert ((tokens[answers] >= ord("0")) & (tokens[answers] <= ord("9"))).all()
    follows_query = np.nonzero(tokens[:-1] == ord("?"))[0] + 1
    assert answers[follows_query].all()  # the word salad has no '?': every one is a query
    assert split != "extrapolate" or (classes != reasoning.PROSE).all()
  assert data.verify(built["a"])["synthetic"]["extrapolate"] == [5, 6]


def test_a_damaged_class_shard_is_refused(built, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(built["a"], bad)
  with open(bad / "classes-val-00000.bin", "r+b") as f:
    f.write(b"\x09")
  with pytest.raises(DataError, match="classes-val-00000.bin: checksum mismatch"):
    data.verify(str(bad))
  (bad / "classes-val-00000.bin").write_bytes(b"\0\0")
  with pytest.raises(DataError, match="classes-val-00000.bin is missing or truncated"):
    data.TextData(str(bad))


def test_the_text_task_reads_a_reasoning_corpus_as_any(built):
  from conftest import text_config  # the trainer's config and task (imports JAX): this test only
  from rundir.config import resolve
  from tasks.synthetic import make_batch, task_of
  cfg = resolve(text_config(built["a"]))
  batch = make_batch(task_of(cfg), seed=0, step=3, batch_size=4, min_length=32, max_length=32)
  assert cfg.model.vocab_size == 258 and batch["inputs"].shape == (4, 32)


# -- the spec and the command line ----------------------------------------------------------------


@pytest.mark.parametrize("spec,ratio,message", [
    ("var_chain:hops=0-3", None, "hops=0-3 is not allowed"),
    ("var_chain:hops=1-26", None, "HI <= 25"),
    ("var_chain:hops=x", None, "hops=x is not allowed"),
    ("var_chain:depth=3", None, "'depth=3' is not KEY=VALUE"),
    ("var_chain:per_doc=0", None, "per_doc=0 is not allowed"),
    ("var_chain:hops=1-8,extrapolate=6-9", None, "extrapolate=6-9 must start past hops=1-8"),
    ("var_chain", 1.0, "--synthetic-ratio 1.0 is not allowed; allowed: 0 <= r < 1"),
    ("var_chain", -0.1, "--synthetic-ratio -0.1 is not allowed"),
    (None, 0.3, "--synthetic-ratio needs --synthetic"),
])
def test_bad_specs_and_ratios_write_nothing(tmp_path, spec, ratio, message):
  (tmp_path / "a.txt").write_text("some prose")
  with pytest.raises(DataError, match=message) as e:
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), synthetic=spec, synthetic_ratio=ratio,
            progress=False)
  assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_good_specs():
  assert reasoning.parse_spec("var_chain") == reasoning.Synthetic("var_chain", "var_chain", (1, 8),
                                                                  None, 8)
  s = reasoning.parse_spec("var_chain:hops=3,extrapolate=4-20,per_doc=2")
  assert (s.hops, s.extrapolate, s.per_doc) == ((3, 3), (4, 20), 2)


def test_command_line_bad_input_is_one_line_and_a_good_one_prepares(built):
  """Four processes at once: three bad command lines (one line, exit status 2, nothing written)
  and a good one."""
  tmp = built["tmp"]
  base = ["-m", "train.data", "prepare", "--input", str(tmp / "texts" / "*.txt")]
  cases = [
      (["--synthetic", "sums:digits=3"], "unknown family 'sums'; known: var_chain"),
      (["--synthetic", "var_chain:hops=5-2"], "hops=5-2 is not allowed; allowed: LO-HI"),
      (["--synthetic", "var_chain", "--synthetic-ratio", "1.5"],
       "--synthetic-ratio 1.5 is not allowed; allowed: 0 <= r < 1"),
  ]
  argvs = [base + args + ["--out", str(tmp / f"bad{i}")] for i, (args, _) in enumerate(cases)]
  argvs.append(base + ["--synthetic", "var_chain:hops=2-3", "--synthetic-ratio", "0.25",
                       "--out", str(tmp / "good")])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, *a], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=120)
    results.append((stdout, stderr, p.returncode))
  for i, ((_, message), (_, stderr, status)) in enumerate(zip(cases, results)):
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], lines[0]
    assert not (tmp / f"bad{i}").exists()
  stdout, stderr, status = results[-1]
  assert status == 0, stderr[-2000:]
  assert "problems)" in stdout and "extrapolate" not in stdout
  meta = data.verify(str(tmp / "good"))
  assert meta["synthetic"]["hops"] == [2, 3] and meta["synthetic"]["ratio"] == 0.25
