"""One writer per run directory and per sweep directory.

  with hold(workdir):          # the directory's lock, or Locked: one line naming the holder
    ...                        # (re-entrant: a sweep trial trains, then evaluates, under one hold)

A local directory is locked with `fcntl.flock` on DIR/.lock, which also records the holder (host,
pid, command, since when) for the message a second process gets, and is removed when the last holder
lets go. The kernel releases the lock when its holder exits, however it exits, so a lock left by a
dead process is simply taken. A directory that taking the lock created, and that is still empty when
it is let go (bad input found before anything was written), is removed too.

On an object store (`gs://`), which has no locks, DIR/.lock is a lease: the holder's record plus a
heartbeat renewed every HEARTBEAT_S seconds by a thread. A lease whose heartbeat is older than
STALE_S, or whose holder is a dead process on this host, is taken over. Limits: two processes that
find no lease within the same second may both write one (the re-read after writing catches most
such races, not all: there is no compare-and-swap through `etils.epath`), and shared holders leave
no lease (they are refused while an exclusive one lives, but do not keep one out).

`shared=True` holds a lock beside other shared holders (W&B agents each running one trial of a sweep)
but never beside an exclusive one (a whole sweep run). A sweep runner hands each trial's lock down to
the trial's process (`handed_down`): the child inherits the open descriptor, so the lock lasts until
both have let go, and an orphaned trial still saving its checkpoint keeps it from a restarted runner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

from rundir.workdir import RunDirError, path

LOCK = ".lock"
HANDED_DOWN = "LOOPED_HELD_LOCKS"  # {directory: descriptor, or null on an object store}
HEARTBEAT_S = 30.0
STALE_S = 300.0


class Locked(RunDirError):
  """The directory is held by another process (one line naming it)."""


@dataclasses.dataclass
class _Hold:
  fd: int | None = None                  # local: the locked descriptor
  beat: threading.Event | None = None    # object store: set to stop the heartbeat
  count: int = 1
  inherited: bool = False                # our sweep runner's hold: the runner removes the file
  created: bool = False                  # the directory was made by taking the lock


_HELD: dict[str, _Hold] = {}


def _command() -> str:
  """This process's command line as typed (`python -m train ...`), cut at 300 characters."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  program = (["python", "-m", spec.name.removesuffix(".__main__")] if spec is not None
             else ["python", sys.argv[0]])
  return " ".join(program + sys.argv[1:])[:300]


def _me(shared: bool) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "shared": shared,
          "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "heartbeat": time.time(),
          "command": _command()}


def describe(holder: dict | None) -> str:
  """'pid 123 on host h since 2026-... (python -m train ...)' for a holder record."""
  if not holder:
    return "another process"
  return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
          + (f" ({holder['command']})" if holder.get("command") else ""))


def _read(file) -> dict | None:
  try:
    return json.loads(path(file).read_text() or "null")
  except (OSError, ValueError):
    return None


def _refuse(directory: str, holder: dict | None) -> Locked:
  return Locked(f"{directory} is in use by {describe(holder)}; wait for it to finish or stop it "
                "(one writer per directory)")


def _unusable(directory: str, e: OSError) -> RunDirError:
  if isinstance(e, FileExistsError) or isinstance(e, NotADirectoryError):
    return RunDirError(f"{directory}: a file is in the way (not a directory)")
  return RunDirError(f"cannot write in {directory}: {e.strerror or e}")


def _lock_local(directory: str, shared: bool) -> _Hold:
  file = os.path.join(directory, LOCK)
  inherited = json.loads(os.environ.get(HANDED_DOWN) or "{}").get(directory)
  created = not os.path.isdir(directory)
  while True:
    try:
      os.makedirs(directory, exist_ok=True)
      fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise _unusable(directory, e) from None
    if inherited is not None and _same_file(inherited, file):  # our runner's hold on this trial
      os.close(fd)
      return _Hold(fd=os.dup(inherited), inherited=True)
    try:
      fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(file)
      os.close(fd)
      raise _refuse(directory, holder) from None
    if _same_file(fd, file):
      break
    os.close(fd)  # its holder removed that file as it let go: lock the one there now
  try:
    if not shared:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(_me(shared)).encode(), 0)
    elif not os.fstat(fd).st_size:
      os.pwrite(fd, json.dumps(_me(shared)).encode(), 0)
  except OSError as e:
    os.close(fd)
    raise _unusable(directory, e) from None
  return _Hold(fd=fd, created=created)


