"""One run per workdir: an exclusive `flock` on `WORKDIR/train.lock`.

The lock belongs to the open file, so the kernel releases it when the holding process exits
in any way (including SIGKILL or a crash): a lock file left behind by a dead run never blocks
the next one. The file records the holder (process id, host, start time) for the message the
second run gets. The file itself is never deleted (deleting a lock file races with a process
that has just opened it).
"""

import datetime
import fcntl
import json
import os
import socket

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock; the message names it."""


def _describe(holder: dict) -> str:
  if not holder:
    return "another process"
  return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"(started {holder.get('since', '?')})")


class WorkdirLock:
  """An exclusive lock on a run directory, held from `acquire` until `release` or exit.

  Args:
    workdir: the run directory (created if missing).
    name: the lock file's name inside it.
  """

  def __init__(self, workdir: str | os.PathLike[str], name: str = LOCK_NAME):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, name)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      WorkdirLockedError: a live process holds it (the message names its pid and host).
    """
    if self._fd is not None:
      return
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read_holder(fd)
      os.close(fd)
      raise WorkdirLockedError(
          f"{self.workdir} is in use by another training run: {_describe(holder)}. Wait "
          f"for it to finish or stop it, or train in another --workdir (lock file: "
          f"{self.path}).") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    self._fd = fd

  @staticmethod
  def _read_holder(fd: int) -> dict:
    try:
      return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):  # being written this instant, or not ours
      return {}

  def release(self) -> None:
    """Releases the lock (the file stays)."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
