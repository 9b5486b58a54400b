"""scripts/bench_conv.py end to end at a tiny size: every part runs and prints its table; its
VGG16-only parts name another backbone instead of crashing."""

import os
import subprocess
import sys

import jax
import pytest

from frcnn_jax.benchmarking import backbones
from frcnn_jax.benchmarking import conv_pool
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models import faster_rcnn
from tests import test_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_conv_runs_every_part():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=test_benchmark.CHEAP_COMPILE)
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_conv.py"),
       f"--config={test_benchmark.SHAPES}", "--height=64", "--width=96", "--repeats=1",
       "--steps=1", "--parts=layers,pointwise,pool,train,train_pool",
       *test_benchmark.TINY_MODEL_ARGS],
      capture_output=True, text=True, env=env, timeout=600, check=True).stdout
  # The shapes config's own layers: one conv per block, nothing frozen, stride 8 (no pool4),
  # so conv5_1 and the RPN conv share a shape.
  layers = [line.split()[0] for line in out.splitlines() if line.startswith(("conv", "pool"))]
  assert layers[:4] == ["conv1_1", "conv2_1", "conv3_1", "conv4_1"], out
  assert "conv5_1, rpn" in out and "pool3" in out and "pool4" not in out
  assert "ratio xla / per_tap" in out and "ratio lax / pool" in out
  assert "ratio = lax / matmul" in out and "1x8x12" in out   # the RPN's 1x1 convs at stride 8


def test_the_vgg16_parts_name_another_backbone_instead_of_crashing():
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "voc_zf.py"))
  reason = conv_pool.vgg16_only(config)
  assert reason.startswith("model.backbone=zf: ") and "--parts train" in reason
  for measure in (conv_pool.layer_shapes, conv_pool.pooled_shapes):
    with pytest.raises(ValueError, match="model.backbone=zf"):
      measure(config, 64, 96)
  assert conv_pool.vgg16_only(config_flags.load_config(test_benchmark.SHAPES)) is None


def test_pointwise_shapes_record_every_1x1_convolution_of_the_step():
  """Each 1x1 kernel of a tiny ResNet C4 (trunk, res5 head, RPN) runs once per loss."""
  args = test_benchmark.TINY_BACKBONES["resnet_c4"]
  overrides = dict(backbones.parse_override(a.removeprefix("--config.")) for a in args[1:])
  config = config_flags.load_config(args[0].split("=", 1)[1], overrides)
  rows = conv_pool.pointwise_shapes(config, 64, 96)
  params = jax.eval_shape(lambda k: faster_rcnn.init_params(conv_pool.model_of(config), k),
                          jax.random.key(0))
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == "kernel" and leaf.shape[:2] == (1, 1)]
  assert sum(r["count"] for r in rows) == len(kernels) == 14
  rois = int(config.roi.batch_size_per_image)
  assert {"x": (rois, 14, 14, 32), "cout": 64, "strides": (2, 2), "count": 1} in rows   # res5
  assert {"x": (1, 16, 24, 2), "cout": 8, "strides": (1, 1), "count": 2} in rows   # layer1.0
