"""Tests of frcnn_jax/sweep.py: expansion, commands, result gathering."""

import csv
import json
import os
import pathlib
import shlex

import pytest

from frcnn_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROI_OP = os.path.join(ROOT, "experiments", "ablations", "roi_op.py")


def _write_sweep(tmp_path, points):
  path = tmp_path / "sweep_cfg.py"
  path.write_text(
      "from frcnn_jax import defaults\n"
      "def get_config():\n  return defaults.get_config()\n"
      f"def get_sweep():\n  return {points!r}\n")
  return str(path)


def test_ablation_files_expand():
  points = sweep.load_sweep(ROI_OP)
  assert points == [{"model.roi_op": "roi_pool"}, {"model.roi_op": "roi_align"}]
  assert [sweep.point_name(i, p) for i, p in enumerate(points)] == [
      "00-roi_op=roi_pool", "01-roi_op=roi_align"]


def test_bad_points_are_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"point 1 .*unknown config key 'train.stepz'"):
    sweep.load_sweep(_write_sweep(tmp_path, [{"train.num_steps": 3}, {"train.stepz": 1}]))
  with pytest.raises(ValueError, match="no points"):
    sweep.load_sweep(_write_sweep(tmp_path, []))
  with pytest.raises(ValueError, match="get_sweep"):
    sweep.load_sweep(os.path.join(ROOT, "experiments", "shapes.py"))


def test_point_command_round_trips_tuples():
  command = sweep.point_command("cfg.py", "runs/x", {"model.anchor_sizes": (16, 32),
                                                     "model.fc_dim": 64}, ["--config.seed=3"])
  assert command[1:] == ["-m", "frcnn_jax.train", "--config", "cfg.py", "--workdir", "runs/x",
                         "--config.seed=3", "--config.model.anchor_sizes=(16,32)",
                         "--config.model.fc_dim=64"]


def test_print_only_prints_one_command_per_point(tmp_path, capsys):
  sweep.run_sweep(ROI_OP, str(tmp_path / "sw"), print_only=True)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  assert shlex.split(lines[1])[-1] == "--config.model.roi_op=roi_align"
  assert not os.path.exists(tmp_path / "sw" / "01-roi_op=roi_align")


def test_gather_builds_markdown_and_csv(tmp_path):
  workdir = tmp_path / "sw"
  points = sweep.load_sweep(ROI_OP)
  run = workdir / sweep.point_name(0, points[0])
  (run / "eval").mkdir(parents=True)
  (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "total": 1.5}) + "\n" +
                                     json.dumps({"step": 20, "total": 0.5}) + "\n")
  (run / "eval" / "test-20.json").write_text(json.dumps({"map": 0.75, "step": 20}))
  rows = sweep.run_sweep(ROI_OP, str(workdir), gather_only=True)
  assert rows[0]["map"] == 0.75 and rows[0]["total"] == 0.5 and rows[0]["step"] == 20
  assert rows[1]["map"] == ""
  with open(workdir / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert table[0]["model.roi_op"] == "roi_pool" and table[0]["map"] == "0.75"
  markdown = (workdir / "results.md").read_text()
  assert "| 00-roi_op=roi_pool | roi_pool | 20 | 0.7500 | 0.5000 |" in markdown


PROPOSALS = os.path.join(ROOT, "experiments", "ablations", "proposals.py")


def test_print_only_creates_no_folder(tmp_path, capsys):
  sweep.run_sweep(ROI_OP, str(tmp_path / "sw"), print_only=True)
  sweep.run_sweep(PROPOSALS, str(tmp_path / "sw2"), print_only=True)
  assert capsys.readouterr().out
  assert not (tmp_path / "sw").exists() and not (tmp_path / "sw2").exists()


def test_gather_only_with_nothing_trained_says_so(tmp_path):
  for path in (ROI_OP, PROPOSALS):
    with pytest.raises(RuntimeError, match="nothing to gather"):
      sweep.run_sweep(path, str(tmp_path / "sw"), gather_only=True)
  assert not (tmp_path / "sw").exists()


def test_only_test_time_sweeps_share_one_model():
  assert sweep.is_test_time(sweep.load_sweep(PROPOSALS))
  assert not sweep.is_test_time(sweep.load_sweep(ROI_OP))
  assert not sweep.is_test_time([{"rpn.post_nms_top_n_test": 8, "train.num_steps": 3}])


def test_test_time_sweep_trains_once_and_evaluates_each_point(tmp_path, monkeypatch, capsys):
  from frcnn_jax.config import flags as config_flags  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "sw"
  calls = []

  def fake_call(command, stdout=None, stderr=None):
    """Stands in for the subprocesses: what train and evaluate would write."""
    del stdout, stderr
    calls.append(command)
    run = pathlib.Path(command[command.index("--workdir") + 1])
    if command[2] == "frcnn_jax.train":
      config = config_flags.load_config(PROPOSALS)
      (run / "config.json").write_text(config.to_json_best_effort())
      (run / "metrics.jsonl").write_text(json.dumps({"step": 20, "total": 0.5}) + "\n")
      (run / "eval").mkdir()
      (run / "eval" / "test-20.json").write_text(json.dumps({"map": 0.64, "step": 20}))
    else:
      key, value = command[-1][len("--config."):].split("=")
      report = {"map": int(value) / 100, "step": 20, "overrides": {key: int(value)}}
      (run / "eval" / f"test-20-{key}={value}.json").write_text(json.dumps(report))
    return 0

  monkeypatch.setattr(sweep.subprocess, "call", fake_call)
  rows = sweep.run_sweep(PROPOSALS, str(workdir))
  kinds = [c[2] for c in calls]
  # shapes trains with 64 test proposals: that point is the training run's own evaluation.
  assert kinds == ["frcnn_jax.train"] + ["frcnn_jax.evaluate"] * 3
  assert [c[-1] for c in calls[1:]] == [f"--config.rpn.post_nms_top_n_test={n}"
                                        for n in (8, 16, 32)]
  assert [r["map"] for r in rows] == [0.08, 0.16, 0.32, 0.64]
  assert all(r["step"] == 20 and r["total"] == 0.5 for r in rows)
  # Run again: nothing is trained or evaluated twice (train resumes by itself: one call).
  calls.clear()
  monkeypatch.setattr(sweep.subprocess, "call", lambda c, **_: calls.append(c) or 0)
  assert [r["map"] for r in sweep.run_sweep(PROPOSALS, str(workdir))] == [0.08, 0.16, 0.32,
                                                                          0.64]
  assert [c[2] for c in calls] == ["frcnn_jax.train"]
  capsys.readouterr()
