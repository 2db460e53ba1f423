"""Autoregressive generation with a KV cache and per-token adaptive depth (DESIGN §8).

  out = generate(model, [prompt_ids, ...], max_new=64, iterations=16,
                 exit=("fixed_point", 1e-3), cache="latest", temperature=0.8, top_k=40, seed=0)
  out.tokens[i], out.iterations[i]   # the generated ids of prompt i and the block iterations of each

The cache holds keys and values in ring buffers of T = min(context, longest prompt + max_new - 1)
slots per sequence (context: model.max_len unless given), position p at slot p mod T: a token sees
the keys at (p - T, p], the causal local attention of width T over the whole sequence. So a model
with RoPE positions generates for as long as asked, its cache never longer than its context (keys
keep the rotation of their absolute positions: every distance a query sees is at most T - 1, with
the default context one the model was trained on), and a prompt longer than T is prefilled as that same sliding window. Learned
position embeddings end at model.max_len, and so does their generation. Prelude and coda layers keep
one entry per token, the block's layers either one per (iteration, layer) (`exact`: a token at
iteration j reads earlier tokens' iteration-j entries, as the full-sequence forward does) or one per
layer holding each token's latest iteration (`latest`: memory independent of R; a token at iteration
j reads earlier tokens at their final iteration). With adaptive exit a token that stopped at
iteration e is read at e by later tokens at every j > e (`exact` reads each position at slot min(j,
its last iteration)).

Prompts are prefilled at R iterations (the whole prompt but its last token's block and coda, which the
decode loop runs). Decoding runs P slots (`slots`, default min(8, prompts)) with iteration-level
scheduling: one compiled step runs one block iteration for every slot, each slot at its own iteration
of its own current token; a slot whose token exits (criterion of `looped_models.halting`, the same
detector as the evaluator's, or R reached) decodes it through the coda, samples the next token, embeds
it and starts it at iteration 1 in the same step. So an exited token costs no further block FLOPs, at
batch 1 as in a batch; a finished sequence leaves its slot to the next waiting prompt (continuous
batching). Every function is compiled once per shape (prompt bucket, slots), not per token.

The pieces: looped_models/kv_cache.py (the buffers and the layers against them), sampling.py,
decode_loop.py (the compiled prefill and decode programs); this module checks the arguments, schedules
prompts onto slots and counts time and FLOPs.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs.errors import ConfigError
from looped_models import decode_loop
from looped_models.decode_loop import Options, initial_carry
from looped_models.flops import pass_flops
from looped_models.halting import DECODING_CRITERIA, check_exit
from looped_models.kv_cache import CACHES, Buffers, Cache, cache_bytes, empty_cache
from looped_models.sampling import sample
from looped_models.sharding import BATCH_AXES, put, to_host

__all__ = ["CACHES", "Buffers", "Cache", "GenerateOutput", "Generator", "cache_bytes", "check",
           "decode_program", "empty_cache", "generate", "sample"]


class GenerateOutput(NamedTuple):
  tokens: list[np.ndarray]       # per prompt: the generated ids
  iterations: list[np.ndarray]   # per prompt: the block iterations each generated token used
  oracle: list[np.ndarray] | None  # per prompt (track_oracle): the first iteration after which the
                                   # token's prediction no longer changed (within its iterations)
  logits: list[np.ndarray] | None  # per prompt (return_logits): each generated token's logits [V]
  stats: dict[str, Any]          # timing, FLOPs executed and needed, steps


def check(m: Any, prompts: Sequence[Sequence[int]], *, max_new: int, iterations: int,
          exit: tuple[str, float] | None, cache: str, temperature: float, top_k: int, top_p: float,
          slots: int | None, context: int | None = None) -> int:
  """One-line ConfigError for arguments that cannot work, before anything is compiled; returns the
  ring buffer's length T: the context (default model.max_len), or the whole sequence where it is
  shorter (every prompt token and every new token but the last is fed to the model)."""
  if not len(prompts):
    raise ConfigError("generate.prompts", "[]", reason="give at least one prompt")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ConfigError("generate.prompt", repr(""), reason=f"prompt {i} is empty")
    bad = [int(t) for t in p if not 0 <= int(t) < m.vocab_size]
    if bad:
      raise ConfigError("generate.prompt", bad[0], reason=f"prompt {i} holds a token outside the "
                        f"model's vocabulary of {m.vocab_size}: the tokenizer does not match the run")
  if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
    raise ConfigError("generate.max_new", max_new, allowed="an integer >= 1")
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ConfigError("generate.iterations", iterations, allowed="an integer R >= 1")
  if cache not in CACHES:
    raise ConfigError("generate.cache", cache, CACHES)
  if exit is not None:
    check_exit(exit, iterations, "generate.exit")
  if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
    raise ConfigError("generate.temperature", temperature, allowed="a number >= 0 (0: greedy)")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= m.vocab_size:
    raise ConfigError("generate.top_k", top_k, allowed=f"an integer in 0..{m.vocab_size} (0: all)")
  if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ConfigError("generate.top_p", top_p, allowed="a number in (0, 1]")
  if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
    raise ConfigError("generate.slots", slots, allowed="an integer >= 1")
  if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
    raise ConfigError("generate.context", context, allowed="an integer >= 1 (default model.max_len)")
  longest, L = max(len(p) for p in prompts), m.max_len
  if m.positions != "rope" and context is not None and context > L:
    raise ConfigError("generate.context", context, allowed=f"<= model.max_len={L}",
                      reason="learned position embeddings end there (RoPE models may go further)")
  if m.positions != "rope" and longest > L:
    raise ConfigError("generate.prompt", f"{longest} tokens", reason=f"longer than the model's "
                      f"context of {L} tokens (model.max_len), where its learned positions end")
  if m.positions != "rope" and longest + max_new - 1 > L:  # the last new token is never fed back
    raise ConfigError("generate.max_new", max_new, reason=f"a prompt of {longest} tokens leaves room "
                      f"for {L - longest + 1} new tokens in the model's context of {L}: its learned "
                      "position embeddings end there (RoPE models generate past it)")
  return min(L if context is None else context, longest + max_new - 1)


class Generator:
  """A model's generation programs, compiled once per (options, shapes) and kept for later calls.

  With `mesh` (the mesh the parameters are sharded on, e.g. `open_run(...).mesh`), the decoding state
  lives on it too: the KV cache split by sequence slots over data x fsdp where they divide, the rest
  replicated. Under several processes (jax.distributed) every process makes the same call and gets
  the same result, each device computing its share."""

  def __init__(self, model: Any, mesh: Any = None):
    self.spec, self.mesh = model.spec, mesh
    self.graphdef, self.params = nnx.split(model)
    self._programs: dict[Options, _Programs] = {}

  def _put(self, x: Any, rows: bool = True) -> jax.Array:
    """A host value (the same on every process) on the mesh; a local array without one."""
    return jnp.asarray(x) if self.mesh is None else put(x, self.mesh, rows)

  def _init_carry(self, P: int, N: int, T: int, opts: Options) -> dict:
    """The decoding state of P slots and N sequences, made on the device(s) it lives on."""
    m = self.spec
    init = lambda: initial_carry(m, P, N, opts, empty_cache(m, P, T, opts.iterations, opts.cache,
                                                            jnp.dtype(m.dtype)))
    if self.mesh is None:
      return jax.jit(init)()
    return jax.jit(init, out_shardings=carry_shardings(self.mesh, jax.eval_shape(init), P))()

  def _options(self, prompts: Sequence[Sequence[int]], max_new: int, iterations: int,
               exit: tuple[str, float] | None, cache: str, temperature: float, top_k: int,
               top_p: float, slots: int | None, eos_id: int | None, track_oracle: bool,
               return_logits: bool, forced: Sequence[Sequence[int]] | None, context: int | None
               ) -> Options:
    """The checked arguments as the programs' static options (ConfigError before any compile)."""
    m = self.spec
    T = check(m, prompts, max_new=max_new, iterations=iterations, exit=exit, cache=cache,
              temperature=temperature, top_k=top_k, top_p=top_p, slots=slots, context=context)
    if forced is not None and (len(forced) != len(prompts) or any(len(f) > max_new for f in forced)):
      raise ConfigError("generate.forced", f"{len(forced)} sequences", reason=f"give one sequence of "
                        f"at most max_new={max_new} tokens per prompt")
    criterion = exit[0] if exit is not None else None
    return Options(iterations, cache, criterion, top_k, T, max_new, eos_id is not None, track_oracle,
                   return_logits)

  def _admit_args(self, c: dict, prompts: Sequence[Sequence[int]], items: list[tuple[int, int]],
                  P: int, root: jax.Array) -> tuple:
    """`admit`'s arguments for items (sequence, slot), padded to the next power of two (at most P)
    with dropped rows."""
    A, L = min(P, 1 << (len(items) - 1).bit_length()), max(len(p) for p in prompts)
    tokens = np.zeros((A, L), np.int32)
    lengths, seqs, slot = np.ones(A, np.int32), np.zeros(A, np.int32), np.full(A, P, np.int32)
    for a, (i, s) in enumerate(items):
      tokens[a, :len(prompts[i])] = prompts[i]
      lengths[a], seqs[a], slot[a] = len(prompts[i]), i, s
    return (self.params, c, *(self._put(x) for x in (tokens, lengths, seqs, slot)), root)

  def _schedule(self, programs: _Programs, c: dict, prompts: Sequence[Sequence[int]], P: int,
                root: jax.Array, scalars: tuple) -> tuple[dict, dict[str, float]]:
    """Admit waiting prompts into free slots and run the slots until every sequence is done;
    (the final decoding state, seconds spent compiling, prefilling and decoding)."""
    N = len(prompts)
    queue, free = list(range(N)), list(range(P))
    seconds = {"compile_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}

    def call(key: tuple, args: tuple, phase: str) -> dict:
      fn, dt = programs.get(key, args)
      seconds["compile_s"] += dt
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args))
      seconds[phase] += time.perf_counter() - t0
      return out

    while True:
      if queue and free:
        items = [(queue.pop(0), free.pop(0)) for _ in range(min(len(queue), len(free)))]
        args = self._admit_args(c, prompts, items, P, root)
        c = call(("admit", args[2].shape, P, N), args, "prefill_s")
      c = call(("run", P, N), (self.params, c, *scalars), "decode_s")
      seq_P = to_host(c["seq_P"])
      free = [p for p in range(P) if seq_P[p] < 0]
      if not queue and len(free) == P:
        return c, seconds

  def __call__(self, prompts: Sequence[Sequence[int]], *, max_new: int, iterations: int,
               exit: tuple[str, float] | None = None, cache: str = "exact", temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, slots: int | None = None,
               eos_id: int | None = None, track_oracle: bool = False, return_logits: bool = False,
               forced: Sequence[Sequence[int]] | None = None, context: int | None = None
               ) -> GenerateOutput:
    """See `generate`."""
    opts = self._options(prompts, max_new, iterations, exit, cache, temperature, top_k, top_p, slots,
                         eos_id, track_oracle, return_logits, forced, context)
    threshold = exit[1] if exit is not None else 0.0
    N, P = len(prompts), min(slots or 8, len(prompts))
    root = self._put(jax.random.key_data(jax.random.key(seed)), rows=False)
    scalars = (*(self._put(np.float32(x)) for x in (threshold, temperature, top_p)), root,
               self._put(np.int32(-1 if eos_id is None else eos_id)))
    if opts not in self._programs:
      self._programs[opts] = _Programs(self.graphdef, opts)
    c = self._init_carry(P, N, opts.length, opts)
    if forced is not None:
      table = np.full((N, max_new), -1, np.int32)
      for i, f in enumerate(forced):
        table[i, :len(f)] = f
      c["forced"] = self._put(table, rows=False)
    c, seconds = self._schedule(self._programs[opts], c, prompts, P, root, scalars)
    return _output(self.spec, c, opts, N, P, max(len(p) for p in prompts), seconds,
                   None if exit is None else f"{exit[0]}:{threshold}")


