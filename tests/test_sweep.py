"""Tests of frcnn_jax/sweep.py: expansion, commands, result gathering."""

import csv
import json
import os
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
