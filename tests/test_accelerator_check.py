"""scripts/accelerator_check.py as a command: rows, profile and summary of a tiny run (ZF), the
budget kept, earlier results kept, the determinism child's row (ResNet C4). Its library:
tests/benchmarking/test_accelerator.py and the HLO / trace tests beside it."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests import test_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "accelerator_check.py")
# A tiny detector on 64 x 64 canvases; the XLA flags only make its compile cheap.
CHECK_ARGS = ["--sizes=64x64", "--batch=1", "--profile_batch=1", "--profile_steps=2", "--steps=1",
              "--peak_size=256", "--nopeer", "--nodeterministic"]
TINY_ARGS = [*CHECK_ARGS, *test_benchmark.TINY_BACKBONES["vgg16"]]
CHEAP_COMPILE = test_benchmark.CHEAP_COMPILE


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=CHEAP_COMPILE, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_tiny_run_writes_rows_profile_and_summary(tmp_path):
  out = tmp_path / "out"
  zf_args = [*CHECK_ARGS, *test_benchmark.TINY_BACKBONES["zf"]]   # a backbone besides VGG16
  result = _run([*zf_args, "--dtype=bfloat16", "--batch=1,2", "--profile_batch=2",
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


def test_the_determinism_child_prints_one_row():
  c4_args = [*CHECK_ARGS, *test_benchmark.TINY_BACKBONES["resnet_c4"]]   # ResNet C4 + res5
  result = _run([*c4_args, "--child_case=float32:64x64:1", "--compilation_cache="],
                timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = [l for l in result.stdout.splitlines() if l.startswith("CHILD_ROW ")]
  row = json.loads(line[len("CHILD_ROW "):])
  assert (row["dtype"], row["height"], row["width"], row["batch"]) == ("float32", 64, 64, 1)
  assert row["train_step_s"] > 0 and row["infer_s"] > 0 and row["train_finite"] is True