def generate(model: Any, prompts: Sequence[Sequence[int]], mesh: Any = None, **options
             ) -> GenerateOutput:
  """Generate `max_new` tokens after each prompt (lists of token ids) with R = `iterations` block
  iterations per token, or fewer where `exit` = (criterion, threshold) fires first; `cache` exact |
  latest; sampling by `temperature` (0: greedy), `top_k`, `top_p`, `seed`; `slots` sequences in
  flight; a sequence stops early at `eos_id` when given. `track_oracle` records, per token, the first
  iteration after which its argmax prediction no longer changed; `return_logits` each token's logits.
  `forced` (teacher forcing): per prompt, tokens fed in place of the sampled ones, so that the logits
  score a given text as decoding computes it. `context`: the ring buffer's length, the farthest back
  a token sees (default model.max_len; beyond it only with RoPE positions, at distances the model
  was not trained on). With RoPE positions `max_new` has no limit: the cache slides over the
  last `context` tokens (see the module doc); with learned positions prompt and new tokens must fit
  in model.max_len.
  `mesh`: the mesh the model's parameters are sharded on (see `Generator`).
  Compiles on every call: reuse a `Generator(model)` to generate more than once."""
  return Generator(model, mesh)(prompts, **options)


def _output(m: Any, c: dict, opts: Options, N: int, P: int, L: int, seconds: dict[str, float],
            exit: str | None) -> GenerateOutput:
  """The generated tokens of the final decoding state `c`, on the host, with their statistics."""
  host = {k: to_host(c[k]) for k in ("out_len", "out_tok", "out_it", "steps", "finishes", "busy")
          + ("out_oracle",) * opts.track_oracle + ("out_logits",) * opts.return_logits}
  lengths = host["out_len"]
  take = lambda key: [host[key][i, :lengths[i]] for i in range(N)]
  its = take("out_it")
  steps, finishes, busy = int(host["steps"]), int(host["finishes"]), int(host["busy"])
  flops = _flops(m, opts.length, opts, P, steps, finishes, its, N, L)
  new_tokens, decode_s = int(lengths.sum()), seconds["decode_s"]
  stats = {"tokens": new_tokens, "prompts": N, "slots": P, "iterations_cap": opts.iterations,
           "cache": opts.cache, "cache_tokens": opts.length, "exit": exit,
           "mean_iterations": float(np.concatenate(its).mean()), "steps": steps,
           "finish_steps": finishes, "slot_utilisation": busy / max(steps * P, 1),
           "decode_s": decode_s, "prefill_s": seconds["prefill_s"], "compile_s": seconds["compile_s"],
           "decode_tokens_per_s": new_tokens / decode_s if decode_s else None,
           "cache_bytes": cache_bytes(m, P, opts.length, opts.iterations, opts.cache, m.dtype), **flops}
  return GenerateOutput(take("out_tok"), its, take("out_oracle") if opts.track_oracle else None,
                        take("out_logits") if opts.return_logits else None, stats)


