"""frcnn_jax.benchmarking.stage_profile: op times from trace events, per-stage summaries."""

import gzip
import json

import pytest

from frcnn_jax.benchmarking import hlo
from frcnn_jax.benchmarking import stage_profile
from tests.benchmarking import test_hlo


def _event(name, ts, dur, pid=1, tid=1, module="jit_step"):
  return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur,
          "args": {"hlo_op": name, "hlo_module": module}}


def test_op_times_are_exclusive_and_prefer_the_device_timeline():
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
  host = [_event("while.4", 0, 100), _event("sort.2", 10, 30), _event("exp_fusion", 50, 20),
          _event("dot_fusion", 200, 50), _event("other_module_op", 0, 999, module="jit_x")]
  times, busy, timeline = stage_profile.op_times(meta + host)
  assert timeline == "host"
  assert times == pytest.approx({"while.4": 50e-6, "sort.2": 30e-6, "exp_fusion": 20e-6,
                                 "dot_fusion": 50e-6})
  assert busy == pytest.approx(150e-6)
  device = [_event("dot_fusion", 0, 40, pid=2, tid=7), _event("gemm.1", 30, 20, pid=2, tid=8)]
  times, busy, timeline = stage_profile.op_times(meta + host + device)
  assert timeline == "device"
  assert times == pytest.approx({"dot_fusion": 40e-6, "gemm.1": 20e-6})
  assert busy == pytest.approx(50e-6)   # overlapping streams counted once
  assert stage_profile.op_times(meta) == ({}, 0.0, "host")


def test_trace_events_load_from_either_json_layout(tmp_path):
  events = [_event("a", 0, 1)]
  for i, data in enumerate(({"traceEvents": events}, events)):
    path = tmp_path / f"trace{i}.json.gz"
    with gzip.open(path, "wt") as f:
      json.dump(data, f)
    assert stage_profile.load_trace_events(str(path)) == events


def test_stage_summary_per_step_and_worst_non_matmul_share():
  ops = hlo.hlo_ops(test_hlo.HLO)
  times = {"dot_fusion": 0.6, "exp_fusion": 0.2, "sort.2": 0.1, "conv.5": 0.1}
  summary = stage_profile.stage_summary(times, ops, steps=2)
  stages = summary["stages"]
  assert summary["op_seconds_per_step"] == pytest.approx(0.5)
  assert stages["trunk"]["matmul_s"] == pytest.approx(0.3)
  assert stages["proposals_nms"]["other_fraction"] == pytest.approx(0.2)
  assert stages["unscoped_matmul"]["s"] == pytest.approx(0.05)
  assert list(stages)[0] == "trunk"   # largest first
  assert summary["top_ops"][0]["hlo_op"] == "dot_fusion"
  assert stage_profile.worst_non_matmul({**summary, "idle_fraction": 0.1}) == (
      "proposals_nms (non-matmul)", pytest.approx(0.2))
  assert stage_profile.worst_non_matmul({**summary, "idle_fraction": 0.3})[1] == pytest.approx(0.3)
  brief = stage_profile.brief(summary)
  assert "top_ops" not in brief and brief["stages"]["trunk"] == pytest.approx(0.6)
