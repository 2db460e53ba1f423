"""`python -m train.aot --config FILE [--config.KEY=VALUE ...] --topology v5e-16 [--slices N]
[--out FILE.json]` compiles, for a TPU slice that need not be attached (libtpu describes it: run it
with `.venv-tpu/bin/python` after `make tpu-setup`), the programs a run executes, and says whether
they fit a chip's memory before a pod hour is paid for.

The programs are the trainer's own objects (train/programs.py): the training step (its shardings,
donation, micro-batching, remat, recurrence cap), the evaluation step at the training length, and
generation's decode step (looped_models/generate.py: 8 slots, a context of model.max_len, R = the
training maximum, exact cache). Per chip it reports each program's argument, temporary and output
bytes against the chip's HBM, FLOPs per step, the collectives in the compiled program (count, bytes),
a roofline lower bound on the step time with the resulting bounds on tokens/s per chip and MFU, and
the compile time; then a one-line verdict. Exit status 0 fits, 1 does not fit, 2 bad input (an
unknown topology, a mesh that does not fit the slice, ...). A text corpus need not be here: the
vocabulary comes from `model.vocab_size`.

FLOPs are the model's (looped_models/flops.py, at the mean training recurrence): XLA's own count
(`xla_flops`) takes each loop body once, so it undercounts a looped model. The roofline's bound is
max(FLOPs / peak, bytes that must move / HBM bandwidth), the bytes being the arguments read and the
outputs written (train, eval) or the block's parameters (decode, read at every iteration): a bound,
not a prediction. The memory is XLA's TPU compiler's own, the one a pod runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any

from train import tpu

if __name__ == "__main__":
  tpu.compile_only_environment()  # before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from configs import recurrence  # noqa: E402
from configs.errors import ConfigError  # noqa: E402
from looped_models import sharding  # noqa: E402
from looped_models.decode_loop import Options  # noqa: E402
from looped_models.flops import causal_keys, forward_flops, pass_flops, train_flops  # noqa: E402
from looped_models.generate import decode_program  # noqa: E402
from rundir.cli import command, define_config, require, run  # noqa: E402
from rundir.config import is_text, resolve  # noqa: E402
from tasks.synthetic import Text, task_of  # noqa: E402
from tasks.text import VocabOnly  # noqa: E402
from train import programs  # noqa: E402


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined only when it runs as a command: `sweeps` imports this module)."""
  return {
      "config": define_config("config", "configs/base.py", "Trial config file."),
      "topology": flags.DEFINE_string("topology", None, "TPU slice: v5e-16, v5p-128, v6e-256, v4-64 "
                                      "(Cloud TPU accelerator types) or a chip grid such as v5e:4x4."),
      "slices": flags.DEFINE_integer("slices", 1, "Slices of that topology (multi-slice: the data "
                                     "axis across slices)."),
      "out": flags.DEFINE_string("out", None, "Also write the report as JSON to this file."),
      "programs": flags.DEFINE_list("programs", list(PROGRAMS), "Which programs to compile."),
  }


DECODE_SLOTS = 8
PROGRAMS = ("train_step", "eval_step", "decode_step")
OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}


def compile_task(cfg: Any) -> Any:
  """The config's task; for a text config whose corpus is not on this machine, one over a stand-in
  corpus of `model.vocab_size` tokens (the programs need only the vocabulary)."""
  if is_text(cfg) and not os.path.isfile(os.path.join(cfg.task.path or "", "meta.json")):
    if not cfg.model.vocab_size:
      raise ConfigError("model.vocab_size", cfg.model.vocab_size, reason=f"the corpus "
                        f"{cfg.task.path} is not here: give the vocabulary to compile without it")
    return Text(cfg.task.path or "-", data=VocabOnly(cfg.model.vocab_size))
  return task_of(cfg)


