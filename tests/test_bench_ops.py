"""scripts/bench_ops.py end to end: every op timed, torchvision's kernels beside them when
installed (else said why), and the reference-revision comparison."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"nms_2000", "nms_6000", "nms_12000", "nms_train_2x12000_to_2000",
         "nms_test_6000_to_300", "batched_nms_6000_to_100", "roi_align_128", "roi_pool_128",
         "roi_align_300", "roi_pool_300", "roi_align_128_grad", "roi_pool_128_grad"}


def _has_torchvision() -> bool:
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    return False
  try:
    import torchvision.ops  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except (ImportError, RuntimeError):
    return False
  return True


@pytest.mark.slow
def test_bench_ops_times_every_op_beside_torchvision():
  reference = os.path.join(ROOT, "frcnn_jax", "ops", "nms.py")   # a file: no git needed
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_ops.py"), "--repeats=1",
       f"--compare_ref={reference}"],
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300,
      check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result["ms"]) == NAMES and all(ms > 0 for ms in result["ms"].values())
  nms_names = {name for name in NAMES if "nms" in name}
  assert set(result["compare_ref"]) == nms_names | {"rev", "load_avg_1min_end"}
  if _has_torchvision():
    assert set(result["torchvision_ms"]) == NAMES and set(result["ratio_to_torchvision"]) == NAMES
    assert result["nms_agrees_with_torchvision"] == {name: True for name in nms_names}
    assert "threads" in result["torchvision"]
  else:
    assert "torch" in result["torchvision"]["unavailable"]
    assert result["torchvision_ms"] == {} and result["nms_agrees_with_torchvision"] == {}


@pytest.mark.parametrize("args, message", [
    (["--repeats=0"], "--repeats must be >= 1"),
    (["--compare_ref=no-such-revision"], "--compare_ref no-such-revision: no such file"),
])
def test_bad_arguments_are_usage_errors(args, message):
  done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_ops.py"), *args],
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
