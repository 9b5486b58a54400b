"""frcnn_jax.benchmarking.accelerator, budget and accelerator_report: the check's items
within a budget, torchvision merged into the rows, the targets and the summary."""

import json
import time

import pytest

from frcnn_jax.benchmarking import accelerator
from frcnn_jax.benchmarking import accelerator_report
from frcnn_jax.benchmarking import budget
from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import peer as peer_lib


def test_peer_figures_are_merged_into_the_rows(tmp_path, monkeypatch):
  run = accelerator.new_run(str(tmp_path), 100.0, ["accelerator_check.py"],
                            start=time.monotonic())
  row = {"dtype": "bfloat16", "height": 608, "width": 800, "batch": 2, "num_devices": 1,
         "train_step_s": 0.01, "infer_s": 0.005}
  run.result["rows"].append(row)
  calls = []

  def fake_run_peer(rows, config, steps, num_gt):
    del config, steps, num_gt
    calls.append(rows)
    (c,) = rows
    return {"available": True, "results": {(c.dtype, c.height, c.width, c.batch): {
        "train_step_s": 0.04, "infer_s": 0.02}}}

  monkeypatch.setattr(peer_lib, "run_peer", fake_run_peer)
  monkeypatch.setattr(budget.Run, "write", lambda self, final=False: None)
  case = cases.Case("bfloat16", 608, 800, 2, 300, ("train", "infer"))
  accelerator.peer(run, None, [case, case], steps=1, num_gt=1)
  assert len(calls) == 1   # the same case is measured once
  assert row["infer_speedup_vs_peer"] == pytest.approx(4.0)
  assert row["train_speedup_vs_peer"] == pytest.approx(4.0)
  accelerator_report.evaluate_targets(run.result)
  assert run.result["targets"]["infer_speedup_vs_torchvision_best"]["met"]

  monkeypatch.setattr(peer_lib, "run_peer", lambda *a: {
      "available": False, "error": "torch is not installed", "results": {}})
  other = accelerator.new_run(str(tmp_path), 100.0, ["accelerator_check.py"],
                              start=time.monotonic())
  accelerator.peer(other, None, [case, case], steps=1, num_gt=1)
  assert other.result["peer"]["unavailable"] and "torch" in other.result["peer"]["error"]


def test_budget_skips_what_does_not_fit_and_writes_both_outputs(tmp_path):
  run = accelerator.new_run(str(tmp_path / "out"), 20.0, ["check", "--x"],
                            start=time.monotonic())
  assert run.fits("row", "a row", 1.0)
  run.took("row", 30.0)   # now the slowest row does not fit the time left
  assert not run.fits("row", "another row", 1.0)
  assert run.result["skipped"] and run.result["skipped"][0].startswith("another row:")
  run.error("boom")
  run.write(final=True)
  data = json.loads((tmp_path / "out" / budget.RESULTS).read_text())
  assert data["complete"] is False and data["errors"] == ["boom"]
  assert data["command"] == "check --x" and data["targets"] == {}
  summary = (tmp_path / "out" / budget.SUMMARY).read_text()
  assert "## Skipped / errors" in summary and "- error: boom" in summary
  assert "Training step per stage" in summary and "not measured" in summary


def test_config_argv_keeps_only_the_config_arguments():
  argv = ["check.py", "--config", "experiments/voc.py", "--config.model.dtype", "bfloat16",
          "--config.seed=3", "--steps=2", "--output", "out"]
  assert accelerator.config_argv(argv) == [
      "--config", "experiments/voc.py", "--config.model.dtype", "bfloat16", "--config.seed=3"]


def test_exception_of_reports_the_error_instead_of_raising():
  assert budget.exception_of(lambda: None)() is None
  assert budget.exception_of(lambda: 1 / 0)() == "ZeroDivisionError: division by zero"
