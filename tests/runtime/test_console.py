"""Tests of frcnn_jax/runtime/console.py: progress lines, counted nouns, plain log lines."""

import io
import logging
import os
import subprocess
import sys

from absl import logging as absl_logging

from frcnn_jax.runtime import console

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_count_agrees_in_number():
  assert console.count(1, "image") == "1 image"
  assert console.count(0, "image") == "0 images"
  assert console.count(2, "image") == "2 images"
  assert console.count(3, "box", "boxes") == "3 boxes"


def test_training_progress_lines():
  out = io.StringIO()
  progress = console.ProgressLine(10, stream=out)
  line = progress.update(5, {"total": 1.5, "learning_rate": 0.001})
  assert line.startswith("step 5/10 (50%) | total 1.5 | learning_rate 0.001 | ETA ")
  progress.update(6, {"total": 1.25})
  assert out.getvalue().splitlines() == [line, progress.format(6, {"total": 1.25})]
  assert console.ProgressLine(10, enabled=False, stream=out).update(1) and \
      len(out.getvalue().splitlines()) == 2
  assert console.format_duration(3725) == "1:02:05" and console.format_duration(65) == "01:05"


def test_evaluation_progress_is_throttled_and_ends_once():
  out = io.StringIO()   # not a terminal: whole lines, no carriage returns
  progress = console.ProgressLine(4, label="eval", unit="images", stream=out, interval=3600,
                                  overwrite=True)
  progress.update(2, {"img/s": 5.0})
  progress.update(3, {"img/s": 5.0})            # within the interval: not printed
  progress.update(4, {"img/s": 5.0}, final=True)
  progress.update(4, {"img/s": 6.0}, final=True)   # the same step again: not repeated
  lines = out.getvalue().splitlines()
  assert [line.split(" | ")[:2] for line in lines] == [["eval 2/4 images (50%)", "img/s 5"],
                                                        ["eval 4/4 images (100%)", "img/s 5"]]
  assert "\r" not in out.getvalue()
  unknown = console.ProgressLine(None, label="eval", unit="images", stream=io.StringIO())
  assert unknown.update(7, {"img/s": 2.0}) == "eval 7 images | img/s 2"


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_on_a_terminal_the_line_is_rewritten_in_place():
  out = _Terminal()
  progress = console.ProgressLine(4, label="eval", unit="images", stream=out, overwrite=True)
  progress.update(1)
  progress.update(2)
  progress.update(4, final=True)
  text = out.getvalue()
  assert text.count("\n") == 1 and text.endswith("\n")
  assert text.split("\r")[-1].startswith("eval 4/4 images (100%)")


def _record(level, message, exc_info=None):
  return logging.LogRecord("frcnn_jax.data.pipeline", level, "/x/pipeline.py", 422, message, (),
                           exc_info)


def test_plain_formatter_drops_absl_prefix_on_the_console(monkeypatch):
  handler = absl_logging.get_absl_handler().python_handler
  formatter = console.PlainFormatter(full=absl_logging.PythonFormatter())
  monkeypatch.setattr(handler, "stream", sys.stderr)
  assert formatter.format(_record(logging.INFO, "canvases chosen")) == "canvases chosen"
  assert formatter.format(_record(logging.WARNING, "odd box")) == "warning: odd box"
  assert formatter.format(_record(logging.ERROR, "bad")) == "error: bad"
  try:
    raise ValueError("boom")
  except ValueError:
    text = formatter.format(_record(logging.ERROR, "failed", sys.exc_info()))
  assert text.startswith("error: failed\nTraceback") and "ValueError: boom" in text
  monkeypatch.setattr(handler, "stream", io.StringIO())   # a log file keeps the full record
  full = formatter.format(_record(logging.WARNING, "odd box"))
  assert "pipeline.py:422] odd box" in full and full.startswith("W")


_COMMAND = """
import logging
from absl import app
from absl import logging as absl_logging
from frcnn_jax.config import flags as config_flags

def main(argv):
  absl_logging.info("an info line %d", 1)
  logging.getLogger("frcnn_jax.x").warning("a warning line")

app.run(main, flags_parser=config_flags.parse_flags)
"""


def test_commands_log_plain_lines():
  proc = subprocess.run([sys.executable, "-c", _COMMAND], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-2:] == ["an info line 1", "warning: a warning line"]
