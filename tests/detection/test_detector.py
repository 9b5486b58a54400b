"""Tests for frcnn_jax/detection/detector.py and the model part of frcnn_jax/config/build.py."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from frcnn_jax.config import build as builders
from frcnn_jax.config import defaults
from frcnn_jax.detection import detector
from frcnn_jax.models import faster_rcnn
from frcnn_jax.ops import boxes as box_ops
from tests.models import tiny

SIZE = 64
SETTINGS = tiny.settings(
    anchor_sizes=(16.0, 32.0), rpn_pre_nms_top_n_train=120, rpn_post_nms_top_n_train=40,
    rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20, rpn_min_size=0.0,
    rpn_batch_size_per_image=32, roi_batch_size_per_image=16, test_detections_per_image=10,
    test_score_threshold=0.0)
MODEL = tiny.model()
STATIC = ("model", "settings")


def _batch(seed: int = 0, scale: float = 1.0) -> dict:
  """Two 64x64-canvas images; the second is 48x56 and has no ground truth."""
  rng = np.random.default_rng(seed)
  gt_boxes = np.zeros((2, 3, 4), np.float32)
  gt_boxes[0, :2] = [[4, 6, 30, 40], [30, 20, 60, 50]]
  return {
      "image": rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8),
      "image_hw": np.asarray([[64, 64], [48, 56]], np.int32),
      "scale": np.full(2, scale, np.float32),
      "gt_boxes": gt_boxes,
      "gt_labels": np.asarray([[1, 2, 0], [0, 0, 0]], np.int32),
      "gt_valid": np.asarray([[True, True, False], [False, False, False]]),
      "valid": np.asarray([True, True]),
  }


@pytest.fixture(scope="module")
def params():
  return tiny.numpy_params(MODEL)


def _no_gt_batch() -> dict:
  batch = _batch(2)
  batch["gt_valid"][:] = False
  batch["gt_labels"][:] = 0
  return batch


@pytest.fixture(scope="module")
def loss_and_grads(params):
  """Loss, terms and gradients of three batches (the last without any ground truth), through
  one traced loss function."""
  loss = chex.assert_max_traces(detector.loss_fn.__wrapped__, n=1)
  step = jax.jit(jax.value_and_grad(functools.partial(loss, model=MODEL, settings=SETTINGS),
                                    has_aux=True))
  batches = [_batch(0), _batch(1), _no_gt_batch()]
  return [step(params, batch, jax.random.key(i)) for i, batch in enumerate(batches)]


def test_loss_terms_are_finite_scalars_and_trace_once(loss_and_grads):
  for (total, terms), grads in loss_and_grads[:2]:
    assert total.shape == () and np.isfinite(float(total))
    assert set(detector.LOSS_TERMS) <= set(terms)
    assert float(total) == pytest.approx(sum(float(terms[k]) for k in detector.LOSS_TERMS),
                                         rel=1e-5)
    assert float(terms["rpn_positives"]) > 0 and float(terms["det_foreground"]) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(loss_and_grads, params):
  grads = loss_and_grads[0][1]
  mask = faster_rcnn.trainable_mask(MODEL, params)
  flat_grads = jax.tree_util.tree_leaves_with_path(grads)
  flat_mask = jax.tree_util.tree_leaves(mask)
  assert not all(flat_mask) and any(flat_mask)
  for (path, grad), trainable in zip(flat_grads, flat_mask):
    magnitude = float(jnp.abs(grad).sum())
    assert (magnitude > 0.0) == trainable, jax.tree_util.keystr(path)


def test_images_without_ground_truth_train(loss_and_grads):
  (total, terms), grads = loss_and_grads[2]
  assert np.isfinite(float(total)) and float(terms["rpn_box"]) == float(terms["det_box"]) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


@pytest.fixture(scope="module")
def predictions(params):
  predict = jax.jit(chex.assert_max_traces(detector.predict.__wrapped__, n=1),
                    static_argnames=STATIC)
  small = _batch(scale=0.5)
  small["valid"][1] = False
  return predict(params, _batch(), model=MODEL, settings=SETTINGS), predict(
      params, small, model=MODEL, settings=SETTINGS)


def test_predict_shapes_and_ranges(predictions):
  out, _ = predictions
  assert out["boxes"].shape == (2, 10, 4) and out["boxes"].dtype == jnp.float32
  assert out["scores"].shape == (2, 10) and out["labels"].dtype == jnp.int32
  assert out["valid"].shape == (2, 10) and out["valid"].dtype == jnp.bool_
  valid = np.asarray(out["valid"])
  assert valid.any()
  labels = np.asarray(out["labels"])
  assert ((labels >= 1) & (labels <= 2))[valid].all() and (labels[~valid] == 0).all()
  boxes = np.asarray(out["boxes"])
  assert (boxes[1][valid[1]][:, 2:] <= [56, 48]).all() and (boxes >= 0).all()
  scores = np.asarray(out["scores"])
  assert (np.diff(scores, axis=1)[valid[:, 1:]] <= 0).all()


def test_predict_returns_original_image_pixels_and_masks_padding(predictions):
  out, small = predictions
  first = np.asarray(out["valid"][0])
  np.testing.assert_array_equal(np.asarray(small["valid"][0]), first)
  np.testing.assert_allclose(np.asarray(small["boxes"][0])[first],
                             2 * np.asarray(out["boxes"][0])[first], rtol=1e-6)
  assert not np.asarray(small["valid"][1]).any()


def test_proposals(params):
  out = detector.proposals(params, _batch(), model=MODEL, settings=SETTINGS)
  assert out["boxes"].shape == (2, 20, 4) and out["scores"].shape == out["valid"].shape == (2, 20)
  assert np.asarray(out["valid"]).any()


def test_roi_align_sigmoid_bfloat16_variant():
  model = tiny.model(roi_op="roi_align", rpn_objectness="sigmoid", dtype=jnp.bfloat16)
  params = tiny.numpy_params(model)
  grad_fn = jax.jit(jax.grad(functools.partial(detector.loss_fn, model=model, settings=SETTINGS),
                             has_aux=True))
  grads, terms = grad_fn(params, _batch(), jax.random.key(0))
  assert all(np.isfinite(float(v)) for v in terms.values())
  assert float(jnp.abs(grads["rpn"]["objectness"]["kernel"]).sum()) > 0
  assert grads["rpn"]["objectness"]["kernel"].shape[-1] == 6
  out = detector.predict(params, _batch(), model=model, settings=SETTINGS)
  assert out["boxes"].shape == (2, 10, 4) and np.isfinite(np.asarray(out["boxes"])).all()


def test_stride_8_trunk_trains_on_anchors_of_stride_8(params):
  model = tiny.model(stride=8)
  settings = dataclasses.replace(SETTINGS, strides=(8,))
  grads, terms = jax.jit(jax.grad(functools.partial(detector.loss_fn, model=model,
                                                    settings=settings), has_aux=True))(
                                                        params, _batch(), jax.random.key(0))
  assert all(np.isfinite(float(v)) for v in terms.values())
  assert float(jnp.abs(grads["trunk"]["conv5_1"]["kernel"]).sum()) > 0
  out = detector.proposals(params, _batch(), model=model, settings=settings)
  assert np.asarray(out["valid"]).any()
  with pytest.raises(ValueError, match="backbone's"):
    detector.proposals(params, _batch(), model=model, settings=SETTINGS)


def test_loss_weights_scale_their_terms(params):
  loss = jax.jit(detector.loss_fn, static_argnames=STATIC)
  _, plain = loss(params, _batch(), jax.random.key(3), model=MODEL, settings=SETTINGS)
  weights = {"rpn_cls": 2.0, "rpn_box": 3.0, "det_cls": 0.5, "det_box": 0.0}
  weighted = dataclasses.replace(SETTINGS, loss=tiny.settings(
      **{f"loss_{k}": v for k, v in weights.items()}).loss)
  total, terms = loss(params, _batch(), jax.random.key(3), model=MODEL, settings=weighted)
  for name, weight in weights.items():
    np.testing.assert_allclose(terms[name], weight * plain[name], rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(total, sum(terms[name] for name in weights), rtol=1e-6)


def test_settings_must_match_the_model(params):
  settings = tiny.settings(anchor_sizes=(16.0,))
  with pytest.raises(ValueError, match="num_anchors"):
    detector.predict(params, _batch(), model=MODEL, settings=settings)


def test_builders_map_the_default_config():
  config = defaults.get_config()
  model = builders.model_from_config(config, num_classes=20)
  # model.conv_grad "auto" is the per-tap weight gradient on the CPU backend the tests run on.
  assert model == tiny.model(num_classes=20, width=1.0, convs_per_block=(2, 2, 3, 3, 3),
                             frozen_blocks=2, fc_dim=4096, num_anchors=9, input_norm="caffe",
                             conv_grad="per_tap")
  settings = builders.detector_settings_from_config(config)
  assert settings == detector.DetectorSettings()
  hash(settings)


@pytest.mark.parametrize("key, value, builder", [
    ("model.roi_op", "psroi_pool", "model"), ("model.input_norm", "rgb", "model"),
    ("model.rpn_objectness", "tanh", "model"), ("model.dtype", "float16", "model"),
    ("model.vgg16.convs_per_block", (2, 2), "model"), ("model.vgg16.stride", 32, "model"),
    ("rpn.nms_threshold", 1.5, "settings"), ("roi.fg_fraction", -0.1, "settings"),
    ("test.detections_per_image", 0, "settings")])
def test_builders_reject_bad_values_naming_the_key(key, value, builder):
  config = defaults.get_config()
  *parents, name = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    if builder == "model":
      builders.model_from_config(config, num_classes=20)
    else:
      builders.detector_settings_from_config(config)


def _shapes_image(rng):
  """A 64x64 image with a red rectangle (label 1) and a blue disc-ish square (label 2)."""
  image = rng.integers(90, 110, (SIZE, SIZE, 3)).astype(np.uint8)
  image[8:36, 6:30] = (230, 30, 30)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  disc = (yy - 44.5) ** 2 + (xx - 45.5) ** 2 <= 14 ** 2
  image[disc] = (30, 30, 230)
  return image, np.asarray([[6, 8, 30, 36], [31.5, 30.5, 59.5, 58.5]], np.float32)


@pytest.mark.slow
def test_tiny_model_overfits_one_image():
  rng = np.random.default_rng(0)
  image, boxes = _shapes_image(rng)
  batch = {"image": image[None], "image_hw": np.asarray([[SIZE, SIZE]], np.int32),
           "scale": np.ones(1, np.float32), "gt_boxes": boxes[None],
           "gt_labels": np.asarray([[1, 2]], np.int32), "gt_valid": np.ones((1, 2), bool),
           "valid": np.ones(1, bool)}
  model = tiny.model(width=1 / 8, convs_per_block=(1, 1, 2, 2, 2), fc_dim=64, dropout=0.0,
                     frozen_blocks=0)
  settings = tiny.settings(
      anchor_sizes=(16.0, 32.0), rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=64,
      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=32, rpn_min_size=4.0,
      rpn_batch_size_per_image=64, roi_batch_size_per_image=32, test_detections_per_image=10)
  params = tiny.numpy_params(model)
  optimizer = optax.sgd(0.01, momentum=0.9)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, key):
    grads, terms = jax.grad(detector.loss_fn, has_aux=True)(params, batch, key, model=model,
                                                            settings=settings)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, terms

  def found_both(params):
    out = jax.device_get(detector.predict(params, batch, model=model, settings=settings))
    for gt, label in zip(boxes, (1, 2)):
      mine = out["valid"][0] & (out["labels"][0] == label) & (out["scores"][0] > 0.5)
      iou = np.asarray(box_ops.iou(jnp.asarray(gt[None]), jnp.asarray(out["boxes"][0])))[0]
      if not (iou[mine] > 0.7).any():
        return False
    return True

  key = jax.random.key(0)
  for step in range(1, 401):
    params, opt_state, terms = train_step(params, opt_state, jax.random.fold_in(key, step))
    if step % 50 == 0 and found_both(params):
      break
  assert found_both(params), (step, jax.device_get(terms))