def _flops(m: Any, T: int, opts: Options, P: int, steps: int, finishes: int,
           its: list[np.ndarray], N: int, L: int) -> dict[str, float]:
  """Forward FLOPs of the decode loop as executed (every slot of every step, active or idle, and
  the finishing branch for every slot whenever one exits) and as needed (each token's own
  iterations); `flops_prefill` for the prompts."""
  f = pass_flops(m, T)
  peeks = (opts.criterion in DECODING_CRITERIA) + opts.track_oracle
  per_iter = f.iteration + peeks * f.decode
  needed_iters = float(sum(int(i.sum()) for i in its))
  executed = steps * P * per_iter + finishes * P * (f.prelude + f.decode)
  needed = needed_iters * per_iter + sum(len(i) for i in its) * (f.prelude + f.decode)
  return {"flops_executed": float(executed), "flops_needed": float(needed),
          "block_flops_executed": float(steps * P * f.iteration),
          "block_flops_needed": needed_iters * f.iteration,
          "flops_prefill": float(N * L * (f.prelude + f.decode + opts.iterations * f.iteration))}


def carry_shardings(mesh: Any, shapes: dict, P: int) -> dict:
  """Where the decoding state of P slots lives: the KV cache split by slot over the batch axes (when
  P divides over them), everything else replicated."""
  ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  cache_rows = PartitionSpec(None, None, BATCH_AXES) if P % ways == 0 else PartitionSpec()
  return {k: jax.tree.map(lambda _: NamedSharding(mesh, cache_rows if k == "cache"
                                                  else PartitionSpec()), v)
          for k, v in shapes.items()}


