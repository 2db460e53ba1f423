"""Text: preparing a corpus, the text task's windows, training with held-out loss at several
recurrences, resume, two processes, the evaluator on text, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import WORDS, fake_devices, text_config, write_texts

from configs.errors import ConfigError
from rundir.config import resolve
from rundir.logger import read_metrics
from tasks import corpus, text as data
from tasks.synthetic import make_batch, task_of
from train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# -- prepare --------------------------------------------------------------------------------------


def test_byte_prepare_writes_documents_split_and_checksums(corpus):
  out, texts = corpus
  meta = data.read_meta(out)
  assert meta["tokenizer"] == {"kind": "byte", "spec": "byte", "vocab_size": 258, "bos_id": 256,
                               "eos_id": 257, "file": None}
  assert meta["dtype"] == "uint16"
  sp = meta["splits"]
  assert sp["train"]["documents"] + sp["val"]["documents"] == 6 and sp["val"]["documents"] == 2
  # every document is [BOS] utf-8 bytes [EOS], whole, in exactly one split
  docs = {open(os.path.join(texts, f), "rb").read() for f in os.listdir(texts)}
  found = []
  for split in data.SPLITS:
    ids = np.fromfile(os.path.join(out, f"{split}-00000.bin"), np.uint16)
    assert len(ids) == sp[split]["tokens"]
    starts = np.nonzero(ids == 256)[0]
    ends = np.nonzero(ids == 257)[0]
    assert len(starts) == len(ends) == sp[split]["documents"]
    found += [bytes(ids[a + 1:b].astype(np.uint8).tolist()) for a, b in zip(starts, ends)]
  assert sorted(found) == sorted(docs)
  assert sum(sp[s]["bytes"] for s in data.SPLITS) == sum(len(d) for d in docs)
  assert data.verify(out)["format"] == data.FORMAT_VERSION
  np.testing.assert_array_equal(np.load(os.path.join(out, data.TOKEN_BYTES))[[0, 97, 255, 256, 257]],
                                [1, 1, 1, 0, 0])


def test_same_seed_same_split_other_seed_other_split(tmp_path):
  a = corpus.split_documents(40, 0.1, seed=0)
  assert a.sum() == 4 and (a == corpus.split_documents(40, 0.1, seed=0)).all()
  assert (a != corpus.split_documents(40, 0.1, seed=1)).any()
  assert corpus.split_documents(2, 0.01, seed=0).sum() == 1  # at least one document each


def test_bpe_lines_jsonl_and_a_brought_tokenizer(tmp_path):
  write_texts(tmp_path / "t", n_docs=3)
  with open(tmp_path / "docs.jsonl", "w") as f:
    for i in range(4):
      f.write(json.dumps({"text": f"jsonl document {i}: " + " ".join(WORDS[i:i + 12])}) + "\n")
  meta = corpus.prepare([str(tmp_path / "t" / "*.txt"), str(tmp_path / "docs.jsonl")],
                      str(tmp_path / "bpe"), tokenizer="bpe:300", lines=True, progress=False)
  assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["vocab_size"] == 300
  assert sum(meta["splits"][s]["documents"] for s in data.SPLITS) == 3 * 51 + 4  # lines + jsonl
  tok = data.load_tokenizer(str(tmp_path / "bpe"))
  text = "to be or not to be, naïve café"
  assert tok.decode(tok.encode_batch([text])[0]) == text
  tb = np.load(tmp_path / "bpe" / data.TOKEN_BYTES)
  assert tb[tok.bos_id] == 0 and int(tb[tok.encode_batch([text])[0]].sum()) == len(text.encode())
  # the trained tokenizer.json brought to another corpus
  again = corpus.prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "file"),
                       tokenizer=str(tmp_path / "bpe" / "tokenizer.json"), progress=False)
  assert again["tokenizer"]["kind"] == "file" and again["tokenizer"]["eos_id"] == tok.eos_id
  assert os.path.isfile(tmp_path / "file" / "tokenizer.json")


def test_vocabulary_over_65535_is_stored_as_uint32(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {f"w{i}": i for i in range(70000)} | {"<eos>": 70000, "[UNK]": 70001}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "big.json"))
  (tmp_path / "a.txt").write_text("w1 w69999 w5")
  meta = corpus.prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), tokenizer=str(tmp_path / "big.json"),
                      val_fraction=0.0, progress=False)
  assert meta["dtype"] == "uint32"
  ids = np.fromfile(tmp_path / "out" / "train-00000.bin", np.uint32)
  np.testing.assert_array_equal(ids, [1, 69999, 5, 70000])


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--input", "{tmp}/missing/*.txt"], "no such file"),
    ("empty", ["--input", "{tmp}/e.txt"], "holds no text"),
    ("latin1", ["--input", "{tmp}/l.txt"], "not UTF-8 text: undecodable byte 0xe9 at offset 3"),
    (None, ["--input", "{tmp}/ok.txt", "--tokenizer", "bpe:12"], "must be an integer >= 260"),
    (None, ["--input", "{tmp}/ok.txt", "--tokenizer", "wordpiece"], "allowed: byte|bpe:N|FILE.json"),
    ("exists", ["--input", "{tmp}/ok.txt"], "already holds a prepared corpus"),
])
def test_prepare_bad_input_is_one_line_and_writes_nothing(tmp_path, setup, args, message):
  (tmp_path / "ok.txt").write_text("fine text")
  (tmp_path / "e.txt").write_text("  \n\n")
  (tmp_path / "l.txt").write_bytes("caf\xe9".encode("latin-1"))
  out = tmp_path / "out"
  if setup == "exists":
    corpus.prepare([str(tmp_path / "ok.txt")], str(out), progress=False)
  before = sorted(os.listdir(tmp_path)) + (sorted(os.listdir(out)) if out.exists() else [])
  proc = subprocess.run([sys.executable, "-m", "train.data", "prepare", "--out", str(out),
                         *[a.format(tmp=tmp_path) for a in args]], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
  assert sorted(os.listdir(tmp_path)) + (sorted(os.listdir(out)) if out.exists() else []) == before


# -- the text task --------------------------------------------------------------------------------


def test_windows_are_deterministic_per_row_and_split(corpus):
  out, _ = corpus
  cfg = resolve(text_config(out))
  task = task_of(cfg)
  assert cfg.model.vocab_size == 258 and cfg.train.eval_recurrences == (1, 2, 4, 8, 16)
  full = make_batch(task, seed=0, step=7, batch_size=8, min_length=32, max_length=32)
  again = make_batch(task_of(cfg), seed=0, step=7, batch_size=8, min_length=32, max_length=32,
                     rows=(3, 8))
  np.testing.assert_array_equal(full["inputs"][3:], again["inputs"])
  np.testing.assert_array_equal(full["inputs"][:, 1:], full["targets"][:, :-1])  # next token
  assert full["mask"].min() == 1.0
  other = make_batch(task, seed=0, step=8, batch_size=8, min_length=32, max_length=32)
  assert (other["inputs"] != full["inputs"]).any()
  # stream 1 reads the validation split: every window is a substring of it
  val = np.fromfile(os.path.join(out, "val-00000.bin"), np.uint16).astype(np.int32)
  held = make_batch(task, seed=0, step=0, batch_size=4, min_length=32, max_length=32, stream=1)
  for row in held["inputs"]:
    assert any((val[i:i + 32] == row).all() for i in range(len(val) - 32))


@pytest.mark.parametrize("change,key,message", [
    (lambda c: c.task.update(path="/no/such/corpus"), "task.path", "does not exist"),
    (lambda c: c.task.update(path=""), "task.path", "needs a prepared corpus"),
    (lambda c: c.model.update(vocab_size=100), "model.vocab_size", "vocabulary of 258"),
    (lambda c: c.task.update(train_length=5000) or c.model.update(max_len=5000), "task.train_length",
     "needs 5001"),
    (lambda c: c.task.update(min_train_length=8), "task.min_train_length", "one length"),
])
def test_text_config_errors_before_anything(corpus, tmp_path, change, key, message):
  cfg = text_config(corpus[0])
  change(cfg)
  with pytest.raises(ConfigError) as e:
    Trainer(cfg, str(tmp_path / "run"))
  assert key in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_token_id_outside_the_vocabulary_is_refused(corpus, tmp_path):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(corpus[0], bad)
  meta = json.loads((bad / "meta.json").read_text())
  meta["max_token_id"] = 300
  (bad / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(ConfigError, match="token id 300, outside the model's vocabulary of 258"):
    resolve(text_config(str(bad)))
  (bad / "val-00000.bin").write_bytes(b"\0\0")
  with pytest.raises(ConfigError, match="truncated"):
    resolve(text_config(str(bad)))


# -- training, resume, two processes, evaluation --------------------------------------------------


def test_training_on_text_logs_held_out_loss_and_bits_per_byte(trained):
  run, result = trained
  assert result["status"] == "done"
  metrics = read_metrics(run)
  first, last = metrics[0]["train/loss"], [m for m in metrics if "train/loss" in m][-1]["train/loss"]
  assert last < first - 1.0  # from ~ln 258 = 5.55 towards the word salad's entropy
  final = [m for m in metrics if "val/best_loss" in m][-1]
  for r in (1, 2, 4, 8, 16):
    loss, bpb = final[f"val/iters{r}/loss"], final[f"val/iters{r}/bits_per_byte"]
    assert 0 < loss < 5.0 and 0 < bpb < 8.0
  # byte tokens: nats per byte ~ nats per token (BOS/EOS carry no bytes)
  r = final["val/best_iters"]
  assert final[f"val/iters{r}/bits_per_byte"] * np.log(2) == pytest.approx(final["val/best_loss"], rel=0.05)
  assert all(m["train/tokens_per_s"] > 0 for m in metrics if "train/tokens_per_s" in m)
  assert any("train/tokens_per_s" in m for m in metrics)


def test_resumed_text_run_sees_the_same_batches_and_losses(corpus, tmp_path):
  kw = dict(train__checkpoint_every=4, train__log_every=1, train__warmup=1, train__min_lr_ratio=1.0,
            train__eval_every=-1)
  straight = str(tmp_path / "straight")
  Trainer(text_config(corpus[0], train__steps=8, **kw), straight).run()
  resumed = str(tmp_path / "resumed")
  Trainer(text_config(corpus[0], train__steps=4, **kw), resumed).run()
  Trainer(text_config(corpus[0], train__steps=8, **kw), resumed).run()  # resumes from step 4
  losses = lambda d: {m["step"]: m["train/loss"] for m in read_metrics(d) if "train/loss" in m}
  a, b = losses(straight), losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  for s in range(1, 9):
    assert b[s] == pytest.approx(a[s], rel=1e-6), s


def test_two_processes_read_their_own_rows_and_match_one(corpus, tmp_path):
  import socket

  from sharding_worker import sharding_config
  worker = os.path.join(ROOT, "tests", "sharding_worker.py")
  one = str(tmp_path / "one")
  Trainer(sharding_config(steps=6, text=corpus[0]), one).run()
  want = {m["step"]: m["train/loss"] for m in read_metrics(one) if "train/loss" in m}
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": fake_devices(1), "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, worker, "--workdir", str(tmp_path / "two"), "--mesh=-1,1,1",
                             "--steps", "6", "--out", str(tmp_path / f"p{i}.json"), "--text", corpus[0],
                             "--coordinator", f"127.0.0.1:{port}", "--nproc", "2", "--pid", str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
  [got] = json.load(open(tmp_path / "p0.json"))  # one entry: the one mesh
  assert got["process_count"] == 2
  for s in range(1, 7):
    assert got["losses"][str(s)] == pytest.approx(want[s], rel=1e-5), s


def test_evaluator_on_text_reports_token_classes_loss_curve_and_decoded_tokens(trained, corpus, tmp_path):
  import shutil

  from eval.evaluate import evaluate
  from rundir.run import load_run_config
  run = str(tmp_path / "copy")
  shutil.copytree(trained[0], run)
  from rundir.outputs import latest
  summary = evaluate(load_run_config(run), run, iterations=8, batch_size=2, progress=False)
  record = json.load(open(latest(run, "fixed_points.json")))
  assert sum(summary[f"fp/tokens/{c}"] for c in ("fixed_point", "orbit", "slider", "unknown")) == \
      pytest.approx(1.0)
  curve = record["loss_curves"]["32"]
  assert len(curve["loss"]) == 8 and summary["val/best_loss"] == pytest.approx(min(curve["loss"]))
  assert summary["val/iters1/loss"] == pytest.approx(curve["loss"][0])
  # the PCA tokens are the decoded last tokens of the first held-out window
  assert len(record["pca_tokens"]) == 4 and all(isinstance(t, str) and t for t in record["pca_tokens"])
  outdir = os.path.dirname(latest(run, "fixed_points.json"))
  assert os.path.isfile(os.path.join(outdir, "plots", "loss.png"))
  md = open(os.path.join(outdir, "fixed_points.md")).read()
  assert "Held-out loss" in md and "bits per byte" in md
  # a control run's stage metrics beside this one's
  evaluate(load_run_config(run), run, iterations=8, batch_size=2, progress=False, compare=run)
  again = latest(run, "fixed_points.json")
  assert os.path.dirname(again) != outdir  # a second evaluation of the step writes beside the first
  record = json.load(open(again))
  assert len(record["compare"]["colsum_concentration"]) == 1  # one block layer at iteration 1
  assert os.path.isfile(os.path.join(os.path.dirname(again), "plots", "stage_depth.png"))


def test_halting_on_text_is_judged_by_next_token_accuracy(trained, tmp_path):
  """A whole text window is never exactly right, so halting on text chooses R_fixed and thresholds
  by next-token accuracy (per_position), and says so."""
  import shutil

  from eval.halting import evaluate_halting
  from rundir.run import load_run_config
  run = str(tmp_path / "copy")
  shutil.copytree(trained[0], run)
  out = evaluate_halting(load_run_config(run), run, grids={"fixed_point": (1e-1, 1e-2)}, iterations=6,
                         repeats=1, mode="trial", log_wandb=False, progress=False)
  s = out["summary"]
  assert s["metric"] == "per_position"
  assert s["fixed_exact_match"] == 0.0 < s["fixed_accuracy"] <= 1.0
  assert s["fixed_accuracy"] == out["fixed"]["held_out"]["per_position"]
  # R_fixed: the fewest iterations reaching the best next-token accuracy on the calibration half
  cal = [r for r in out["rows"] if r["criterion"] == "fixed_point"]
  assert 1 <= s["R_fixed"] <= 6 and len(out["fixed_curve"]) == 6 and len(cal) == 2
  if s["threshold"] is not None:
    assert s["accuracy_drop_points"] == pytest.approx(100 * (s["fixed_accuracy"] - s["accuracy"]))
