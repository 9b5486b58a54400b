"""Every public op of frcnn_jax/ops (but nms.py, tested in test_nms.py) accepts NumPy arrays,
eagerly and under jit, with the same result (the other tests call them with JAX arrays)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import anchors
from frcnn_jax.ops import boxes
from frcnn_jax.ops import losses
from frcnn_jax.ops import multiscale_roi
from frcnn_jax.ops import postprocess
from frcnn_jax.ops import proposals
from frcnn_jax.ops import roi
from frcnn_jax.ops import targets

MODULES = (anchors, boxes, losses, multiscale_roi, postprocess, proposals, roi, targets)


def _boxes(rng, n, size=60.0):
  xy = rng.uniform(0, size, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(4, size / 2, (n, 2))], 1).astype(np.float32)


def _cases():
  """op name -> (function of the array arguments, the NumPy arguments)."""
  rng = np.random.default_rng(0)
  a, g, r, c = 24, 3, 6, 3
  b1, b2 = _boxes(rng, 5), _boxes(rng, 4)
  hw = np.array([70, 80], np.int32)
  gt = _boxes(rng, g)
  gt_valid = np.array([True, True, False])
  gt_labels = np.array([1, 2, 0], np.int32)
  key = np.asarray(jax.random.key_data(jax.random.key(0)))     # raw uint32 key data
  deltas = (rng.normal(size=(a, 4)) * 0.2).astype(np.float32)
  grid = anchors.anchor_grid(3, 4, 16, (16, 32), (1.0,))
  return {
      "anchors.anchor_grid": (
          lambda sizes, ratios: jnp.asarray(anchors.anchor_grid(
              np.int64(3), np.int32(4), np.float32(16), tuple(sizes.tolist()),
              tuple(ratios.tolist()), "py-faster-rcnn")), None),
      "anchors.base_anchors": (None, None),     # NumPy constants only: see below
      "boxes.area": (boxes.area, (b1,)),
      "boxes.clip": (boxes.clip, (b1, hw)),
      "boxes.cxcywh_to_xyxy": (boxes.cxcywh_to_xyxy, (b1,)),
      "boxes.decode": (boxes.decode, (deltas, grid)),
      "boxes.encode": (boxes.encode, (_boxes(rng, a), grid)),
      "boxes.iou": (boxes.iou, (b1, b2)),
      "boxes.masked_iou": (boxes.masked_iou, (b1, gt, gt_valid)),
      "boxes.xyxy_to_cxcywh": (boxes.xyxy_to_cxcywh, (b1,)),
      "losses.detection_loss": (losses.detection_loss, (
          rng.normal(size=(r, c + 1)).astype(np.float32),
          rng.normal(size=(r, c + 1, 4)).astype(np.float32),
          np.array([0, 1, 2, 3, 0, 1], np.int32), rng.normal(size=(r, 4)).astype(np.float32),
          np.ones(r, np.float32), np.array([1, 1, 1, 1, 1, 0], bool))),
      "losses.rpn_loss": (losses.rpn_loss, (
          rng.normal(size=(a, 2)).astype(np.float32), deltas,
          rng.integers(-1, 2, a).astype(np.int32), rng.normal(size=(a, 4)).astype(np.float32))),
      "losses.smooth_l1": (losses.smooth_l1, (rng.normal(size=(7, 4)).astype(np.float32),)),
      "postprocess.detections": (
          lambda *x: postprocess.detections(*x, max_detections=5), (
              rng.dirichlet(np.ones(c + 1), r).astype(np.float32),
              rng.normal(size=(r, c + 1, 4)).astype(np.float32), _boxes(rng, r),
              np.array([1, 1, 1, 0, 1, 1], bool), hw)),
      "proposals.generate_proposals": (
          lambda o, d, an, s, m: proposals.generate_proposals(
              o, d, an, s, min_size=m, pre_nms_top_n=10, post_nms_top_n=6, nms_threshold=0.7),
          (rng.normal(size=a).astype(np.float32), deltas, grid, hw, np.float32(2.0))),
      "proposals.generate_level_proposals": (
          lambda o, d, an, s, m: proposals.generate_level_proposals(
              o, d, an, s, level_sizes=(a - 4, 4), min_size=m, pre_nms_top_n=10,
              post_nms_top_n=6, nms_threshold=0.7),
          (rng.normal(size=a).astype(np.float32), deltas, grid, hw, np.float32(2.0))),
      "multiscale_roi.roi_levels": (lambda x: multiscale_roi.roi_levels(x, 2, 5), (b1,)),
      "multiscale_roi.multiscale_roi_align": (
          lambda f0, f1, x: multiscale_roi.multiscale_roi_align((f0, f1), x, 2, (1 / 4, 1 / 8)),
          (rng.normal(size=(8, 10, 3)).astype(np.float32),
           rng.normal(size=(4, 5, 3)).astype(np.float32), b1)),
      "roi.roi_align": (lambda f, x: roi.roi_align(f, x, 2, 1 / 16),
                        (rng.normal(size=(5, 6, 3)).astype(np.float32), b1)),
      "roi.roi_pool": (lambda f, x: roi.roi_pool(f, x, 2, 1 / 16, coordinates="caffe"),
                       (rng.normal(size=(5, 6, 3)).astype(np.float32), b1)),
      "targets.anchors_inside": (lambda x, s: targets.anchors_inside(x, s, 0.0), (grid, hw)),
      "targets.rpn_targets": (
          lambda *x: targets.rpn_targets(*x, batch_size_per_image=8),
          (grid, gt, gt_valid, hw, key)),
      "targets.sample_proposals": (
          lambda *x: targets.sample_proposals(*x, batch_size_per_image=8),
          (_boxes(rng, 12), np.arange(12) < 10, gt, gt_labels, gt_valid, key)),
  }


CASES = _cases()
CASES["anchors.anchor_grid"] = (CASES["anchors.anchor_grid"][0],
                                (np.array([16.0, 32.0]), np.array([0.5, 2.0])))


def test_every_public_op_is_covered():
  public = {f"{m.__name__.rsplit('.', 1)[1]}.{name}"
            for m in MODULES for name, fn in inspect.getmembers(m, inspect.isfunction)
            if not name.startswith("_") and fn.__module__ == m.__name__}
  assert public == set(CASES)


def test_base_anchors_take_numpy_numbers():
  got = anchors.base_anchors(np.array([128.0, 256.0]), np.array([0.5, 1.0]), "py-faster-rcnn")
  np.testing.assert_array_equal(got, anchors.base_anchors((128, 256), (0.5, 1.0),
                                                          "py-faster-rcnn"))


@pytest.mark.parametrize("name", sorted(n for n in CASES if n != "anchors.base_anchors"))
def test_numpy_inputs_eager_and_jitted(name):
  fn, args = CASES[name]
  eager = fn(*args)
  if name == "anchors.anchor_grid":     # static numbers: jit over a function of no arrays
    jitted = jax.jit(lambda: fn(*args))()
  else:
    jitted = jax.jit(fn)(*args)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=1e-5, atol=1e-5), eager, jitted)
