"""Tests for frcnn_jax.ops.boxes against hand-computed cases and plain-NumPy loop references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import boxes as box_ops

# Jitted once per shape: far cheaper in tests than eager op-by-op dispatch.
_iou = jax.jit(box_ops.iou)
_masked_iou = jax.jit(box_ops.masked_iou)
_area = jax.jit(box_ops.area)
_clip = jax.jit(box_ops.clip)
_to_cxcywh = jax.jit(box_ops.xyxy_to_cxcywh)
_to_xyxy = jax.jit(box_ops.cxcywh_to_xyxy)
_encode = jax.jit(box_ops.encode, static_argnums=2)
_decode = jax.jit(box_ops.decode, static_argnums=2)


def _np_area(b):
  return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _np_iou(b1, b2):
  """IoU of two single boxes with scalar Python arithmetic."""
  iw = max(min(b1[2], b2[2]) - max(b1[0], b2[0]), 0.0)
  ih = max(min(b1[3], b2[3]) - max(b1[1], b2[1]), 0.0)
  inter = iw * ih
  union = _np_area(b1) + _np_area(b2) - inter
  return inter / union if union > 0 else 0.0


def _np_iou_matrix(boxes1, boxes2):
  out = np.zeros((len(boxes1), len(boxes2)))
  for i, b1 in enumerate(boxes1.astype(np.float64)):
    for j, b2 in enumerate(boxes2.astype(np.float64)):
      out[i, j] = _np_iou(b1, b2)
  return out


def _np_encode(b, a, weights):
  aw, ah = a[2] - a[0], a[3] - a[1]
  bw, bh = b[2] - b[0], b[3] - b[1]
  ax, ay = a[0] + aw / 2, a[1] + ah / 2
  bx, by = b[0] + bw / 2, b[1] + bh / 2
  t = [(bx - ax) / aw, (by - ay) / ah, math.log(bw / aw), math.log(bh / ah)]
  return [ti * wi for ti, wi in zip(t, weights)]


def _np_decode(d, a, weights):
  aw, ah = a[2] - a[0], a[3] - a[1]
  ax, ay = a[0] + aw / 2, a[1] + ah / 2
  tx, ty, tw, th = (di / wi for di, wi in zip(d, weights))
  clamp = math.log(1000 / 16)
  cx, cy = ax + tx * aw, ay + ty * ah
  w, h = aw * math.exp(min(tw, clamp)), ah * math.exp(min(th, clamp))
  return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _random_boxes(rng, n, lo=-50.0, hi=650.0, degenerate=0.2):
  """Random xyxy boxes, some outside [0, 600], some with zero width/height or inverted."""
  x = rng.uniform(lo, hi, (n, 2))
  y = rng.uniform(lo, hi, (n, 2))
  boxes = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], -1)
  kind = rng.uniform(size=n)
  boxes[kind < degenerate / 2, 2] = boxes[kind < degenerate / 2, 0]           # zero width
  inverted = (kind >= degenerate / 2) & (kind < degenerate)
  boxes[inverted] = boxes[inverted][:, [2, 3, 0, 1]]                          # x2 < x1
  return np.round(boxes, 2).astype(np.float32)


def _positive_boxes(rng, n):
  x1, y1 = rng.uniform(-100, 900, (2, n))
  w, h = rng.uniform(1, 400, (2, n))
  return np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32)


def test_golden_decode_from_issue():
  anchor = jnp.array([250.0, 250.0, 350.0, 350.0])      # centre (300, 300), 100 x 100
  deltas = jnp.array([-2.0, -1.0, math.log(0.5), math.log(1.0)])
  box = _decode(deltas, anchor)
  np.testing.assert_allclose(_to_cxcywh(box), [100.0, 200.0, 50.0, 100.0],
                             rtol=1e-6)
  np.testing.assert_allclose(_encode(box, anchor), deltas, atol=1e-6)
  weighted = _encode(box, anchor, weights=(10.0, 10.0, 5.0, 5.0))
  np.testing.assert_allclose(weighted, deltas * jnp.array([10.0, 10.0, 5.0, 5.0]), atol=1e-5)
  np.testing.assert_allclose(_decode(weighted, anchor, weights=(10, 10, 5, 5)), box,
                             rtol=1e-6)


def test_golden_iou():
  a = jnp.array([[0.0, 0.0, 10.0, 10.0]])
  b = jnp.array([
      [0.0, 0.0, 10.0, 10.0],     # identical
      [5.0, 5.0, 15.0, 15.0],     # 25 / 175
      [0.0, 0.0, 5.0, 10.0],      # contained, half
      [10.0, 0.0, 20.0, 10.0],    # touching edge
      [20.0, 20.0, 30.0, 30.0],   # disjoint
      [3.0, 3.0, 3.0, 3.0],       # zero area inside
  ])
  np.testing.assert_allclose(_iou(a, b), [[1.0, 1 / 7, 0.5, 0.0, 0.0, 0.0]], rtol=1e-6)
  empty = jnp.array([[1.0, 1.0, 1.0, 1.0], [4.0, 4.0, 2.0, 2.0]])
  np.testing.assert_array_equal(_iou(empty, empty), np.zeros((2, 2)))


def test_iou_matches_numpy_loop():
  rng = np.random.default_rng(0)
  for n, m in [(1, 1), (7, 13), (40, 25), (30, 1)]:
    for _ in range(5):
      b1, b2 = _random_boxes(rng, n), _random_boxes(rng, m)
      np.testing.assert_allclose(_iou(b1, b2), _np_iou_matrix(b1, b2), atol=1e-6)


def test_iou_empty_inputs_and_dtype():
  out = _iou(np.zeros((0, 4)), np.zeros((3, 4), np.int32))
  assert out.shape == (0, 3) and out.dtype == jnp.float32


def test_iou_leading_dims_and_vmap_match_loop():
  rng = np.random.default_rng(1)
  b1 = np.stack([_random_boxes(rng, 9) for _ in range(3)])
  b2 = np.stack([_random_boxes(rng, 5) for _ in range(3)])
  loop = np.stack([_iou(b1[i], b2[i]) for i in range(3)])
  np.testing.assert_allclose(_iou(b1, b2), loop, atol=1e-7)
  np.testing.assert_allclose(jax.jit(jax.vmap(box_ops.iou))(b1, b2), loop, atol=1e-7)


def test_iou_gradient_is_finite_for_empty_union():
  boxes = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
  grad = jax.jit(jax.grad(lambda b: box_ops.iou(b, b).sum()))(boxes)
  assert np.isfinite(np.asarray(grad)).all()


def test_masked_iou():
  rng = np.random.default_rng(2)
  boxes, gt = _random_boxes(rng, 20), _random_boxes(rng, 6)
  gt_valid = np.array([True, False, True, True, False, True])
  out = np.asarray(_masked_iou(boxes, gt, gt_valid))
  ref = _np_iou_matrix(boxes, gt)
  ref[:, ~gt_valid] = -1.0
  np.testing.assert_allclose(out, ref, atol=1e-6)
  none_valid = _masked_iou(boxes, gt, np.zeros(6, bool))
  np.testing.assert_array_equal(none_valid, -np.ones((20, 6)))
  batched = jax.jit(jax.vmap(box_ops.masked_iou))(boxes[None], gt[None], gt_valid[None])
  np.testing.assert_allclose(batched[0], out)
  with pytest.raises(ValueError, match="gt_valid"):
    _masked_iou(boxes, gt, gt_valid[:5])


def test_area_and_converters():
  rng = np.random.default_rng(3)
  boxes = _random_boxes(rng, 50)
  np.testing.assert_allclose(_area(boxes), [_np_area(b) for b in boxes.astype(float)],
                             rtol=1e-6)
  cxcywh = _to_cxcywh(boxes)
  ref = [[b[0] + (b[2] - b[0]) / 2, b[1] + (b[3] - b[1]) / 2, b[2] - b[0], b[3] - b[1]]
         for b in boxes.astype(float)]
  np.testing.assert_allclose(cxcywh, ref, rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(_to_xyxy(cxcywh), boxes, atol=1e-4)
  np.testing.assert_array_equal(_to_cxcywh(jnp.array([2.0, 4.0, 6.0, 10.0])),
                                [4.0, 7.0, 4.0, 6.0])


def test_clip():
  boxes = jnp.array([[-5.0, 3.0, 700.0, 900.0], [-30.0, -20.0, -10.0, -1.0],
                     [10.0, 20.0, 30.0, 40.0]])
  out = _clip(boxes, jnp.array([600, 800], jnp.int32))       # height 600, width 800
  np.testing.assert_array_equal(out, [[0.0, 3.0, 700.0, 600.0], [0.0, 0.0, 0.0, 0.0],
                                      [10.0, 20.0, 30.0, 40.0]])
  rng = np.random.default_rng(4)
  boxes = _random_boxes(rng, 100, lo=-300, hi=1300)
  hw = np.array([[480.0, 640.0], [600.0, 1000.0]])
  batched = _clip(np.stack([boxes, boxes]), hw[:, None])
  for k, (h, w) in enumerate(hw):
    ref = [[min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w),
            min(max(b[3], 0), h)] for b in boxes.astype(float)]
    np.testing.assert_allclose(batched[k], ref, rtol=1e-6)
  with pytest.raises(ValueError, match="image_hw"):
    _clip(boxes, jnp.array([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_numpy_loop(weights):
  rng = np.random.default_rng(5)
  boxes, anchors = _positive_boxes(rng, 300), _positive_boxes(rng, 300)
  deltas = np.asarray(_encode(boxes, anchors, weights))
  ref = [_np_encode(b, a, weights) for b, a in zip(boxes.astype(float), anchors.astype(float))]
  np.testing.assert_allclose(deltas, ref, rtol=1e-4, atol=1e-4)
  random_deltas = rng.normal(0, 2, (300, 4)).astype(np.float32) * np.asarray(weights, np.float32)
  decoded = _decode(random_deltas, anchors, weights)
  ref = [_np_decode(d, a, weights) for d, a in zip(random_deltas.astype(float),
                                                   anchors.astype(float))]
  np.testing.assert_allclose(decoded, ref, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_round_trip(weights):
  rng = np.random.default_rng(6)
  boxes = _positive_boxes(rng, 500)
  # Anchors within a factor 60 of the boxes' sizes, so the decode clamp is not reached.
  anchors = _to_xyxy(
      _to_cxcywh(boxes) * np.exp(rng.uniform(-3, 3, (500, 4))).astype(np.float32))
  out = _decode(_encode(boxes, anchors, weights), anchors, weights)
  np.testing.assert_allclose(out, boxes, rtol=1e-4, atol=1e-2)


def test_decode_clamps_log_sizes():
  anchor = jnp.array([0.0, 0.0, 16.0, 16.0])
  out = _decode(jnp.array([0.0, 0.0, 50.0, -50.0]), anchor)
  cxcywh = _to_cxcywh(out)
  np.testing.assert_allclose(cxcywh[2], 1000.0, rtol=1e-5)        # clamped at 1000 / 16
  assert 0.0 <= float(cxcywh[3]) < 1e-6                           # no lower clamp
  assert np.isfinite(np.asarray(out)).all()


def test_encode_degenerate_is_finite():
  boxes = jnp.array([[5.0, 5.0, 5.0, 9.0], [0.0, 0.0, 10.0, 10.0]])
  anchors = jnp.array([[0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]])
  assert np.isfinite(np.asarray(_encode(boxes, anchors))).all()


def test_broadcasting_and_vmap_match_loop():
  rng = np.random.default_rng(7)
  anchors = _positive_boxes(rng, 12)
  deltas = rng.normal(0, 0.5, (3, 12, 4)).astype(np.float32)
  loop = np.stack([_decode(deltas[i], anchors) for i in range(3)])
  np.testing.assert_allclose(_decode(deltas, anchors), loop, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(box_ops.decode, in_axes=(0, None)))(deltas, anchors),
                             loop, rtol=1e-6)


def test_jit_traces_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(boxes, anchors, gt, gt_valid, hw):
    deltas = box_ops.encode(boxes, anchors, (10.0, 10.0, 5.0, 5.0))
    decoded = box_ops.clip(box_ops.decode(deltas, anchors, (10.0, 10.0, 5.0, 5.0)), hw)
    return box_ops.masked_iou(decoded, gt, gt_valid)

  rng = np.random.default_rng(8)
  for _ in range(3):
    fn(_positive_boxes(rng, 16), _positive_boxes(rng, 16), _positive_boxes(rng, 4),
       rng.uniform(size=4) > 0.5, np.array([600, 800], np.int32))


def test_bad_shapes_and_weights_raise():
  with pytest.raises(ValueError, match="boxes"):
    box_ops.area(jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="boxes1"):
    box_ops.iou(jnp.zeros((3, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="iou takes"):
    box_ops.iou(jnp.zeros((4,)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="weights"):
    box_ops.encode(jnp.zeros((2, 4)), jnp.ones((2, 4)), weights=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="weights"):
    box_ops.decode(jnp.zeros((2, 4)), jnp.ones((2, 4)), weights=(1.0, 0.0, 1.0, 1.0))
