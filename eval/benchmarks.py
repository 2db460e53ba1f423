"""The bridge from EleutherAI's lm-evaluation-harness (lm-eval) to this project's models.

`LoopedLM` is an `lm_eval.api.model.LM` (through lm-eval's `TemplateLM`, which splits a context and
its continuation into tokens) backed by an opened run (`rundir.run.open_run`: a text run or an
imported checkpoint, anything with a tokenizer): its model, its tokenizer and its generator. Every
token it scores or generates runs one setting: a fixed R (`iterations=R`, the model's forward at R
iterations) or adaptive exit (`exit=(criterion, threshold)` with at most `iterations` iterations:
`looped_models.halting.halt` for scoring, the generator's per-token exit for generation).

  loglikelihood          (context, continuation): the continuation's summed log-probability and
                         whether greedy decoding gives it. Every sequence starts with the
                         tokenizer's BOS (else its EOS), as the corpora are prepared and as `eval
                         generate` prompts; past the window (model.max_len) the last max_len tokens
                         of context + continuation are kept (a continuation longer than the window:
                         lm-eval's rolling windows over it, after the context's last token).
  loglikelihood_rolling  (text,): lm-eval's rolling windows (`get_rolling_token_windows` +
                         `make_disjoint_window`, context_len 1), as its HF model scores them.
  generate_until         (context, {until, max_gen_toks, do_sample, temperature, top_k, top_p}):
                         `looped_models.generate` (greedy unless do_sample), stopped at EOS and at
                         max_gen_toks (at most max_len - 1), the text cut at the first stop string;
                         the context keeps its last tokens that fit the window.

Windows are scored `batch_size` at a time, longest first, padded on the right to a power-of-two
length (at most max_len), rows split over the mesh's data axes: one compile per (length, setting).
The padding never reaches a real token (causal attention; halting's causal exit waits only for
earlier positions), so a score does not depend on its batch, except for a random initial state
(state_init normal / like_init), which is drawn over the batch's shape. `stats` keeps, per task, the
requests, the tokens read, the tokens scored or generated and their block iterations, and the
model's seconds (compiles apart).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Sequence

# Offline by construction: the datasets and hub libraries read these when first imported (below), so
# a task runs from the local data and caches alone (set any of them to 0 to allow downloads).
# DISABLE_MULTIPROC: lm-eval's bootstrap errors in this process, not in a pool forked from it (JAX's
# threads do not survive a fork).
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}
for _key, _value in OFFLINE.items():
  os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from configs.errors import ConfigError  # noqa: E402
from eval.generate import encode  # noqa: E402
from looped_models.generate import Generator  # noqa: E402
from looped_models.halting import check_exit, halt  # noqa: E402
from looped_models.sharding import put, to_host  # noqa: E402

MIN_LENGTH = 16        # the shortest padded window
MAX_GEN_TOKS = 256     # lm-eval's default for generate_until


@dataclasses.dataclass
class TaskStats:
  """What one task's requests cost under one setting."""
  requests: int = 0
  tokens: int = 0          # tokens the model read: every window's inputs, prompts and generated tokens
  scored: int = 0          # tokens scored (continuations, rolling texts) or generated
  iterations: int = 0      # block iterations of the scored or generated tokens, summed
  seconds: float = 0.0     # the model's time (compiles apart), shared out by tokens read
  per_request: list = dataclasses.field(default_factory=list)  # mean iterations of each request

  def add(self, tokens: int, scored: int, iterations: int, seconds: float) -> None:
    self.requests += 1
    self.tokens += tokens
    self.scored += scored
    self.iterations += iterations
    self.seconds += seconds
    self.per_request.append(iterations / scored if scored else None)


def check_setting(iterations: Any, exit: tuple[str, float] | None) -> tuple[int, tuple | None]:
  """(R, exit) checked (one-line ConfigError before anything is compiled); R is exit's cap."""
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ConfigError("--iterations", iterations, allowed="integers R >= 1")
  return iterations, None if exit is None else check_exit(exit, iterations, "--exit")


