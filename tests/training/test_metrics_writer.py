"""Tests of frcnn_jax/training/metrics_writer.py and frcnn_jax/runtime/atomic_io.py: strict JSON, atomic writes."""

import io
import json
import logging
import math
import os

import pytest

from frcnn_jax.runtime import atomic_io
from frcnn_jax.runtime import console as console_lines
from frcnn_jax.training import metrics_writer


def _strict(text):
  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_written_as_null(tmp_path):
  writer = metrics_writer.MetricsWriter(tmp_path)
  writer.write(1, {"total": float("nan"), "grad_norm": float("inf"), "learning_rate": 0.5})
  writer.write(1, {"map": -float("inf")}, "eval")
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    records = [_strict(line) for line in f]
  assert records == [{"step": 1, "total": None, "grad_norm": None, "learning_rate": 0.5},
                     {"step": 1, "eval/map": None}]


def test_truncate_keeps_earlier_steps_and_can_drop_the_last_eval(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 1, "total": 2.0}, {"step": 2, "total": None}, {"step": 2, "eval/map": 0.5},
           {"step": 3, "total": 1.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "to')
  metrics_writer.truncate_jsonl(path, 2)
  assert [_strict(line) for line in path.read_text().splitlines()] == lines[:3]
  metrics_writer.truncate_jsonl(path, 2, drop_eval=True)
  assert [_strict(line) for line in path.read_text().splitlines()] == lines[:2]
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_console_log_copies_lines_and_warnings_to_the_file(tmp_path):
  console = io.StringIO()
  log = metrics_writer.ConsoleLog(tmp_path / "console.log", stream=console)
  progress = console_lines.ProgressLine(10, stream=log)
  progress.update(5, {"total": 1.5})
  logging.getLogger("frcnn_test").warning("a warning for the log %d", 7)
  logging.getLogger("orbax.x").info("dropped")
  package = os.path.dirname(os.path.dirname(metrics_writer.__file__))
  record = logging.LogRecord("frcnn_jax.data.pipeline", logging.INFO,
                             os.path.join(package, "data", "pipeline.py"), 7, "a plan", (), None)
  logging.getLogger().handle(record)   # an info record of another module of the package
  log.close()
  logging.getLogger("frcnn_test").warning("after close")
  text = (tmp_path / "console.log").read_text()
  assert "step 5/10" in console.getvalue() and "step 5/10 (50%) | total 1.5" in text
  assert "a warning for the log 7" in text and "WARNING" in text
  assert "test_metrics_writer.py:" in text   # the file keeps where a record came from
  assert "dropped" not in text and "after close" not in text
  assert "pipeline.py:7] a plan" in text


def test_atomic_write_replaces_whole_files_only(tmp_path, monkeypatch):
  path = tmp_path / "sub" / "config.json"
  atomic_io.write_json(path, {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  with pytest.raises(ValueError):
    atomic_io.write_json(path, {"a": math.nan})  # strict JSON: refused, the old file stays

  def interrupted_replace(src, dst):
    raise KeyboardInterrupt
  monkeypatch.setattr(os, "replace", interrupted_replace)
  with pytest.raises(KeyboardInterrupt):
    atomic_io.write_text(path, "half")
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(path.parent) == ["config.json"]