def compile_config(cfg: Any) -> Any:
  """`cfg` resolved against `compile_task(cfg)`."""
  return resolve(cfg, task=compile_task(cfg))


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the collectives in a compiled module's text (an async pair counted
  once, by its start; bytes: the result shapes, per device)."""
  out = {op: {"count": 0, "bytes": 0} for op in OPS}
  pattern = re.compile(r"=\s*(.*?)\s+(" + "|".join(OPS) + r")(-start)?\(")
  for line in hlo.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    op = m.group(2)
    out[op]["count"] += 1
    out[op]["bytes"] += sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(x) for x in dims.split(",") if x)
                            for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)))
  return {op: c for op, c in out.items() if c["count"]}


def analyze(compiled: Any, *, flops_per_chip: float, tokens_per_chip: float,
            moved_bytes: float | None, chip: tpu.Chip, per_chip: int, compile_s: float) -> dict:
  """One program's figures per chip (a chip holds `per_chip` devices). `moved_bytes`: the bytes a
  device must move per step (None: its arguments read and its outputs written)."""
  mem = compiled.memory_analysis()
  arg, out, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  alias, code = mem.alias_size_in_bytes, mem.generated_code_size_in_bytes
  moved_bytes = arg + out if moved_bytes is None else moved_bytes
  total = (arg + out - alias + temp + code) * per_chip
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  seconds = max(flops_per_chip / chip.bf16_flops, moved_bytes * per_chip / chip.hbm_bandwidth)
  return {"argument_bytes": arg * per_chip, "temp_bytes": temp * per_chip,
          "output_bytes": out * per_chip, "alias_bytes": alias * per_chip, "total_bytes": total,
          "fits": total <= chip.hbm_bytes, "flops": flops_per_chip,
          "xla_flops": float(cost.get("flops", 0.0)) * per_chip,
          "collectives": collectives(compiled.as_text()), "step_time_lower_bound_s": seconds,
          "tokens_per_s_per_chip_upper_bound": tokens_per_chip / seconds if seconds else None,
          "mfu_upper_bound": flops_per_chip / (seconds * chip.bf16_flops) if seconds else None,
          "compile_s": compile_s}


class OutOfMemory(Exception):
  """The TPU compiler refused the program: it needs more HBM than the chip has."""

  def __init__(self, message: str, compile_s: float):
    super().__init__(message)
    self.compile_s = compile_s
    found = re.findall(r"\(([\d.]+)G\)", message)
    self.needs_bytes = float(found[0]) * tpu.GiB if found else float("nan")


def _lowered(fn: Any, args: tuple) -> tuple[Any, float]:
  t0 = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except Exception as e:  # the compiler's own error type (jax.errors.JaxRuntimeError)
    if "RESOURCE_EXHAUSTED" in str(e):
      raise OutOfMemory(str(e).strip().splitlines()[0], time.perf_counter() - t0) from None
    raise
  return compiled, time.perf_counter() - t0


def refused(e: OutOfMemory, *, argument_bytes: float, flops_per_chip: float, per_chip: int) -> dict:
  """A program the compiler refused for lack of HBM: what it says it needs (per chip)."""
  return {"argument_bytes": int(argument_bytes * per_chip), "temp_bytes": int(e.needs_bytes * per_chip),
          "output_bytes": 0, "alias_bytes": 0, "total_bytes": int(e.needs_bytes * per_chip),
          "fits": False, "flops": flops_per_chip, "xla_flops": None, "collectives": {},
          "step_time_lower_bound_s": None, "tokens_per_s_per_chip_upper_bound": None,
          "mfu_upper_bound": None, "compile_s": e.compile_s, "compile_error": str(e)}


def preflight(cfg: Any, topology: str, slices: int = 1, which: tuple[str, ...] = PROGRAMS,
              say=lambda line: None) -> dict:
  """Compile `cfg`'s programs for `slices` slices of `topology`; the report (see the module)."""
  topo = tpu.parse(topology)
  if slices < 1:
    raise ConfigError("--slices", slices, allowed=">= 1")
  task = compile_task(cfg)
  cfg = resolve(cfg, task=task)
  devices = topo.devices(slices)
  chips = topo.chips * slices
  per_chip = len(devices) // chips
  mesh = sharding.make_mesh(cfg.mesh, devices)
  p = programs.build(cfg, mesh, task.data.token_bytes if is_text(cfg) else None,
                     check_memory=False)
  m, t = cfg.model, cfg.train
  S = task.seq_len(cfg.task.train_length)
  report = {"topology": topo.name, "compiler_topology": topo.compiler_name, "generation": topo.chip.name,
            "slices": slices, "chips": chips, "devices": len(devices),
            "hbm_bytes_per_chip": topo.chip.hbm_bytes, "peak_bf16_flops_per_chip": topo.chip.bf16_flops,
            "hbm_bandwidth_per_chip": topo.chip.hbm_bandwidth, "chip_source": topo.chip.source,
            "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
            "axes_across_slices": axes_across_slices(mesh), "programs": {}}
  if "train_step" in which:
    say(f"compiling train_step for {topo.compiler_name} x{slices} ...")
    scalar = sharding.replicated(mesh)
    n_iters = jax.ShapeDtypeStruct((), "int32", sharding=scalar)
    flops = train_flops(m, t.batch_size, S, t.mean_recurrence) / chips
    try:
      compiled, dt = _lowered(p.train_step, (p.abstract_state, p.batch(t.batch_size, S), n_iters))
      report["programs"]["train_step"] = analyze(
          compiled, flops_per_chip=flops, tokens_per_chip=t.batch_size * S / chips,
          moved_bytes=None, chip=topo.chip, per_chip=per_chip, compile_s=dt)
    except OutOfMemory as e:
      report["programs"]["train_step"] = refused(e, argument_bytes=device_bytes(p.abstract_state),
                                                 flops_per_chip=flops, per_chip=per_chip)
  if "eval_step" in which:
    say("compiling eval_step ...")
    R, B = max(t.eval_recurrences), t.eval_batch_size
    flops = forward_flops(m, B, S, R) + (len(t.eval_recurrences) - 1) * B * S * pass_flops(
        m, causal_keys(S)).decode
    params = device_bytes(p.abstract_state["params"])
    try:
      compiled, dt = _lowered(p.eval_step, (p.abstract_state["params"], p.batch(B, S)))
      report["programs"]["eval_step"] = analyze(
          compiled, flops_per_chip=flops / chips, tokens_per_chip=B * S / chips,
          moved_bytes=params, chip=topo.chip, per_chip=per_chip, compile_s=dt)
    except OutOfMemory as e:
      report["programs"]["eval_step"] = refused(e, argument_bytes=params,
                                                flops_per_chip=flops / chips, per_chip=per_chip)
  if "decode_step" in which:
    say("compiling decode_step ...")
    R = recurrence.max_recurrence(t)
    opts = Options(R, "exact", None, 0, m.max_len, m.max_len // 2, False, False, False)
    fn, args = decode_program(m, p.graphdef, p.abstract_state["params"], mesh, opts, DECODE_SLOTS,
                              DECODE_SLOTS)
    f = pass_flops(m, m.max_len)  # every slot of the buffer is computed
    step_flops = DECODE_SLOTS * (f.iteration + (f.prelude + f.decode) / R)  # one iteration a slot
    block = device_bytes(p.abstract_state["params"]["block"])
    try:
      compiled, dt = _lowered(fn, args)
      report["programs"]["decode_step"] = analyze(
          compiled, flops_per_chip=step_flops / chips, tokens_per_chip=DECODE_SLOTS / R / chips,
          moved_bytes=block, chip=topo.chip, per_chip=per_chip, compile_s=dt)
    except OutOfMemory as e:
      report["programs"]["decode_step"] = refused(e, argument_bytes=device_bytes(args[:2]),
                                                  flops_per_chip=step_flops / chips,
                                                  per_chip=per_chip)
  report["fits"] = all(v["fits"] for v in report["programs"].values())
  report["needs_bytes_per_chip"] = max((v["total_bytes"] for v in report["programs"].values()),
                                       default=0)
  return report


def device_bytes(tree: Any) -> float:
  """Bytes of `tree` (ShapeDtypeStructs with shardings) on one device."""
  return float(sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                   for a in jax.tree.leaves(tree)))


