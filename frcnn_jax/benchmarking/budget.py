"""A measurement run against a wall-clock budget: estimates, skips, a watchdog, outputs.

Items run most important first; each starts only while the time left covers its estimated
cost (the slowest earlier item of its kind, else a guess), and is recorded as skipped
otherwise. The outputs are rewritten atomically after every item, and a watchdog writes them
and ends the process shortly before the budget runs out, so an interrupted run still leaves
its figures.
"""

import datetime
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from frcnn_jax.benchmarking import report
from frcnn_jax.runtime import atomic_io

RESERVE_S = 8.0            # kept for writing the outputs
WATCHDOG_EARLY_S = 3.0     # the watchdog fires this long before the budget ends
RESULTS = "results.json"
SUMMARY = "summary.md"


class Run:
  """The measurements so far, the budget, and writing the outputs (also from the watchdog).

  Attributes:
    start: `time.monotonic()` at the budget's start.
    budget_s: the budget in seconds.
    output: the output folder.
    lock: guards `result` (the watchdog thread writes it).
    child: a child process the watchdog kills, while one runs.
    durations: the slowest item so far of each kind, in seconds.
    result: the JSON result: "date_utc", "command", "budget_s", "complete", "skipped" and
      "errors" (lists of strings), "elapsed_s", plus the caller's entries.
  """

  def __init__(self, output: str, budget_s: float, argv: list[str], *,
               start: float | None = None, initial: dict[str, Any] | None = None,
               summarise: Callable[[dict[str, Any]], str] | None = None):
    """Starts the record of a run.

    Args:
      output: folder of RESULTS and SUMMARY (created on the first write).
      budget_s: the budget in seconds, counted from `start`.
      argv: the command line, recorded.
      start: `time.monotonic()` of the budget's start (default: now).
      initial: the result's other entries at the start.
      summarise: called under the lock before every write with the result (it may add to
        it); returns the text of SUMMARY. None: no SUMMARY.
    """
    self.start = time.monotonic() if start is None else start
    self.budget_s = budget_s
    self.output = output
    self.summarise = summarise
    self.lock = threading.RLock()
    self.child: subprocess.Popen | None = None
    self.durations: dict[str, float] = {}
    self.result: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(argv), "budget_s": budget_s, "complete": False,
        "skipped": [], "errors": [], **(initial or {})}

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()

  def fits(self, kind: str, what: str, guess: float) -> bool:
    """True if the slowest earlier item of `kind` (or `guess`) fits in the time left.

    Otherwise records and prints `what` as skipped.
    """
    estimate = self.durations.get(kind, guess)
    if self.left() - RESERVE_S >= estimate:
      return True
    with self.lock:
      self.result["skipped"].append(f"{what}: {self.left():.0f} s left, about {estimate:.0f} s "
                                    f"needed")
    print(f"skip {what} (budget: {self.left():.0f} s left, ~{estimate:.0f} s needed)",
          flush=True)
    return False

  def took(self, kind: str, seconds: float) -> None:
    """Records an item's duration (the estimate of its kind is the slowest so far)."""
    self.durations[kind] = max(self.durations.get(kind, 0.0), seconds)

  def error(self, message: str) -> None:
    """Records an error (the run goes on; it will not count as complete)."""
    with self.lock:
      self.result["errors"].append(message)

  def write(self, final: bool = False) -> None:
    """Writes RESULTS and SUMMARY atomically (readers never see half a file).

    Args:
      final: the last write: "complete" becomes True when nothing was skipped or failed.
    """
    with self.lock:
      self.result["elapsed_s"] = round(self.elapsed(), 1)
      if final:
        self.result["complete"] = not self.result["skipped"] and not self.result["errors"]
      summary = self.summarise(self.result) if self.summarise else None
      os.makedirs(self.output, exist_ok=True)
      atomic_io.write_text(os.path.join(self.output, RESULTS),
                           json.dumps(report.json_safe(self.result), indent=1))
      if summary is not None:
        atomic_io.write_text(os.path.join(self.output, SUMMARY), summary)

  def watchdog(self) -> threading.Timer:
    """A daemon timer (not started) that, WATCHDOG_EARLY_S before the budget ends, kills the
    child process, writes the outputs as final and ends this process with status 0."""

    def expire():
      with self.lock:
        self.result["errors"].append(f"stopped by the watchdog at {self.budget_s:.0f} s")
        if self.child is not None and self.child.poll() is None:
          self.child.kill()
        self.write(final=True)
      print(f"budget of {self.budget_s:.0f} s reached: wrote {self.output}; exiting",
            flush=True)
      os._exit(0)

    timer = threading.Timer(max(self.budget_s - WATCHDOG_EARLY_S, 1.0), expire)
    timer.daemon = True
    return timer


def exception_of(fn: Callable[..., Any]) -> Callable[..., str | None]:
  """`fn` wrapped to return None, or "Type: message" of the exception it raised."""

  def wrapped(*args):
    try:
      fn(*args)
      return None
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {e}"

  return wrapped
