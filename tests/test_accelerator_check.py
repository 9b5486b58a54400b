"""Tests of scripts/accelerator_check.py: trace and HLO parsing, and the script end to end."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests import test_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "accelerator_check.py")
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")
# A tiny detector on 64 x 64 canvases; the XLA flags only make its compile cheap.
TINY_ARGS = [
    f"--config={SHAPES}", "--sizes=64x64", "--batch=1", "--profile_batch=1",
    "--profile_steps=2", "--steps=1", "--peak_size=256", "--nopeer", "--nodeterministic",
    *test_benchmark.TINY_MODEL_ARGS,
]
CHEAP_COMPILE = test_benchmark.CHEAP_COMPILE


def _load_script():
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


check = _load_script()


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=CHEAP_COMPILE, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def test_content_hw_is_the_largest_voc_shape_in_the_canvas():
  assert check.content_hw(608, 800, 600) == (600, 800)     # 4:3 landscape
  assert check.content_hw(800, 608, 600) == (800, 600)     # portrait
  assert check.content_hw(608, 928, 600) == (600, 900)     # 3:2
  assert check.content_hw(1000, 1000, 600) == (600, 900)   # the old square canvas
  assert check.content_hw(64, 64, 600) == (64, 64)         # too small for either aspect
  assert check.content_hw(64, 96, 600) == (64, 96)         # 3:2 fits exactly


HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0: f32[4,4], param_1: f32[4,4]) -> f32[4,4] {
  %param_0 = f32[4,4]{1,0} parameter(0)
  %param_1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(loss)/trunk/conv1_1/dot_general"}
}

%fused_computation.2 (param_0.1: f32[4,4]) -> f32[4,4] {
  %param_0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %exp.1 = f32[4,4]{1,0} exponential(%param_0.1), metadata={op_name="jit(step)/jvp(loss)/proposals/exp"}
}

%body.3 (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]{1,0}) parameter(0)
  %gte.1 = f32[4,4]{1,0} get-tuple-element(%p), index=1
  %sort.2 = f32[4,4]{1,0} sort(%gte.1), dimensions={1}, to_apply=%cmp, metadata={op_name="jit(step)/transpose(jvp(loss))/roi_sampling/sort"}
  ROOT %tuple.1 = (s32[], f32[4,4]{1,0}) tuple(%gte.1, %sort.2)
}

ENTRY %main.9 (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %dot_fusion = f32[4,4]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_computation.1
  %exp_fusion = f32[4,4]{1,0} fusion(%dot_fusion), kind=kLoop, calls=%fused_computation.2
  %gemm.1 = (f32[4,4]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/FasterRCNN.roi_head/head/fc6/dot_general"}
  %while.4 = (s32[], f32[4,4]{1,0}) while(%t), condition=%cond.3, body=%body.3
  %conv.5 = f32[4,4]{1,0} convolution(%a, %b), window={size=1x1}, dim_labels=b01f_01io->b01f
  ROOT %add.6 = f32[4,4]{1,0} add(%exp_fusion, %a), metadata={op_name="jit(step)/optimizer/add"}
}
"""


def test_hlo_ops_finds_scopes_and_matmuls_through_fusions_and_custom_calls():
  ops = check.hlo_ops(HLO)
  assert ops["dot_fusion"]["matmul"] and "trunk" in ops["dot_fusion"]["op_name"]
  assert not ops["exp_fusion"]["matmul"]
  assert check.stage_of(ops["exp_fusion"]["op_name"]) == "proposals_nms"
  assert ops["gemm.1"]["matmul"] and check.stage_of(ops["gemm.1"]["op_name"]) == "roi_head"
  assert ops["conv.5"]["matmul"] and ops["conv.5"]["op_name"] == ""
  assert not ops["add.6"]["matmul"] and check.stage_of(ops["add.6"]["op_name"]) == "optimizer"
  assert check.stage_of(ops["sort.2"]["op_name"]) == "roi_sampling"
  assert ops["sort.2"]["computation"] == "body.3"


