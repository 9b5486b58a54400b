"""Training metrics: TensorBoard event files, a JSON-lines file and a console progress line.

Only the primary process (index 0) writes; the others get a writer whose methods do nothing,
so callers need no `if jax.process_index() == 0` of their own.

Files in the workdir:
  tensorboard/events.out.tfevents.*   scalars, one tag per metric ("train/total", ...)
  metrics.jsonl                       one JSON object per logged step: {"step": 100, ...}
"""

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO


def _fmt_duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def truncate_jsonl(path: str | os.PathLike[str], last_step: int) -> None:
  """Drops records with "step" > `last_step` (written after the checkpoint a run resumes from)."""
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
    if record.get("step", 0) <= last_step:
      kept.append(json.dumps(record) + "\n")
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


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
      record[name if prefix == "train" else f"{prefix}/{name}"] = value
      self._tb.add_scalar(f"{prefix}/{name}", value, int(step))
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


class ProgressLine:
  """Prints `step / total | loss ... | lr | img/s | ETA` lines to the console.

  Args:
    total_steps: the run's last step (for the percentage and ETA).
    start_step: the step the run starts (or resumes) at.
    enabled: False prints nothing (non-primary processes).
    stream: where to print (stdout by default).
  """

  def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True,
               stream: TextIO | None = None):
    self.total_steps = total_steps
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self._t0 = time.monotonic()
    self._step0 = start_step

  def eta_seconds(self, step: int) -> float:
    """Seconds left at the average speed since the start (excluding compilation's first step)."""
    done = step - self._step0
    if done <= 0:
      return float("nan")
    return (time.monotonic() - self._t0) / done * (self.total_steps - step)

  def restart_clock(self, step: int) -> None:
    """Measures speed from `step` on (call after the first, compiling, step)."""
    self._t0 = time.monotonic()
    self._step0 = step

  def update(self, step: int, scalars: Mapping[str, float]) -> str:
    """Prints and returns one progress line for `step`."""
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.0f}%)"]
    for name, value in scalars.items():
      parts.append(f"{name} {value:.4g}")
    eta = self.eta_seconds(step)
    parts.append("ETA " + ("?" if eta != eta else _fmt_duration(eta)))
    line = " | ".join(parts)
    if self.enabled:
      print(line, file=self.stream, flush=True)
    return line
