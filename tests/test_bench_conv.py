"""scripts/bench_conv.py end to end at a tiny size: every part runs and prints its table; its
VGG16-only parts name another backbone instead of crashing."""

import os
import subprocess
import sys

import pytest

from frcnn_jax.benchmarking import conv_pool
from frcnn_jax.config import flags as config_flags
from tests import test_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_conv_runs_every_part():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=test_benchmark.CHEAP_COMPILE)
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_conv.py"),
       f"--config={test_benchmark.SHAPES}", "--height=64", "--width=96", "--repeats=1",
       "--steps=1", "--parts=layers,pool,train,train_pool", *test_benchmark.TINY_MODEL_ARGS],
      capture_output=True, text=True, env=env, timeout=600, check=True).stdout
  # The shapes config's own layers: one conv per block, nothing frozen, stride 8 (no pool4),
  # so conv5_1 and the RPN conv share a shape.
  layers = [line.split()[0] for line in out.splitlines() if line.startswith(("conv", "pool"))]
  assert layers[:4] == ["conv1_1", "conv2_1", "conv3_1", "conv4_1"], out
  assert "conv5_1, rpn" in out and "pool3" in out and "pool4" not in out
  assert "ratio xla / per_tap" in out and "ratio lax / pool" in out


def test_the_vgg16_parts_name_another_backbone_instead_of_crashing():
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "voc_zf.py"))
  reason = conv_pool.vgg16_only(config)
  assert reason.startswith("model.backbone=zf: ") and "--parts train" in reason
  for measure in (conv_pool.layer_shapes, conv_pool.pooled_shapes):
    with pytest.raises(ValueError, match="model.backbone=zf"):
      measure(config, 64, 96)
  assert conv_pool.vgg16_only(config_flags.load_config(test_benchmark.SHAPES)) is None
