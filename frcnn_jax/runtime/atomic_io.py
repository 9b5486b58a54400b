"""Atomic file writes: a reader (or a restart after a kill) sees the old file or the new one.

Every file a run writes whole (config.json, evaluation reports, rewritten metrics) goes through
`write_text` / `write_json` (binary files through `replacing`): the content is written to a temporary file in the same directory,
flushed to disk, then renamed over the target (`os.replace` is atomic on POSIX file systems).
A process killed half-way leaves at most a stray `.<name>.*.tmp` file, never a truncated
target. The written file gets the mode of a newly created one (0666 minus the umask, e.g. 0644),
as `open(path, "w")` would give it, so whoever may read the folder may read the results.
"""

import contextlib
import json
import os
import tempfile
from typing import IO
from typing import Any
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
  """Opens a temporary file next to `path` ("w" text, UTF-8, or "wb"); on a clean exit it is
  flushed to disk and renamed over `path`, on an error removed. Creates the directory. The
  file's mode is 0666 minus the umask (a replaced file's own mode is not kept)."""
  path = os.fspath(path)
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      os.fchmod(f.fileno(), 0o666 & ~umask())   # mkstemp made it 0600
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def umask() -> int:
  """The process's umask. Read from /proc/self/status where there is one: `os.umask` can only
  read it by setting it, which races with files created by other threads meanwhile."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
  """Replaces the file at `path` with `text` (UTF-8) atomically; creates its directory."""
  with replacing(path) as f:
    f.write(text)


def write_json(path: str | os.PathLike[str], value: Any, *, indent: int | None = 2) -> None:
  """Writes `value` as strict JSON (NaN and infinities are refused) atomically to `path`."""
  write_text(path, json.dumps(value, indent=indent, allow_nan=False) + "\n")