@pytest.mark.parametrize("op_name, stage", [
    ("jit(step_fn)/transpose(jvp(jit(loss_fn)))/FasterRCNN.features_and_rpn/trunk/conv2_1/rev",
     "trunk"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.features_and_rpn/rpn/conv/add", "rpn_head"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.roi_head/head/vmap(head._roi_features)/gather",
     "roi_ops"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.roi_head/head/fc7/dot_general", "roi_head"),
    ("jit(step_fn)/jvp(jit(loss_fn))/proposals/vmap()/while/body/sort", "proposals_nms"),
    ("jit(step_fn)/jvp(jit(loss_fn))/rpn_targets/vmap()/max", "rpn_targets"),
    ("jit(step_fn)/transpose(jvp(jit(loss_fn)))/losses/vmap()/mul", "losses"),
    ("jit(step_fn)/optimizer/mul", "optimizer"),
    ("jit(step_fn)/jvp(jit(loss_fn))/input_resize/jit(resize_flip_pad)/vmap()/dot_general",
     "input_resize"),
    ("jit(step_fn)/jit(_where)/select_n", "other"),
    ("", "other"),
])
def test_stage_of(op_name, stage):
  assert check.stage_of(op_name) == stage


def _event(name, ts, dur, pid=1, tid=1, module="jit_step"):
  return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur,
          "args": {"hlo_op": name, "hlo_module": module}}


def test_op_times_are_exclusive_and_prefer_the_device_timeline():
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
  host = [_event("while.4", 0, 100), _event("sort.2", 10, 30), _event("exp_fusion", 50, 20),
          _event("dot_fusion", 200, 50), _event("other_module_op", 0, 999, module="jit_x")]
  times, busy, timeline = check.op_times(meta + host)
  assert timeline == "host"
  assert times == pytest.approx({"while.4": 50e-6, "sort.2": 30e-6, "exp_fusion": 20e-6,
                                 "dot_fusion": 50e-6})
  assert busy == pytest.approx(150e-6)
  device = [_event("dot_fusion", 0, 40, pid=2, tid=7), _event("gemm.1", 30, 20, pid=2, tid=8)]
  times, busy, timeline = check.op_times(meta + host + device)
  assert timeline == "device"
  assert times == pytest.approx({"dot_fusion": 40e-6, "gemm.1": 20e-6})
  assert busy == pytest.approx(50e-6)   # overlapping streams counted once


def test_stage_summary_per_step_and_worst_non_matmul_share():
  ops = check.hlo_ops(HLO)
  times = {"dot_fusion": 0.6, "exp_fusion": 0.2, "sort.2": 0.1, "conv.5": 0.1}
  summary = check.stage_summary(times, ops, steps=2)
  stages = summary["stages"]
  assert summary["op_seconds_per_step"] == pytest.approx(0.5)
  assert stages["trunk"]["matmul_s"] == pytest.approx(0.3)
  assert stages["proposals_nms"]["other_fraction"] == pytest.approx(0.2)
  assert stages["unscoped_matmul"]["s"] == pytest.approx(0.05)
  assert check.worst_non_matmul({**summary, "idle_fraction": 0.1}) == (
      "proposals_nms (non-matmul)", pytest.approx(0.2))
  assert check.worst_non_matmul({**summary, "idle_fraction": 0.3})[1] == pytest.approx(0.3)


