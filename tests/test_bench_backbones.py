"""scripts/bench_backbones.py end to end at a tiny size: our tiny ZF against torchvision's full
ZF on a 64 x 80 image, timed interleaved, a table and the JSON line. Its library:
tests/benchmarking/test_backbones.py; the peers: tests/benchmarking/test_peer.py."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests import test_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Our side narrow (ZF at 1/16 width, a 16-wide fc head) with few proposals and RoIs; torchvision
# builds its full-width ZF with the same numbers.
TINY = ["model.zf.width=0.0625", "model.fc.dim=16", "rpn.pre_nms_top_n_train=32",
        "rpn.post_nms_top_n_train=16", "rpn.pre_nms_top_n_test=32",
        "rpn.post_nms_top_n_test=8", "rpn.batch_size_per_image=16", "roi.batch_size_per_image=8",
        "test.detections_per_image=5", "data.max_gt=4"]


@pytest.mark.slow
def test_tiny_zf_against_torchvision_prints_the_table_and_json():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=test_benchmark.CHEAP_COMPILE)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_backbones.py"), "--backbones=zf",
       "--height=64", "--width=80", "--steps=1", "--warmup=1",
       *(f"--override={o}" for o in TINY)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  (row,) = json.loads(lines[-1])["rows"]
  assert (row["backbone"], row["height"], row["width"], row["canvas"]) == ("zf", 64, 80,
                                                                          [64, 80])
  assert row["experiment"] == "experiments/voc_zf.py" and row["train_finite"] is True
  for key in ("ours_infer_s", "ours_train_s", "train_gflop_per_image",
              "infer_gflop_per_image"):
    assert math.isfinite(row[key]) and row[key] > 0, key
  assert any(line.startswith("| zf | 64x80 |") for line in lines)
  if importlib.util.find_spec("torchvision") is None:
    assert row["torchvision_infer_s"] is None and "torchvision" in row["peer"]["error"]
    return
  assert row["peer"]["available"] and row["peer"]["threads"] >= 1
  assert row["peer"]["differences"] == ["model.zf.width=0.0625 (torchvision's: 1)"]
  for part in ("infer", "train"):
    assert len(row[f"torchvision_{part}_runs_s"]) == 1
    assert row[f"{part}_ratio"] == pytest.approx(row[f"torchvision_{part}_s"]
                                                 / row[f"ours_{part}_s"])
  assert any("ours differs from torchvision's architecture: model.zf.width" in line
             for line in lines)