def _same_file(fd: int, file: str) -> bool:
  try:
    a, b = os.fstat(fd), os.stat(file)
  except OSError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _let_go(directory: str, hold: _Hold) -> None:
  """Remove the lock file when no one else holds it (and the directory, if taking the lock made it
  and nothing was written there), then close: a directory left by a run holds no stale .lock."""
  if not hold.inherited:
    with contextlib.suppress(OSError):
      fcntl.flock(hold.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another shared holder lives
      os.unlink(os.path.join(directory, LOCK))
      if hold.created:
        os.rmdir(directory)  # fails unless empty
  os.close(hold.fd)  # the lock goes with the last descriptor of its open file


def _alive_here(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return True  # another host's process: only its heartbeat tells
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except (OSError, KeyError, ValueError, TypeError):
    pass
  return True


def _lock_lease(directory: str, shared: bool) -> _Hold:
  file = path(directory) / LOCK
  if directory in json.loads(os.environ.get(HANDED_DOWN) or "{}"):
    return _Hold()  # our sweep runner's lease, renewed by the runner
  holder = _read(file)
  if holder and _alive_here(holder) and time.time() - holder.get("heartbeat", 0) < STALE_S:
    raise _refuse(directory, holder)
  if shared:  # shared holders leave no lease (see the module's docstring)
    return _Hold()
  me = _me(shared)
  try:
    path(directory).mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(me))
    time.sleep(1.0)
    now = _read(file)
  except OSError as e:
    raise _unusable(directory, e) from None
  if now and (now.get("pid"), now.get("host")) != (me["pid"], me["host"]):
    raise _refuse(directory, now)
  stop = threading.Event()

  def beat():
    while not stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        file.write_text(json.dumps({**me, "heartbeat": time.time()}))

  threading.Thread(target=beat, daemon=True, name=f"lease {directory}").start()
  return _Hold(beat=stop)


def _key(directory) -> str:
  return str(path(directory))


def acquire(directory, *, shared: bool = False) -> None:
  """Take the directory's lock (creating the directory), or raise Locked naming its holder, or
  RunDirError when the directory cannot be written (a file in the way, read-only, no space)."""
  key = _key(directory)
  if key in _HELD:
    _HELD[key].count += 1
    return
  _HELD[key] = _lock_lease(key, shared) if "://" in key else _lock_local(key, shared)


def release(directory) -> None:
  key = _key(directory)
  hold = _HELD.get(key)
  if hold is None:
    return
  hold.count -= 1
  if hold.count:
    return
  del _HELD[key]
  if hold.fd is not None:
    _let_go(key, hold)
  if hold.beat is not None:
    hold.beat.set()
    with contextlib.suppress(OSError):
      (path(key) / LOCK).unlink()


@contextlib.contextmanager
def hold(directory, *, shared: bool = False, enabled: bool = True) -> Iterator[None]:
  """The directory's lock for the block (nothing when not `enabled`: the other processes of a
  multi-host run, whose process 0 holds it)."""
  if not enabled:
    yield
    return
  acquire(directory, shared=shared)
  try:
    yield
  finally:
    release(directory)


def holder(directory) -> dict | None:
  """The record of the process holding (or last holding) the directory's lock."""
  return _read(path(directory) / LOCK)


def held(directory) -> bool:
  return _key(directory) in _HELD


def handed_down(directories: list[str]) -> tuple[dict[str, str], tuple[int, ...]]:
  """(environment, descriptors to pass) for a child process that works under this process's holds
  of `directories` (subprocess.Popen(env=..., pass_fds=...))."""
  held_here = {_key(d): _HELD[_key(d)].fd for d in directories if _key(d) in _HELD}
  return {HANDED_DOWN: json.dumps(held_here)}, tuple(fd for fd in held_here.values() if fd is not None)
