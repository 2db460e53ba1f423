"""Writing into a run directory: its lock, a probe that it can be written, and any failure recorded.

  with writing(workdir, main=is_main, need_bytes=checkpoint_bytes):
    ...                                  # train, evaluate: write into WORKDIR

On entry: the directory's lock (rundir/lock.py; a second writer gets one line naming the holder), then
a probe write and, on a local disk, a check that a checkpoint of `need_bytes` fits in the free space
(a read-only or full disk is one line, exit status 2, before anything is compiled or written), and a
small reserve file (WORKDIR/.reserve), deleted to make room for the failure's record if the disk
fills up while the run writes.

Any exception inside the block is recorded: the traceback is appended to WORKDIR/error.log (not shown
on the screen), status.json becomes `failed` with the error's one line and the last good step (the
newest checkpoint, where a resume would start), and the exception is raised again as RunFailed, whose
one line the command prints before exiting with status 1. Bad input found inside the block (a config,
run directory or data error) is raised as itself (one line, exit status 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Iterator

from configs.errors import ConfigError
from rundir import lock
from rundir.checkpoint import saved_steps
from rundir.workdir import RunDirError, error_line, path, write_status
from tasks import DataError

ERROR_LOG = "error.log"


class RunFailed(Exception):
  """A run that failed after its directory was opened (recorded; exit status 1)."""


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}"
    n /= 1024
  return ""


def probe(workdir: str, need_bytes: int = 0) -> None:
  """RunDirError (one line) when WORKDIR cannot be written, or, on a local disk, when its free space
  is under `need_bytes`."""
  p = path(workdir)
  if "://" in str(p):
    return
  try:
    test = p / f".probe.{os.getpid()}"
    test.write_bytes(b"\0" * 4096)
    test.unlink()
  except OSError as e:
    raise RunDirError(f"cannot write in {workdir}: {e.strerror or e}") from None
  free = shutil.disk_usage(str(p)).free
  if need_bytes and free < need_bytes:
    raise RunDirError(f"{workdir} has {_size(free)} free, but a checkpoint of this run needs about "
                      f"{_size(need_bytes)}; free some space or use another --workdir")


def _save_traceback(workdir: str, e: BaseException) -> str:
  """Append the traceback to WORKDIR/error.log (else to a temporary file); the file's path."""
  text = (f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n"
          + "".join(traceback.format_exception(e)))
  file = path(workdir) / ERROR_LOG
  try:
    with file.open("a") as f:
      f.write(text)
    return str(file)
  except OSError:
    with tempfile.NamedTemporaryFile("w", prefix="looped-error-", suffix=".log", delete=False) as f:
      f.write(text)
    return f.name


_CAUSES = {"No space left on device": "disk full", "Read-only file system": "read-only file system",
           "Permission denied": "permission denied", "Disk quota exceeded": "disk quota exceeded",
           "Operation not permitted": "operation not permitted"}


def why(e: BaseException) -> str:
  """The error's one line, led by its cause where an I/O error names one ('disk full: ...'; the
  libraries often bury the errno's text deep in a long message)."""
  text = "".join(traceback.format_exception(e))
  cause = next((c for k, c in _CAUSES.items() if k in text), None)
  return f"{cause}: {error_line(e)}" if cause else error_line(e)


def record_failure(workdir: str, e: BaseException, *, status: bool = True) -> str:
  """Save the traceback and (with `status`) mark the run failed at its last good step; the one line
  that says so."""
  line = why(e)
  where = _save_traceback(workdir, e)
  note = f"traceback in {where}"
  if status:
    try:
      steps = saved_steps(workdir)
      write_status(workdir, "failed", error=line, step=steps[-1] if steps else 0, error_log=where)
      note = f"run marked failed in {path(workdir) / 'status.json'} at its last good step " \
             f"{steps[-1] if steps else 0}; {note}"
    except Exception as err:  # the disk that failed the run may fail this too
      note = f"status.json could not be updated ({error_line(err)}); {note}"
  return f"{line}; {note}"


class _ToFile(logging.FileHandler):
  """The libraries' error records, into WORKDIR/error.log; silent if the disk refuses them too."""

  def handleError(self, record: logging.LogRecord) -> None:
    pass


def _below_error(record: logging.LogRecord) -> bool:
  return record.levelno < logging.ERROR


@contextlib.contextmanager
def _library_errors_into(workdir: str) -> Iterator[None]:
  """Error records logged while the block runs (orbax's background save threads, asyncio tasks they
  leave behind; tracebacks, many lines each) and unraisable exceptions go to WORKDIR/error.log instead
  of the screen, where the run's one line says what failed. After a failure they stay there until the process exits (more of
  them come as the failed saves unwind)."""
  if "://" in str(path(workdir)):
    yield
    return
  root = logging.getLogger()
  handler = _ToFile(str(path(workdir) / ERROR_LOG), delay=True)
  handler.setLevel(logging.ERROR)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  screens = list(root.handlers)
  for h in screens:
    h.addFilter(_below_error)
  root.addHandler(handler)
  hook = sys.unraisablehook

  def unraisable(u) -> None:  # e.g. tensorstore callbacks into an event loop orbax closed
    with contextlib.suppress(Exception):
      handler.emit(logging.LogRecord("unraisable", logging.ERROR, "", 0, "%s: %s", (
          u.err_msg or "Exception ignored", "".join(traceback.format_exception(
              u.exc_type, u.exc_value, u.exc_traceback))), None))

  sys.unraisablehook = unraisable
  try:
    yield
  except BaseException:
    raise
  else:
    sys.unraisablehook = hook
    root.removeHandler(handler)
    handler.close()
    for h in screens:
      h.removeFilter(_below_error)


@contextlib.contextmanager
def writing(workdir: str, *, main: bool = True, need_bytes: int = 0, status: bool = True,
            shared: bool = False) -> Iterator[None]:
  """Write into WORKDIR under its lock (process 0 of a multi-host run takes it and writes the
  records); failures recorded as the module says. `status=False`: status.json is left as it is (an
  evaluation of a finished run does not make the run failed)."""
  with lock.hold(workdir, shared=shared, enabled=main):
    if main:
      probe(workdir, need_bytes)
    reserve = _reserve(workdir) if main else None
    try:
      with _library_errors_into(workdir) if main else contextlib.nullcontext():
        yield
    except (KeyboardInterrupt, SystemExit, RunFailed):
      raise
    except (ConfigError, RunDirError, DataError):
      raise  # bad input found on the way: one line, exit status 2, nothing recorded
    except Exception as e:
      if not main:
        raise RunFailed(why(e)) from e
      _free(reserve)  # room for the record on a disk that filled up
      raise RunFailed(record_failure(workdir, e, status=status)) from e
    finally:
      _free(reserve)


RESERVE = ".reserve"
RESERVE_BYTES = 256 * 1024


def _reserve(workdir: str) -> str | None:
  """WORKDIR/.reserve: space held while the run writes, given back to record a failure when the disk
  fills up (status.json and error.log need a little room); None on an object store."""
  if "://" in str(path(workdir)):
    return None
  file = str(path(workdir) / RESERVE)
  try:
    with open(file, "wb") as f:
      f.write(os.urandom(RESERVE_BYTES))  # real blocks: not a sparse file
    return file
  except OSError:
    with contextlib.suppress(OSError):
      os.unlink(file)
    raise RunDirError(f"{workdir} has no room left to write a run; free some space") from None


def _free(reserve: str | None) -> None:
  if reserve:
    with contextlib.suppress(OSError):
      os.unlink(reserve)
