"""Tests for frcnn_jax/models/faster_rcnn.py (load_pretrained: tests/test_convert_vgg16.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models import faster_rcnn
from tests.models import tiny


def _images():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
  return images, np.asarray([[8, 6], [5, 4]], np.int32)


@pytest.mark.parametrize("input_norm", faster_rcnn.INPUT_NORMS)
def test_normalize_images(input_norm):
  images, image_hw = _images()
  out = np.asarray(faster_rcnn.normalize_images(jnp.asarray(images), jnp.asarray(image_hw),
                                                input_norm))
  x = images.astype(np.float64)
  if input_norm == "caffe":
    expected = x[..., ::-1] - np.asarray([102.9801, 115.9465, 122.7717])
  elif input_norm == "keras":
    expected = x[..., ::-1] - np.asarray([103.939, 116.779, 123.68])
  else:
    expected = (x / 255 - np.asarray([0.485, 0.456, 0.406])) / np.asarray([0.229, 0.224, 0.225])
  expected[1, 5:] = 0.0
  expected[1, :, 4:] = 0.0
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_unknown_input_norm_is_an_error():
  images, image_hw = _images()
  with pytest.raises(ValueError, match="input_norm"):
    faster_rcnn.normalize_images(jnp.asarray(images), jnp.asarray(image_hw), "rgb")


def test_init_params_creates_every_parameter():
  model = tiny.model(num_classes=3)
  params = faster_rcnn.init_params(model, jax.random.key(0))
  assert sorted(params) == ["head", "rpn", "trunk"]
  assert sorted(params["head"]) == ["box", "cls", "fc6", "fc7"]
  assert sorted(params["rpn"]) == ["conv", "deltas", "objectness"]
  assert len(params["trunk"]) == 5
  shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype),
                                  tiny.numpy_params(model))
  assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params) == shapes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_methods_give_shapes_and_float32_params(dtype):
  model = tiny.model(num_classes=3, dtype=dtype)
  shapes = jax.eval_shape(lambda k: faster_rcnn.init_params(model, k), jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  params = tiny.numpy_params(model)
  images = jnp.zeros((2, 64, 80, 3), jnp.uint8)
  image_hw = jnp.asarray([[64, 80], [50, 70]], jnp.int32)
  rois = jnp.tile(jnp.asarray([[0.0, 0.0, 32.0, 32.0]]), (2, 7, 1))
  run = jax.jit(lambda p: model.apply({"params": p}, images, image_hw, rois))
  features, _, _ = jax.eval_shape(lambda p: model.apply(
      {"params": p}, images, image_hw, method=faster_rcnn.FasterRCNN.features_and_rpn), params)
  assert features.shape == (2, 4, 5, 32) and features.dtype == dtype
  logits, deltas, class_logits, box_deltas = run(params)
  assert logits.shape == (2, 4 * 5 * 6, 2) and logits.dtype == jnp.float32
  assert deltas.shape == (2, 4 * 5 * 6, 4) and deltas.dtype == jnp.float32
  assert np.isfinite(np.asarray(class_logits)).all()
  assert class_logits.shape == (2, 7, 4) and class_logits.dtype == jnp.float32
  assert box_deltas.shape == (2, 7, 4, 4) and box_deltas.dtype == jnp.float32


def test_trainable_mask_uses_the_models_frozen_blocks():
  model = tiny.model(frozen_blocks=1)
  params = tiny.numpy_params(model)
  mask = faster_rcnn.trainable_mask(model, params)
  frozen = {name for name, m in mask["trunk"].items() if not any(jax.tree_util.tree_leaves(m))}
  assert frozen == {"conv1_1"}
  assert all(jax.tree_util.tree_leaves(mask["rpn"])) and all(jax.tree_util.tree_leaves(
      mask["head"]))
