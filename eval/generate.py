"""`python -m eval generate --workdir RUN --prompt TEXT`: generate text from a trained text run or an
imported checkpoint with `looped_models.generate`, print it with the block iterations of every
generated token, and write the record (JSON) and a plot of iterations per token beside it.

Without `--out` the record goes to WORKDIR/eval/STEP/generate.json (a new eval/STEP.N/ if one is
there: nothing is overwritten); an existing `--out` file is an error, not replaced.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from configs.errors import ConfigError
from eval import plots
from looped_models.generate import GenerateOutput, Generator
from rundir.outputs import output_dir
from rundir.run import open_run
from rundir.workdir import RunDirError, path

RECORD = "generate.json"


def parse_exit(spec: str | None) -> tuple[str, float] | None:
  """`CRITERION:THRESHOLD` (e.g. fixed_point:1e-3) -> (criterion, threshold); None: fixed R."""
  if not spec:
    return None
  criterion, sep, value = spec.partition(":")
  try:
    threshold = float(value) if sep else None
  except ValueError:
    threshold = None
  if threshold is None:
    raise ConfigError("--exit", spec, allowed="CRITERION:THRESHOLD, e.g. fixed_point:1e-3")
  if criterion == "argmax_stable" and threshold.is_integer():
    return criterion, int(threshold)
  return criterion, threshold


def read_prompts(prompt: str | None, batch: str | None) -> list[str]:
  """The prompts: `--prompt` and/or the non-empty lines of `--batch FILE` (one prompt per line)."""
  if prompt == "":
    raise ConfigError("--prompt", repr(""), reason="give a non-empty --prompt or --batch FILE")
  prompts = [] if prompt is None else [prompt]
  if batch:
    if not path(batch).is_file():
      raise RunDirError(f"--batch {batch} does not exist")
    prompts += [line for line in path(batch).read_text().splitlines() if line.strip()]
  if not prompts:
    raise ConfigError("--prompt", repr(prompt or ""), reason="give a non-empty --prompt or --batch FILE")
  return prompts


def encode(tokenizer: Any, m: Any, prompts: Sequence[str], bos: bool) -> list[list[int]]:
  """Token ids of each prompt (after the tokenizer's BOS with `bos`); ConfigError for a tokenizer
  whose ids do not fit the model."""
  if tokenizer is None:
    raise ConfigError("--workdir", "a run without a tokenizer", reason="generation needs a text run "
                      "(task.name=text) or an imported model with its tokenizer.json")
  if tokenizer.vocab_size > m.vocab_size:
    raise ConfigError("tokenizer", f"{tokenizer.vocab_size} ids", reason=f"the model has "
                      f"model.vocab_size={m.vocab_size}: the tokenizer does not match the run")
  ids = tokenizer.encode_batch(list(prompts))
  start = [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []
  return [start + [int(i) for i in x] for x in ids]


def record(run: Any, prompts: Sequence[str], ids: Sequence[Sequence[int]], out: GenerateOutput,
           settings: dict) -> dict:
  tok = run.tokenizer
  rows = [{"prompt": p, "prompt_tokens": [int(i) for i in pid], "tokens": out.tokens[i].tolist(),
           "text": tok.decode(out.tokens[i]), "iterations": out.iterations[i].tolist(),
           "mean_iterations": float(np.mean(out.iterations[i]))}
          for i, (p, pid) in enumerate(zip(prompts, ids))]
  return {"workdir": run.workdir, "step": run.step, "settings": settings, "generations": rows,
          "stats": out.stats, "decode_tokens_per_s": out.stats["decode_tokens_per_s"]}


def plot_iterations(rec: dict, png: str) -> str:
  """Iterations per generated token, one line per prompt (at most 8 drawn), against position."""
  fig, ax = plots.plt.subplots(figsize=(7, 3))
  rows = rec["generations"][:8]
  for row, style in zip(rows, plots.line_styles(len(rows))):
    label = row["prompt"][:24] + ("…" if len(row["prompt"]) > 24 else "")
    ax.plot(np.arange(1, len(row["iterations"]) + 1), row["iterations"], drawstyle="steps-mid",
            label=label, **style)
  s = rec["settings"]
  ax.set(title=f"Block iterations per generated token (R = {s['iterations']}, exit "
         f"{s['exit'] or 'none'}, cache {s['cache']})", xlabel="generated token", ylabel="iterations",
         ylim=(0, s["iterations"] + 0.5))
  ax.legend(loc="lower right", ncol=2)
  return plots.save(fig, png)


def run_generate(workdir: str, prompts: Sequence[str], *, out: str | None, mesh: Any = None,
                 cfg: Any = None, bos: bool = True, **options) -> tuple[dict, str]:
  """Open the run, generate, write the record and its plot; returns (record, its path). Under
  several processes each runs this alike and gets the record; process 0 alone writes it ("")."""
  if out and path(out).exists():
    raise RunDirError(f"--out {out} exists; it is not overwritten (choose another name)")
  run = open_run(workdir, cfg=cfg, mesh=mesh)
  ids = encode(run.tokenizer, run.cfg.model, prompts, bos)
  eos = run.tokenizer.eos_id if options.pop("stop_at_eos", True) else None
  result = Generator(run.model(), run.mesh)(ids, eos_id=eos, **options)
  settings = {k: options.get(k) for k in ("max_new", "iterations", "cache", "temperature", "top_k",
                                          "top_p", "seed", "slots")}
  settings["exit"] = None if options.get("exit") is None else "{}:{}".format(*options["exit"])
  rec = record(run, prompts, ids, result, settings)
  if jax.process_index() != 0:  # every process generated the same; process 0 alone writes
    return rec, ""
  target = out or os.path.join(output_dir(workdir, run.step, RECORD), RECORD)
  parent = path(target).parent
  parent.mkdir(parents=True, exist_ok=True)
  path(target).write_text(json.dumps(rec, indent=1))
  plot_iterations(rec, str(parent / (path(target).stem + "_iterations.png")))
  return rec, target


def describe(rec: dict) -> str:
  """What the CLI prints: each prompt and its continuation, the iterations of every token, speed."""
  lines = []
  for row in rec["generations"]:
    lines += [f"{row['prompt']}{row['text']}",
              "  iterations: " + " ".join(str(i) for i in row["iterations"]) +
              f"  (mean {row['mean_iterations']:.2f})"]
  s = rec["stats"]
  lines.append(f"{s['tokens']} tokens at {s['decode_tokens_per_s']:.1f} tokens/s decode "
               f"(cache {s['cache']} of the last {s['cache_tokens']} tokens, R = {s['iterations_cap']}, "
               f"exit {s['exit'] or 'none'}, {s['slots']} slots)")
  return "\n".join(lines)