def _read(logits_BSV: jax.Array, targets_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each position's log-probability of its target and whether the target is the argmax."""
  logp_BSV = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
  logp_BS = jnp.take_along_axis(logp_BSV, targets_BS[..., None], axis=-1)[..., 0]
  return logp_BS, logits_BSV.argmax(-1) == targets_BS


class Programs:
  """The scoring programs of one opened run (jitted, compiled once per shape and setting) and its
  generator: shared by the settings of one command, which differ only in their static arguments."""

  def __init__(self, run: Any):
    self.run, graphdef = run, run.graphdef

    def fixed(params, tokens_BS, targets_BS, *, r):
      logits_BSV = nnx.merge(graphdef, params)(tokens_BS, r).logits_BSV
      return (*_read(logits_BSV, targets_BS), jnp.full(tokens_BS.shape, r, jnp.int32))

    def adaptive(params, tokens_BS, targets_BS, *, criterion, threshold, max_iters):
      out = halt(nnx.merge(graphdef, params), tokens_BS, criterion=criterion, threshold=threshold,
                 max_iters=max_iters)
      return (*_read(out.logits_BSV, targets_BS), out.exit_BS)

    self._fns = {"fixed": jax.jit(fixed, static_argnames=("r",)),
                 "adaptive": jax.jit(adaptive, static_argnames=("criterion", "threshold", "max_iters"))}
    self._compiled: dict[tuple, Any] = {}
    self.generator = Generator(run.model(), run.mesh)
    self.compile_s = 0.0

  def score(self, tokens_BS: np.ndarray, targets_BS: np.ndarray, iterations: int,
            exit: tuple | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(log-probability of each target [B, S], greedy [B, S], block iterations of each position
    [B, S], seconds): the model at R = `iterations`, or halting with `exit` and that cap."""
    args = (self.run.params, put(tokens_BS, self.run.mesh), put(targets_BS, self.run.mesh))
    if exit is None:
      name, static = "fixed", {"r": iterations}
    else:
      name, static = "adaptive", {"criterion": exit[0], "threshold": exit[1], "max_iters": iterations}
    key = (name, tokens_BS.shape, *static.values())
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = self._fns[name].lower(*args, **static).compile()
      self.compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(self._compiled[key](*args))
    seconds = time.perf_counter() - t0
    logp, greedy, its = (to_host(x) for x in out)
    return logp, greedy, its, seconds


class LoopedLM(TemplateLM):
  """An lm-eval model over an opened run at one setting (see the module docstring)."""

  def __init__(self, run: Any, *, iterations: int, exit: tuple[str, float] | None = None,
               batch_size: int = 16, programs: Programs | None = None):
    super().__init__()
    self.iterations, self.exit = check_setting(iterations, exit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ConfigError("--batch-size", batch_size, allowed="an integer >= 1")
    self.run, self.batch_size = run, batch_size
    self.tok, self.spec = run.tokenizer, run.cfg.model
    encode(self.tok, self.spec, [], bos=True)  # a run without a fitting tokenizer: one line
    self.programs = programs or Programs(run)
    self.stats: dict[str, TaskStats] = collections.defaultdict(TaskStats)

  # -- tokens ---------------------------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id

  @property
  def max_length(self) -> int:
    return int(self.spec.max_len)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The ids of `string`, after the prefix token (BOS) unless add_special_tokens=False."""
    ids = encode(self.tok, self.spec, [string], bos=False)[0]
    return ids if add_special_tokens is False else [self.prefix_token_id] + ids

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(ids)

  # -- scoring --------------------------------------------------------------------------------------

  def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = []
    for r in requests:
      context, continuation = r.args
      if context:
        pairs.append(((context, continuation), *self._encode_pair(context, continuation)))
      else:  # as TemplateLM: the prefix token alone is the context
        pairs.append(((context, continuation), [self.prefix_token_id],
                      self.tok_encode(continuation, add_special_tokens=False)))
    return self._loglikelihood_tokens(pairs, tasks=[r.task_name for r in requests])

  def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                            tasks: Sequence[str | None] | None = None) -> list[tuple[float, bool]]:
    """(log-probability, greedy) of each (pair, context ids, continuation ids)."""
    windows = [(k, w) for k, (_, ctx, cont) in enumerate(requests) for w in self._windows(ctx, cont)]
    out = self._score_windows(windows, tasks or [None] * len(requests), len(requests))
    for (pair, _, _), result in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", pair, result)
    return out

  def _windows(self, ctx: list[int], cont: list[int]) -> list[tuple[list[int], int]]:
    """(tokens, n): the model reads tokens[:-1] and the last n of its predictions are scored."""
    L = self.max_length
    if len(cont) <= L:
      return [((ctx + cont)[-(L + 1):], len(cont))] if cont else []
    rolling = get_rolling_token_windows(cont, ctx[-1], max_seq_len=L, context_len=1)
    return [(a + b, len(b)) for a, b in map(make_disjoint_window, rolling)]

  def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
    windows = []
    for k, r in enumerate(requests):
      ids = self.tok_encode(r.args[0], add_special_tokens=False)
      rolling = get_rolling_token_windows(ids, self.prefix_token_id, max_seq_len=self.max_length,
                                          context_len=1)
      windows += [(k, (a + b, len(b))) for a, b in map(make_disjoint_window, rolling)]
    out = self._score_windows(windows, [r.task_name for r in requests], len(requests))
    for r, (logp, _) in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), logp)
    return [logp for logp, _ in out]

  def _score_windows(self, windows: list[tuple[int, tuple[list[int], int]]],
                     tasks: Sequence[str | None], n: int) -> list[tuple[float, bool]]:
    """Score every (request, window) in batches; per request the summed log-probability and whether
    every scored token is the greedy one; the costs into `stats`."""
    per = [[0.0, True, 0, 0, 0, 0.0] for _ in range(n)]  # logp, greedy, read, scored, iterations, s
    order = sorted(range(len(windows)), key=lambda w: -len(windows[w][1][0]))
    B = self.batch_size
    for start in range(0, len(order), B):
      chunk = [windows[w] for w in order[start:start + B]]
      longest = max(len(tokens) - 1 for _, (tokens, _) in chunk)
      S = min(self.max_length, max(MIN_LENGTH, 1 << (longest - 1).bit_length()))
      tokens_BS, targets_BS = np.zeros((B, S), np.int32), np.zeros((B, S), np.int32)
      for row, (_, (tokens, _)) in enumerate(chunk):
        tokens_BS[row, :len(tokens) - 1], targets_BS[row, :len(tokens) - 1] = tokens[:-1], tokens[1:]
      logp, greedy, its, seconds = self.programs.score(tokens_BS, targets_BS, self.iterations,
                                                      self.exit)
      read = sum(len(tokens) - 1 for _, (tokens, _) in chunk)
      for row, (k, (tokens, scored)) in enumerate(chunk):
        m = len(tokens) - 1
        where = slice(m - scored, m)
        p = per[k]
        p[0] += float(logp[row, where].astype(np.float64).sum())
        p[1] = p[1] and bool(greedy[row, where].all())
        p[2], p[3], p[4] = p[2] + m, p[3] + scored, p[4] + int(its[row, where].sum())
        p[5] += seconds * m / read
    for k, p in enumerate(per):
      self.stats[tasks[k]].add(p[2], p[3], p[4], p[5])
    return [(p[0], p[1]) for p in per]

  # -- generation -----------------------------------------------------------------------------------

  def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
    """Requests with the same generation arguments are decoded together (one generator call)."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for k, r in enumerate(requests):
      groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(k)
    out: list[str] = [""] * len(requests)
    for ks in groups.values():
      until, options = self._generation_options(requests[ks[0]].args[1])
      keep = self.max_length - options["max_new"] + 1  # the prompt's tokens that fit the window
      prompts = [self.tok_encode(requests[k].args[0])[-keep:] for k in ks]
      result = self.programs.generator(prompts, eos_id=self.tok.eos_id, slots=self.batch_size,
                                       iterations=self.iterations, exit=self.exit, **options)
      seconds = result.stats["prefill_s"] + result.stats["decode_s"]
      self.programs.compile_s += result.stats["compile_s"]
      read = sum(len(p) + len(t) for p, t in zip(prompts, result.tokens))
      for k, prompt, tokens, its in zip(ks, prompts, result.tokens, result.iterations):
        out[k] = cut(self.tok.decode(until_eos(tokens, self.tok.eos_id)), until)
        m = len(prompt) + len(tokens)
        self.stats[requests[k].task_name].add(m, len(tokens), int(its.sum()), seconds * m / read)
        self.cache_hook.add_partial("generate_until", requests[k].args, out[k])
    return out

  def _generation_options(self, kwargs: dict) -> tuple[list[str], dict]:
    """(stop strings, the generator's options) from lm-eval's generation arguments."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [s for s in until if s]
    max_new = min(int(kwargs.get("max_gen_toks") or MAX_GEN_TOKS), max(self.max_length - 1, 1))
    sample = bool(kwargs.get("do_sample", False))
    temperature = float(kwargs.get("temperature") or 0.0) if sample else 0.0
    return until, {"max_new": max_new, "temperature": temperature if temperature > 0 or not sample
                   else 1.0, "top_k": int(kwargs.get("top_k") or 0) if sample else 0,
                   "top_p": float(kwargs.get("top_p") or 1.0) if sample else 1.0}


def until_eos(tokens: Sequence[int], eos_id: int | None) -> list[int]:
  """The generated ids before the first EOS."""
  ids = [int(t) for t in tokens]
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def cut(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string (as lm-eval's models cut it)."""
  ends = [text.find(s) for s in until if s and s in text]
  return text[:min(ends)] if ends else text