def axes_across_slices(mesh: Any) -> list[str]:
  """The mesh axes along which the slice changes (their collectives cross the data-center network):
  ["data"] for a multi-slice mesh of make_mesh, [] for one slice."""
  index = np.vectorize(lambda d: getattr(d, "slice_index", 0))(mesh.devices)
  return [name for axis, name in enumerate(mesh.axis_names)
          if index.shape[axis] > 1 and not (np.diff(index, axis=axis) == 0).all()]


def verdict(report: dict) -> str:
  need, have = report["needs_bytes_per_chip"] / tpu.GiB, report["hbm_bytes_per_chip"] / tpu.GiB
  return (f"fits: {need:.1f} of {have:.0f} GiB" if report["fits"]
          else f"does not fit: needs {need:.1f} of {have:.0f} GiB")


def table(report: dict) -> str:
  """The report as a readable table, a row per program."""
  g = tpu.GiB
  head = (f"{report['topology']} ({report['compiler_topology']} x{report['slices']}): "
          f"{report['chips']} chips, {report['hbm_bytes_per_chip'] / g:.0f} GiB HBM and "
          f"{report['peak_bf16_flops_per_chip'] / 1e12:.0f} bf16 TFLOP/s per chip; mesh "
          + " x ".join(f"{k} {v}" for k, v in report["mesh"].items()))
  rows = ["| program | args GiB | temp GiB | out GiB | total GiB | fits | TFLOPs | step ≥ ms | "
          "tokens/s/chip ≤ | MFU ≤ | collectives | compile s |", "|" + " --- |" * 12]
  for name, v in report["programs"].items():
    coll = ", ".join(f"{op} {c['count']}× {c['bytes'] / 2**20:.1f} MiB"
                     for op, c in v["collectives"].items()) or "none"
    if v["step_time_lower_bound_s"] is None:  # refused by the compiler
      rows.append(f"| {name} | {v['argument_bytes'] / g:.2f} | - | - | {v['total_bytes'] / g:.2f} | "
                  f"NO | {v['flops'] / 1e12:.3g} | - | - | - | {v['compile_error'][:80]} | "
                  f"{v['compile_s']:.1f} |")
      continue
    rows.append(f"| {name} | {v['argument_bytes'] / g:.2f} | {v['temp_bytes'] / g:.2f} | "
                f"{v['output_bytes'] / g:.2f} | {v['total_bytes'] / g:.2f} | "
                f"{'yes' if v['fits'] else 'NO'} | {v['flops'] / 1e12:.3g} | "
                f"{v['step_time_lower_bound_s'] * 1e3:.3g} | "
                f"{v['tokens_per_s_per_chip_upper_bound']:,.0f} | {v['mfu_upper_bound']:.0%} | "
                f"{coll} | {v['compile_s']:.1f} |")
  return head + "\n" + "\n".join(rows)


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.ERROR)
  command(argv, {None: []})
  require(_F["topology"])
  which = tuple(_F["programs"].value)
  if set(which) - set(PROGRAMS):
    raise ConfigError("--programs", ",".join(which), allowed=",".join(PROGRAMS))
  cfg = _F["config"].value
  report = preflight(cfg, _F["topology"].value, _F["slices"].value, which,
                     say=lambda line: print(line, file=sys.stderr, flush=True))
  report["config"] = cfg.to_dict()
  print(table(report))
  if _F["out"].value:
    with open(_F["out"].value, "w") as f:
      json.dump(report, f, indent=2, default=str)
  print(verdict(report))
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  _F = define_flags()
  run(main)
