"""Tests for frcnn_jax/models/roi_heads/fc.py and pooling.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models.roi_heads import fc
from frcnn_jax.models.roi_heads import pooling
from frcnn_jax.ops import roi as roi_ops

B, H, W, C, R, NUM_CLASSES = 2, 6, 5, 4, 3, 3


def _inputs():
  features = jax.random.normal(jax.random.key(0), (B, H, W, C))
  rois = jnp.asarray([[[0, 0, 40, 40], [16, 8, 70, 90], [3, 5, 20, 11]],
                      [[10, 10, 30, 60], [0, 0, 80, 96], [50, 50, 79, 95]]], jnp.float32)
  return features, rois


@pytest.mark.parametrize("roi_op", pooling.ROI_OPS)
def test_outputs_equal_roi_op_then_fc_layers(roi_op):
  head = fc.FCHead(num_classes=NUM_CLASSES, dim=8, pooler=pooling.RoIPooler(op=roi_op, size=2))
  features, rois = _inputs()
  params = jax.jit(head.init)(jax.random.key(1), features, rois)["params"]
  logits, deltas = jax.jit(head.apply)({"params": params}, features, rois)
  assert logits.shape == (B, R, NUM_CLASSES + 1) and logits.dtype == jnp.float32
  assert deltas.shape == (B, R, NUM_CLASSES + 1, 4) and deltas.dtype == jnp.float32
  if roi_op == "roi_pool":
    pool = lambda f, r: roi_ops.roi_pool(f, r, (2, 2), 1 / 16)
  else:
    pool = lambda f, r: roi_ops.roi_align(f, r, (2, 2), 1 / 16, sampling_ratio=2)
  pooled = np.asarray(jax.jit(jax.vmap(pool))(features, rois))
  for b in range(B):
    x = pooled[b].reshape(R, -1)
    for name in ("fc6", "fc7"):
      x = np.maximum(x @ params[name]["kernel"] + params[name]["bias"], 0)
    np.testing.assert_allclose(logits[b], x @ params["cls"]["kernel"] + params["cls"]["bias"],
                               rtol=1e-5, atol=1e-5)
    box = x @ params["box"]["kernel"] + params["box"]["bias"]
    np.testing.assert_allclose(deltas[b], box.reshape(R, NUM_CLASSES + 1, 4), rtol=1e-5,
                               atol=1e-6)


def test_dropout_only_in_training():
  head = fc.FCHead(num_classes=NUM_CLASSES, dim=64, dropout=0.5, pooler=pooling.RoIPooler(size=2))
  features, rois = _inputs()
  variables = jax.jit(head.init)(jax.random.key(1), features, rois)
  run = jax.jit(lambda key, train: head.apply(variables, features, rois, train=train,
                                              rngs={"dropout": key})[0], static_argnums=1)
  np.testing.assert_array_equal(run(jax.random.key(2), False), run(jax.random.key(3), False))
  assert not np.allclose(run(jax.random.key(2), True), run(jax.random.key(3), True))


def test_initialisation():
  head = fc.FCHead(num_classes=20, dim=512, pooler=pooling.RoIPooler(size=2))
  features, rois = _inputs()
  params = jax.jit(head.init)(jax.random.key(1), features, rois)["params"]
  assert abs(float(params["cls"]["kernel"].std()) - 0.01) < 0.001
  assert abs(float(params["box"]["kernel"].std()) - 0.001) < 0.0001
  assert float(jnp.abs(params["cls"]["bias"]).max()) == 0.0
  assert float(jnp.abs(params["box"]["bias"]).max()) == 0.0


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  head = fc.FCHead(num_classes=NUM_CLASSES, dim=8, dtype=jnp.bfloat16, pooler=pooling.RoIPooler(size=2))
  features, rois = _inputs()
  variables = jax.jit(head.init)(jax.random.key(1), features.astype(jnp.bfloat16), rois)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  logits, deltas = jax.jit(head.apply)(variables, features.astype(jnp.bfloat16), rois)
  assert logits.dtype == deltas.dtype == jnp.float32


def test_unknown_roi_op_is_an_error():
  features, rois = _inputs()
  del features, rois
  with pytest.raises(ValueError, match="op must be one of"):
    pooling.RoIPooler(op="psroi")


def test_caffe_dropout_is_unscaled_in_training_and_scaled_at_test():
  """`dropout_scale_train=False` is Caffe's `scale_train: false` (py-faster-rcnn's ZF)."""
  features, rois = _inputs()
  caffe = fc.FCHead(num_classes=NUM_CLASSES, dim=8, dropout=0.5, dropout_scale_train=False,
                    pooler=pooling.RoIPooler(size=2))
  plain = fc.FCHead(num_classes=NUM_CLASSES, dim=8, dropout=0.0, pooler=pooling.RoIPooler(size=2))
  params = jax.jit(plain.init)(jax.random.key(1), features, rois)["params"]
  # At test time each fc output is halved: equal to the dropout-free head with fc7's input and
  # the predictors' input halved.
  halved = jax.tree.map(lambda x: x, params)
  halved["fc7"] = {"kernel": params["fc7"]["kernel"] * 0.5, "bias": params["fc7"]["bias"]}
  for name in ("cls", "box"):
    halved[name] = {"kernel": params[name]["kernel"] * 0.5, "bias": params[name]["bias"]}
  got = jax.jit(caffe.apply)({"params": params}, features, rois)
  want = jax.jit(plain.apply)({"params": halved}, features, rois)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # In training a kept unit passes unscaled.
  x = jax.random.uniform(jax.random.key(4), (64, 64)) + 1.0
  dropped = np.asarray(fc.unscaled_dropout(x, 0.5, jax.random.key(5)))
  kept = dropped != 0
  np.testing.assert_array_equal(dropped[kept], np.asarray(x)[kept])
  assert 0.4 < kept.mean() < 0.6
  np.testing.assert_allclose(fc.unscaled_dropout(x, 0.5), 0.5 * np.asarray(x))