def decode_program(m: Any, graphdef: Any, params: Any, mesh: Any, opts: Options, slots: int,
                   n_seqs: int) -> tuple[Any, tuple]:
  """(the decode program as `Generator` jits it, its abstract arguments) for `params` (arrays, or
  ShapeDtypeStructs carrying their shardings) on `mesh`: what `python -m train.aot` lowers for a TPU
  topology without building the decoding state."""
  init = lambda: initial_carry(m, slots, n_seqs, opts, empty_cache(m, slots, opts.length,
                                                                   opts.iterations, opts.cache,
                                                                   jnp.dtype(m.dtype)))
  shapes = jax.eval_shape(init)
  shardings = carry_shardings(mesh, shapes, slots)
  carry = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                       shardings)
  rep = NamedSharding(mesh, PartitionSpec())
  scalar = lambda dt, shape=(): jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  root = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  args = (params, carry, scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.float32),
          scalar(root.dtype, root.shape), scalar(jnp.int32))
  return _jit(decode_loop.run, graphdef, opts, shardings), args


def _jit(fn, graphdef, opts: Options, carry_shardings: Any):
  """One program of generation, jitted as every caller runs it: the decoding state donated, and
  returned where it came in."""
  return jax.jit(functools.partial(fn, graphdef, opts=opts), donate_argnums=(1,),
                 out_shardings=carry_shardings)


class _Programs:
  """The compiled programs of one (graph, options), ahead of time so that timings exclude compiles."""

  def __init__(self, graphdef, opts: Options):
    self.compiled, self.graphdef, self.opts = {}, graphdef, opts
    self.fns = {"admit": decode_loop.admit, "run": decode_loop.run}

  def get(self, key: tuple, args: tuple) -> tuple[Any, float]:
    """(the compiled program `key[0]` for `args`, seconds spent compiling it now). The decoding
    state it returns keeps the shardings it came with (args[1]), so the next call fits it."""
    if key in self.compiled:
      return self.compiled[key], 0.0
    t0 = time.perf_counter()
    fn = _jit(self.fns[key[0]], self.graphdef, self.opts, jax.tree.map(lambda a: a.sharding, args[1]))
    self.compiled[key] = fn.lower(*args).compile()
    return self.compiled[key], time.perf_counter() - t0
