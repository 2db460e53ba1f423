"""Read the records of an offline W&B run file (run-ID.wandb), so tests can check what W&B got.

The file is a 7-byte header (":W&B", version) followed by a LevelDB-style log: 32 KiB blocks of
chunks, each with a 7-byte header (crc32c: 4, length: 2 little-endian, type: 1 full/first/middle/last),
carrying serialised `wandb_internal_pb2.Record` protobufs.
"""

import glob
import json
import os
import struct
import time

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HEADER = 32768, 7


def read_records(path: str) -> list:
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", "not a W&B run file"
  records, pos, parts = [], _HEADER, []
  while pos + _HEADER <= len(data):
    left_in_block = _BLOCK - pos % _BLOCK
    if left_in_block < _HEADER:
      pos += left_in_block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
    chunk = data[pos + _HEADER:pos + _HEADER + length]
    pos += _HEADER + length
    if kind == 0 and length == 0:
      continue
    parts.append(chunk)
    if kind in (1, 4):  # full or last
      rec = pb.Record()
      rec.ParseFromString(b"".join(parts))
      records.append(rec)
      parts = []
  return records


def finished_records(path: str, timeout_s: float = 60.0) -> list:
  """The records of one session's file once its `exit` record is there: W&B's service process
  writes the file and may still be flushing the last records (summary, exit) when `finish()` has
  returned on a loaded machine, so wait for them (at most `timeout_s`)."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      records = read_records(path)
    except Exception:  # a record still being written
      if time.monotonic() > deadline:
        raise
      records = []
    if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
      return records
    time.sleep(0.2)


def _items(items) -> dict:
  return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _session_order(path: str) -> tuple[str, int]:
  """(time stamp, the number W&B appended to a session started in the same second as another)."""
  name = os.path.basename(os.path.dirname(path))  # offline-run-YYYYMMDD_HHMMSS-ID[-N]
  stamp, _, rest = name.removeprefix("offline-run-").partition("-")
  suffix = rest.rpartition("-")[2] if rest.count("-") else ""
  return stamp, int(suffix) if suffix.isdigit() else 0


def offline_run(wandb_dir: str, run_id: str) -> dict:
  """{"run": the run record, "config": {key: value}, "summary": {key: value}, "history": [dict],
  "parts": n}. A resumed offline run is written as one directory per session, in time order (what
  `wandb sync` uploads into the one run); their records are read in that order."""
  # sessions started within one second share a time stamp: W&B adds "-1", "-2", ... to the later ones
  paths = sorted(glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
                 + glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}-*", f"run-{run_id}.wandb")),
                 key=_session_order)
  assert paths, f"no offline W&B run {run_id} under {wandb_dir}"
  # wait for the newest session's last records; an earlier session may have been killed mid-run
  parts = [read_records(path) for path in paths[:-1]] + [finished_records(paths[-1])]
  out = {"run": None, "config": {}, "summary": {}, "history": [], "parts": len(paths)}
  for rec in (r for records in parts for r in records):
    kind = rec.WhichOneof("record_type")
    if kind == "run":
      out["run"] = rec.run
      out["config"].update(_items(rec.run.config.update))
    elif kind == "config":
      out["config"].update(_items(rec.config.update))
    elif kind == "summary":
      out["summary"].update(_items(rec.summary.update))
    elif kind == "history":
      out["history"].append(_items(rec.history.item))
  return out
