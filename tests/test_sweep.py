"""Tests of frcnn_jax/sweep.py: expansion, commands, result gathering."""

import csv
import json
import os
import pathlib
import shlex
import sys

import pytest

from frcnn_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROI_OP = os.path.join(ROOT, "experiments", "ablations", "roi_op.py")


def _write_sweep(tmp_path, points):
  path = tmp_path / "sweep_cfg.py"
  path.write_text(
      "from frcnn_jax.config import defaults\n"
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
  command = sweep.point_command("cfg.py", "runs/x", {"anchors.sizes": (16, 32),
                                                     "model.fc.dim": 64}, ["--config.seed=3"])
  assert command[1:] == ["-m", "frcnn_jax.train", "--config", "cfg.py", "--workdir", "runs/x",
                         "--config.seed=3", "--config.anchors.sizes=(16,32)",
                         "--config.model.fc.dim=64"]


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

  def fake_call(command, log, prefix):
    """Stands in for the subprocesses: what train and evaluate would write."""
    del log, prefix
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

  monkeypatch.setattr(sweep, "run_child", fake_call)
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
  monkeypatch.setattr(sweep, "run_child", lambda c, *_: calls.append(c) or 0)
  assert [r["map"] for r in sweep.run_sweep(PROPOSALS, str(workdir))] == [0.08, 0.16, 0.32,
                                                                          0.64]
  assert [c[2] for c in calls] == ["frcnn_jax.train"]
  capsys.readouterr()


_CHILD = """
import sys
print("W1207 12:00:00.000 1 pipeline.py:1] noise", file=sys.stderr, flush=True)
print("step 1/2 (50%) | total 1.5 | ETA ?", flush=True)
print("eval 1/2 images (50%) | img/s 3", file=sys.stderr, flush=True)
print("eval step 2: voc07 mAP 0.5000 (2 images, 0s)", flush=True)
print("error: something broke", file=sys.stderr, end="", flush=True)
sys.exit(3)
"""


def test_child_progress_lines_reach_the_console_with_the_point_name(tmp_path, capsys):
  log_path = tmp_path / "train.log"
  with open(log_path, "w") as log:
    code = sweep.run_child([sys.executable, "-c", _CHILD], log, "[00-roi_op=roi_pool] ")
  assert code == 3
  shown = capsys.readouterr().out.splitlines()   # stdout and stderr: either may come first
  assert sorted(shown) == sorted(["[00-roi_op=roi_pool] step 1/2 (50%) | total 1.5 | ETA ?",
                   "[00-roi_op=roi_pool] eval 1/2 images (50%) | img/s 3",
                   "[00-roi_op=roi_pool] eval step 2: voc07 mAP 0.5000 (2 images, 0s)",
                   "[00-roi_op=roi_pool] error: something broke"])
  logged = log_path.read_text().splitlines()
  assert len(logged) == 5 and any("noise" in line for line in logged)
  assert "error: something broke" in logged


def test_a_sweep_names_the_running_point_and_its_failure(tmp_path, monkeypatch, capsys):
  def child_command(config_path, workdir, point, extra_args=()):
    del config_path, point, extra_args
    return [sys.executable, "-c", f"print('step 3/3 (100%) | total 0.1 | ETA 00:00'); "
            f"open({os.path.join(workdir, 'ran')!r}, 'w').close()"]

  monkeypatch.setattr(sweep, "point_command", child_command)
  sweep.run_sweep(ROI_OP, str(tmp_path / "sw"))
  out = capsys.readouterr().out
  for name in ("00-roi_op=roi_pool", "01-roi_op=roi_align"):
    assert f"[{name}] step 3/3 (100%)" in out
    assert (tmp_path / "sw" / name / "ran").exists()
    assert "step 3/3" in (tmp_path / "sw" / name / "train.log").read_text()
  monkeypatch.setattr(sweep, "point_command",
                      lambda *a, **k: [sys.executable, "-c", "raise SystemExit('error: bad')"])
  with pytest.raises(RuntimeError, match="sweep point 0 .*exit code 1; see .*train.log"):
    sweep.run_sweep(ROI_OP, str(tmp_path / "sw"))
  assert "[00-roi_op=roi_pool] error: bad" in capsys.readouterr().out
