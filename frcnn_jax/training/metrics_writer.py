"""Training metrics: TensorBoard event files, a JSON-lines file and the console log.

Only the primary process (index 0) writes; the others get a writer whose methods do nothing,
so callers need no `if jax.process_index() == 0` of their own.

Files in the workdir:
  tensorboard/events.out.tfevents.*   scalars, one tag per metric ("train/total", ...)
  metrics.jsonl                       one JSON object per logged step: {"step": 100, ...};
                                      strict JSON (a NaN or infinite value is written null),
                                      each line written whole with one write and a flush
  console.log                         the console: progress and evaluation lines, warnings
                                      and errors, this package's info records, timestamped
                                      (records with their level and file:line)
The progress line itself is `frcnn_jax.runtime.console.ProgressLine`.
"""

import datetime
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from frcnn_jax.runtime import atomic_io

# frcnn_jax/: info records of every module of the package go to console.log.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _json_number(value: float) -> float | None:
  return value if math.isfinite(value) else None


def truncate_jsonl(path: str | os.PathLike[str], last_step: int, *,
                   drop_eval: bool = False) -> None:
  """Drops records with "step" > `last_step` (written after the checkpoint a run resumes from).

  Args:
    path: the metrics.jsonl file (nothing happens when it does not exist).
    last_step: the step the run continues from.
    drop_eval: also drop the evaluation records ("eval/..." keys) of `last_step` itself (a
      finished run evaluated again).
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    step = record.get("step", 0)
    is_eval = any(key.startswith("eval/") for key in record)
    if step < last_step or (step == last_step and not (drop_eval and is_eval)):
      kept.append(json.dumps(record) + "\n")
  atomic_io.write_text(path, "".join(kept))


class MetricsWriter:
  """Writes scalar metrics to TensorBoard and `metrics.jsonl` (primary process only).

  JSON records hold training scalars under their own names and others under
  `prefix/name` ("eval/map").

  Args:
    workdir: the run's directory.
    enabled: False makes every method a no-op (non-primary processes).
  """

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      # Imported here: tensorboardX pulls in torch when it is installed, seconds of start-up
      # that processes which never write summaries should not pay.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
    """Writes `scalars` for `step`; TensorBoard tags are `prefix/name`."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      record[name if prefix == "train" else f"{prefix}/{name}"] = _json_number(value)
      self._tb.add_scalar(f"{prefix}/{name}", value, int(step))
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


class _LogRecords(logging.Filter):
  """Warnings and errors from anywhere, info records only from this package."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


class ConsoleLog:
  """A text stream that prints to the console and appends to the run's log file.

  Lines written to it (`print(..., file=log)`) go to `stream` as they are and to the file with
  a timestamp; while open it also copies log records (warnings and errors, this package's
  info records) to the file.

  Args:
    path: the log file (appended to); None writes only to `stream` (non-primary processes).
    stream: the console (stdout by default).
  """

  def __init__(self, path: str | os.PathLike[str] | None, *, stream: TextIO | None = None):
    self.stream = stream or sys.stdout
    self._file = None
    self._partial = ""
    self._handler = None
    if path is not None:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")
      self._handler = logging.StreamHandler(self._file)
      self._handler.setFormatter(logging.Formatter(
          "%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s", "%Y-%m-%d %H:%M:%S"))
      self._handler.addFilter(_LogRecords())
      logging.getLogger().addHandler(self._handler)

  def write(self, text: str) -> int:
    self.stream.write(text)
    if self._file is not None:
      self._partial += text
      *lines, self._partial = self._partial.split("\n")
      stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
      if lines:
        self._file.write("".join(f"{stamp} {line}\n" for line in lines))
    return len(text)

  def note(self, line: str) -> None:
    """Writes `line` to the log file only (e.g. an error the console gets elsewhere)."""
    if self._file is not None:
      stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
      self._file.write(f"{stamp} {line}\n")
      self._file.flush()

  def flush(self) -> None:
    self.stream.flush()
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    """Stops copying to the file and closes it (the console stream stays open)."""
    if self._file is None:
      return
    if self._partial:
      self.write("\n")
    logging.getLogger().removeHandler(self._handler)
    self._file.close()
    self._file = None