def test_tiny_run_writes_rows_profile_and_summary(tmp_path):
  out = tmp_path / "out"
  result = _run([*TINY_ARGS, "--dtype=bfloat16", "--batch=1,2", "--profile_batch=2",
                 f"--output={out}", "--budget_s=240",
                 f"--compilation_cache={tmp_path / 'cache'}"], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["results.json", "summary.md", "train_step_trace.json.gz"]
  data = json.loads((out / "results.json").read_text())
  assert data["complete"], (data["skipped"], data["errors"])
  # The profiled batch first, then its profile, then the other batches.
  assert [r["batch"] for r in data["rows"]] == [2, 1] and data["profile"]["batch"] == 2
  lines = result.stdout.splitlines()
  order = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in
           ("row bfloat16 64x64 batch 2", "profile: ", "row bfloat16 64x64 batch 1")]
  assert order == sorted(order), lines
  row = data["rows"][0]
  assert row["dtype"] == "bfloat16" and row["train_finite"]
  assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0
  assert 0 < row["train_mfu_content"] <= row["train_mfu"]
  profile = data["profile"]
  assert profile["source"] == "trace" and profile["timeline"] == "host"
  stages = profile["stages"]
  for stage in ("trunk", "proposals_nms", "rpn_targets", "roi_sampling", "roi_ops", "losses",
                "optimizer"):
    assert stages[stage]["s"] > 0, stage
  assert sum(s["fraction"] for s in stages.values()) == pytest.approx(1.0)
  assert stages["trunk"]["matmul_s"] > 0
  # The traced ops cover the step: busy time is a real part of the wall time.
  assert 0.2 * profile["wall_step_s"] < profile["device_busy_s"] < 3 * profile["wall_step_s"]
  assert "largest_non_matmul_share" in data["targets"]
  summary = (out / "summary.md").read_text()
  assert "jax 0." in summary and "| trunk |" in summary and "cpu:cpu" in summary


def test_budget_is_kept_with_partial_outputs(tmp_path):
  out = tmp_path / "out"
  start = time.monotonic()
  result = _run([*TINY_ARGS, "--dtype=float32,bfloat16", "--batch=1,2,4", f"--output={out}",
                 "--budget_s=15", "--compilation_cache="], timeout=120)
  took = time.monotonic() - start
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((out / "results.json").read_text())
  assert not data["complete"]
  assert data["skipped"] or any("watchdog" in e for e in data["errors"])
  assert data["elapsed_s"] <= 15 + 3   # the watchdog fires 3 s early; slack for a loaded CPU
  assert took < 15 + 5   # the interpreter's start (the budget counts from the imports)
  assert (out / "summary.md").exists()


def test_earlier_results_are_kept_unless_asked(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text("{}")
  result = _run([*TINY_ARGS, f"--output={out}", "--budget_s=15"], timeout=120)
  assert result.returncode != 0
  assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
  assert (out / "results.json").read_text() == "{}"


def test_peer_figures_are_merged_into_the_rows(tmp_path, monkeypatch):
  run = check.Run(str(tmp_path), 100.0, ["accelerator_check.py"], start=time.monotonic())
  row = {"dtype": "bfloat16", "height": 608, "width": 800, "batch": 2, "num_devices": 1,
         "train_step_s": 0.01, "infer_s": 0.005}
  run.result["rows"].append(row)
  calls = []

  def fake_run_peer(cases, config, steps, num_gt):
    del config, steps, num_gt
    calls.append(cases)
    (c,) = cases
    return {"available": True, "results": {(c.dtype, c.height, c.width, c.batch): {
        "train_step_s": 0.04, "infer_s": 0.02}}}

  monkeypatch.setattr(check.benchmark, "run_peer", fake_run_peer)
  monkeypatch.setattr(check.Run, "write", lambda self, final=False: None)
  case = check.benchmark.Case("bfloat16", 608, 800, 2, 300, ("train", "infer"))
  check.peer(run, None, [case, case], steps=1, num_gt=1)
  assert len(calls) == 1   # the same case is measured once
  assert row["infer_speedup_vs_peer"] == pytest.approx(4.0)
  assert row["train_speedup_vs_peer"] == pytest.approx(4.0)
  check._evaluate_targets(run.result)  # pylint: disable=protected-access
  assert run.result["targets"]["infer_speedup_vs_torchvision_best"]["met"]

  monkeypatch.setattr(check.benchmark, "run_peer", lambda *a: {
      "available": False, "error": "torch is not installed", "results": {}})
  other = check.Run(str(tmp_path), 100.0, ["accelerator_check.py"], start=time.monotonic())
  check.peer(other, None, [case, case], steps=1, num_gt=1)
  assert other.result["peer"]["unavailable"] and "torch" in other.result["peer"]["error"]
