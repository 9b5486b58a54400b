"""The py-faster-rcnn fidelity options through config, builders and detector: anchor_style,
pool_ceil_mode, roi_pool_coordinates, legacy_plus_one, test.min_size (the ops are tested in
tests/ops and tests/models)."""

import jax
import numpy as np
import pytest

from frcnn_jax.config import build as builders
from frcnn_jax.config import defaults
from frcnn_jax.config import flags as config_flags
from frcnn_jax.detection import detector
from frcnn_jax.ops import anchors as anchor_ops
from tests.models import tiny


def _py_faster_rcnn_config():
  config = defaults.get_config()
  config.anchors.style = "py-faster-rcnn"
  config.model.vgg16.pool_ceil_mode = True
  config.model.roi_pool_coordinates = "caffe"
  config.model.legacy_plus_one = True
  config.test.min_size = 0.0
  return config


def test_builders_map_the_options():
  config = _py_faster_rcnn_config()
  defaults.validate(config)
  model = builders.model_from_config(config, num_classes=20)
  assert model.trunk.pool_ceil_mode and model.head.pooler.pool_coordinates == "caffe"
  settings = builders.detector_settings_from_config(config)
  assert settings.anchors.style == "py-faster-rcnn" and settings.test.min_size == 0.0
  assert settings.legacy_plus_one
  default = defaults.get_config()
  assert not builders.model_from_config(default, 20).trunk.pool_ceil_mode
  assert builders.model_from_config(default, 20).head.pooler.pool_coordinates == "torchvision"
  assert builders.detector_settings_from_config(default).anchors.style == "exact"
  assert builders.detector_settings_from_config(default).test.min_size == 0.01
  assert not builders.detector_settings_from_config(default).legacy_plus_one


@pytest.mark.parametrize("key,value,build", [
    ("anchors.style", "detectron", builders.detector_settings_from_config),
    ("model.roi_pool_coordinates", "inclusive",
     lambda c: builders.model_from_config(c, num_classes=20))])
def test_bad_choices_are_errors_naming_the_key(key, value, build):
  config = defaults.get_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(config_flags.ConfigError, match=key.replace(".", r"\.")):
    defaults.validate(config)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    build(config)


def test_negative_test_min_size_is_an_error():
  config = defaults.get_config()
  config.test.min_size = -1.0
  with pytest.raises(ValueError, match=r"test\.min_size"):
    builders.detector_settings_from_config(config)


def test_detector_runs_on_the_ceil_mode_grid():
  # A 72 x 88 canvas: conv5 is 4 x 5 cells in floor mode, 5 x 6 in ceil mode; the anchors,
  # RPN outputs and proposals all use the real feature size.
  model = tiny.model(pool_ceil_mode=True, roi_pool_coordinates="caffe")
  settings = tiny.settings(
      anchor_sizes=(16.0, 32.0), anchor_style="py-faster-rcnn", rpn_pre_nms_top_n_train=60,
      rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20,
      rpn_min_size=0.0, rpn_batch_size_per_image=16, roi_batch_size_per_image=8,
      test_detections_per_image=5, test_score_threshold=0.0, legacy_plus_one=True)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (1, 72, 88, 3), dtype=np.uint8),
           "image_hw": np.asarray([[70, 50]], np.int32), "scale": np.ones(1, np.float32),
           "gt_boxes": np.asarray([[[4, 6, 30, 40]]], np.float32),
           "gt_labels": np.ones((1, 1), np.int32), "gt_valid": np.ones((1, 1), bool)}
  params = tiny.numpy_params(model)
  features, logits, _ = model.apply({"params": params}, batch["image"], batch["image_hw"],
                                    method=type(model).features_and_rpn)
  assert features.shape[1:3] == (5, 6)
  anchors = anchor_ops.anchor_grid(5, 6, 16, (16.0, 32.0), (0.5, 1.0, 2.0), "py-faster-rcnn")
  assert logits.shape[1] == len(anchors)
  props = jax.device_get(detector.proposals(params, batch, model=model, settings=settings))
  boxes = props["boxes"][0][props["valid"][0]]
  assert len(boxes) > 0 and np.all(boxes[:, 2] <= 50) and np.all(boxes[:, 3] <= 70)
  total, terms = detector.loss_fn(params, batch, jax.random.key(0), model=model,
                                  settings=settings)
  assert np.isfinite(float(total)) and float(terms["rpn_positives"]) > 0
  out = jax.device_get(detector.predict(params, batch, model=model, settings=settings))
  assert out["boxes"].shape == (1, 5, 4)
