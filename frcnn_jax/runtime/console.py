"""What the commands print on the console: progress lines, counted nouns, plain log lines.

* `ProgressLine`: `step 5/10 (50%) | total 1.5 | ETA 00:12` lines (training steps, evaluated
  images), optionally throttled and rewritten in place on a terminal.
* `count(1, "image")` -> "1 image", `count(2, "image")` -> "2 images".
* `use_plain_log_lines()`: absl's console records become the message alone (warnings and errors
  tagged), instead of absl's `I1207 12:00:00.123 4242 file.py:42] ` prefix; a log file absl
  writes to (`--log_dir`) keeps the full prefix.
"""

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import TextIO


def count(n: int, noun: str, plural: str | None = None) -> str:
  """"1 image", "0 images", "2 images" (`plural` for irregular nouns; default: noun + "s")."""
  return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def format_duration(seconds: float) -> str:
  """"mm:ss", or "h:mm:ss" from an hour on (negative: 00:00)."""
  seconds = max(int(seconds), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressLine:
  """Prints `<label> done/total[ unit] (pct%) | name value ... | ETA` lines.

  Training prints one line per logged step (`interval` 0: every `update` prints); evaluation
  prints its image count at most every `interval` seconds, on a terminal rewriting one line in
  place (`overwrite`) until the final update.

  Args:
    total: the count at the end (None or 0: unknown; no percentage, no ETA).
    start: the count the work starts (or resumes) at, for the speed and the ETA.
    label: the line's first word ("step", "eval").
    unit: a noun after the count ("images"), or "".
    enabled: False prints nothing (non-primary processes).
    stream: where to print (stdout by default).
    interval: minimum seconds between printed non-final lines.
    overwrite: on a terminal, end lines with a carriage return instead of a newline (the next
      one replaces it) until the final update.
  """

  def __init__(self, total: int | None, start: int = 0, *, label: str = "step", unit: str = "",
               enabled: bool = True, stream: TextIO | None = None, interval: float = 0.0,
               overwrite: bool = False):
    self.total = total
    self.label, self.unit = label, unit
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.interval = interval
    self.overwrite = overwrite and is_terminal(self.stream)
    self._t0 = time.monotonic()
    self._step0 = start
    self._last_time = -math.inf
    self._last_step: int | None = None
    self._open = False   # a rewritten line is on the console without its newline

  def eta_seconds(self, step: int) -> float:
    """Seconds left at the average speed since the start (or `restart_clock`); NaN when
    nothing was done yet or the total is unknown."""
    done = step - self._step0
    if done <= 0 or not self.total:
      return float("nan")
    return (time.monotonic() - self._t0) / done * (self.total - step)

  def rate(self, step: int) -> float:
    """Units per second since the start (or `restart_clock`)."""
    return (step - self._step0) / max(time.monotonic() - self._t0, 1e-9)

  def restart_clock(self, step: int) -> None:
    """Measures speed from `step` on (e.g. after the first, compiling, step)."""
    self._t0 = time.monotonic()
    self._step0 = step

  def format(self, step: int, scalars: Mapping[str, float] | None = None) -> str:
    """The line for `step` with `scalars` ("name value", 4 significant digits)."""
    head = f"{self.label} {step}" + (f"/{self.total}" if self.total else "")
    if self.unit:
      head += f" {self.unit}"
    if self.total:
      head += f" ({100.0 * step / self.total:.0f}%)"
    parts = [head] + [f"{name} {value:.4g}" for name, value in (scalars or {}).items()]
    if self.total:
      eta = self.eta_seconds(step)
      parts.append("ETA " + ("?" if eta != eta else format_duration(eta)))
    return " | ".join(parts)

  def update(self, step: int, scalars: Mapping[str, float] | None = None, *,
             final: bool = False) -> str:
    """Prints (unless throttled by `interval`) and returns the line for `step`.

    A final update always prints, unless the line of the same step is already on the console.
    """
    line = self.format(step, scalars)
    now = time.monotonic()
    if not self.enabled or (not final and now - self._last_time < self.interval):
      return line
    if final and not self.overwrite and step == self._last_step:
      return line
    self._last_time, self._last_step = now, step
    end = "\r" if self.overwrite and not final else "\n"
    start = "\r" if self._open else ""
    print(start + line, end=end, file=self.stream, flush=True)
    self._open = end == "\r"
    return line


def is_terminal(stream: TextIO) -> bool:
  """Whether `stream` is a terminal (False for files, pipes and closed streams)."""
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


_TAGS = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}


class PlainFormatter(logging.Formatter):
  """Console records as their message, warnings and errors tagged ("warning: ..."); the
  exception text follows as usual. Records the absl handler writes to a log file keep absl's
  full prefix (time, thread, file:line)."""

  def __init__(self, full: logging.Formatter | None = None):
    super().__init__()
    self._full = full

  def format(self, record: logging.LogRecord) -> str:
    if self._full is not None and not _to_console():
      return self._full.format(record)
    tag = _TAGS.get(record.levelno, "" if record.levelno < logging.WARNING else "error: ")
    return tag + super().format(record)


def _to_console() -> bool:
  """Whether absl's handler writes the record being formatted to stderr (it switches its stream
  to stderr while copying a file record to the console)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  stream = getattr(absl_logging.get_absl_handler().python_handler, "stream", None)
  return stream in (sys.stderr, sys.__stderr__)


def use_plain_log_lines() -> None:
  """Makes absl's handler print `PlainFormatter` lines on the console (idempotent)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler().python_handler
  if not isinstance(handler.formatter, PlainFormatter):
    handler.setFormatter(PlainFormatter(full=handler.formatter))
