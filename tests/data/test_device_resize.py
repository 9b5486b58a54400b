"""The input pipeline with the device resizing (data.resize_on=device) against the host path."""

import json

import jax
import numpy as np
import pytest

from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.data import canvases as cv
from frcnn_jax.data import eval_loader
from frcnn_jax.data import pipeline
from frcnn_jax.data import transforms
from frcnn_jax.ops import images as image_ops
from tests import mixed_shapes
from tests import test_train

# Landscape 48x64 / portrait 64x48 records, enlarged (x1.5) or shrunk (x2/3) onto two canvases.
ENLARGE = dict(min_size=72, max_size=120, canvases=((72, 96), (96, 72)), max_gt=6)
SHRINK = dict(min_size=32, max_size=48, canvases=((32, 48), (48, 32)), max_gt=6)


def _same_batches(host, device):
  """Every field equal; the device's images, made from the source fields, equal the host's."""
  assert set(device) == set(host) - {"image"} | set(image_ops.SOURCE_KEYS)
  for key in set(host) - {"image"}:
    np.testing.assert_array_equal(device[key], host[key], err_msg=key)
  valid = device["valid"]
  np.testing.assert_array_equal(device["source_hw"][valid], device["orig_hw"][valid])
  assert device["canvas"].shape == host["image"].shape[:3] + (0,)
  assert image_ops.canvas_hw(device) == image_ops.canvas_hw(host)
  np.testing.assert_array_equal(np.asarray(image_ops.batch_images(device)), host["image"])


@pytest.mark.parametrize("sizes", [ENLARGE, SHRINK], ids=["enlarge", "shrink"])
def test_device_training_batches_equal_the_host_batches(sizes):
  source = mixed_shapes.MixedShapes(12)
  args = dict(batch_size=2, seed=5, flip=True, num_workers=0, prefetch=0, **sizes)
  host = pipeline.train_loader(source, **args)
  device = pipeline.train_loader(source, resize_on_device=True, **args)
  assert host.source_canvases is None
  assert device.source_canvases == ((64, 64), (64, 64))   # 48x64 and 64x48, rounded up to 32
  flips = []
  for _ in range(6):
    a, b = next(host), next(device)
    _same_batches(a, b)
    flips += b["flip"].tolist()
  assert any(flips) and not all(flips)


def test_device_eval_batches_equal_the_host_batches_with_padding():
  source = mixed_shapes.MixedShapes(5, "test")
  args = dict(batch_size=2, num_workers=0, **ENLARGE)
  host = list(eval_loader.eval_batches(source, **args))
  device = list(eval_loader.eval_batches(source, resize_on_device=True, **args))
  assert len(host) == len(device) == 3 and not device[1]["valid"].all()   # 3 landscape, 2 portrait
  for a, b in zip(host, device):
    _same_batches(a, b)


def test_proposal_fields_follow_the_boxes_on_either_path():
  example = dict(mixed_shapes.MixedShapes(2)[1])
  example["proposals"] = np.array([[1, 2, 30, 40], [0, 0, 48, 64], [5, 5, 5, 9]], np.float32)
  example["proposals_valid"] = np.array([True, True, True])
  kw = dict(min_size=72, max_size=120, pad_hw=(96, 72), max_gt=6, training=True, flip=True)
  host, _ = transforms.prepare(example, **kw)
  device, _ = transforms.prepare(example, source_canvas=(64, 64), **kw)
  for key in ("proposals", "proposals_valid", "gt_boxes", "image_hw", "scale"):
    np.testing.assert_array_equal(device[key], host[key], err_msg=key)


def test_an_image_larger_than_its_source_canvas_is_named():
  example = mixed_shapes.MixedShapes(1)[0]
  with pytest.raises(ValueError, match=r"larger than its source canvas \(32, 64\).*resize_on"):
    transforms.prepare(example, min_size=72, max_size=120, pad_hw=(72, 96), max_gt=6,
                       training=False, source_canvas=(32, 64))


def test_source_canvases_hold_each_group_rounded_up():
  sizes = np.array([[375, 500], [333, 500], [500, 375], [0, 0], [281, 500]])
  canvas_of = np.array([0, 0, 1, -1, 0])
  assert cv.source_canvases(sizes, canvas_of, 3) == ((384, 512), (512, 384), (32, 32))
  assert cv.source_canvases(sizes, canvas_of, 2, multiple=8) == ((376, 504), (504, 376))


def test_resize_on_and_num_workers_settings():
  config = config_flags.load_config(test_train.SHAPES, {})
  assert jax.default_backend() == "cpu"
  assert not builders.resize_on_device(config)   # auto: the host on the CPU backend
  config.data.resize_on = "device"
  assert builders.resize_on_device(config)
  config.data.resize_on = "gpu"
  with pytest.raises(ValueError, match=r"data\.resize_on' must be one of"):
    builders.resize_on_device(config)
  config.data.resize_on = "auto"
  config.data.num_workers = None
  assert builders.num_workers_from_config(config) == 1   # auto on the CPU backend
  config.data.num_workers = 3
  assert builders.num_workers_from_config(config) == 3
  config.data.num_workers = -1
  with pytest.raises(ValueError, match=r"data\.num_workers' must be >= 0"):
    builders.num_workers_from_config(config)


def test_a_run_resized_on_the_device_trains_and_evaluates_as_the_host_run(tmp_path):
  """End to end: the first step sees the same images, so its losses and gradient norm agree
  to float32 rounding (the two programs fuse differently; later steps may sample other
  anchors on near ties); both runs evaluate every test image."""
  sizes = {"data__min_size": 96, "data__max_size": 96, "data__pad_hw": (96, 96),
           "train__num_steps": 2, "train__checkpoint_every": 2}
  first_step, results = {}, {}
  for where in ("host", "device"):
    config = test_train.tiny_config(data__resize_on=where, **sizes)
    results[where] = test_train.train.train_and_evaluate(config, str(tmp_path / where))
    with open(tmp_path / where / "metrics.jsonl") as f:
      first_step[where] = json.loads(f.readline())
  assert first_step["host"]["step"] == first_step["device"]["step"] == 1
  for key in ("total", "rpn_cls", "rpn_box", "det_cls", "det_box", "grad_norm"):
    assert first_step["device"][key] == pytest.approx(first_step["host"][key], rel=1e-5), key
  for result in results.values():
    with open(result["eval"]["path"]) as f:
      assert result["step"] == 2 and json.load(f)["num_images"] == 4
