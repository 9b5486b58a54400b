"""Tests for frcnn_jax.ops.proposals against a plain-NumPy proposal pipeline."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import anchors as anchor_ops
from frcnn_jax.ops import proposals


def np_decode(delta, ref, weights=(1.0, 1.0, 1.0, 1.0)):
  w, h = ref[2] - ref[0], ref[3] - ref[1]
  cx, cy = ref[0] + w / 2, ref[1] + h / 2
  tx, ty = delta[0] / weights[0], delta[1] / weights[1]
  tw = min(delta[2] / weights[2], math.log(1000 / 16))
  th = min(delta[3] / weights[3], math.log(1000 / 16))
  cx, cy, w, h = cx + tx * w, cy + ty * h, w * math.exp(tw), h * math.exp(th)
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def np_clip(box, hw):
  return np.array([min(max(box[0], 0), hw[1]), min(max(box[1], 0), hw[0]),
                   min(max(box[2], 0), hw[1]), min(max(box[3], 0), hw[0])])


def np_iou(a, b) -> float:
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
  return inter / union if union > 0 else 0.0


def np_greedy_nms(boxes, scores, threshold):
  """Indices kept by greedy NMS, visiting by descending score (ties by index)."""
  order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if all(np_iou(boxes[k], boxes[i]) <= threshold for k in kept):
      kept.append(i)
  return kept


def np_sigmoid(x):
  return 1.0 / (1.0 + math.exp(-float(x)))


def np_centre_inside(anchor, hw) -> bool:
  cx, cy = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
  return 0 <= cx <= hw[1] and 0 <= cy <= hw[0]


def np_proposals(objectness, deltas, anchors, hw, min_size, pre, post, threshold):
  """objectness: logits; ranked by them, returned as probabilities."""
  boxes = [np_clip(np_decode(d, a), hw) for d, a in zip(deltas, anchors)]
  ok = [b[2] - b[0] >= min_size and b[3] - b[1] >= min_size and np_centre_inside(a, hw)
        for b, a in zip(boxes, anchors)]
  order = sorted((i for i in range(len(boxes)) if ok[i]), key=lambda i: (-objectness[i], i))
  top = order[:pre]
  kept = np_greedy_nms([boxes[i] for i in top], [objectness[i] for i in top], threshold)
  kept = [top[k] for k in kept][:post]
  out_boxes = np.zeros((post, 4))
  out_scores = np.zeros(post)
  for slot, i in enumerate(kept):
    out_boxes[slot], out_scores[slot] = boxes[i], np_sigmoid(objectness[i])
  return out_boxes, out_scores, np.arange(post) < len(kept)


@functools.cache
def proposal_fn(batched: bool = False, **kwargs):
  fn = lambda o, d, a, hw, m: proposals.generate_proposals(o, d, a, hw, min_size=m, **kwargs)
  return jax.jit(jax.vmap(fn) if batched else fn)


def random_case(rng, a=64):
  centres = rng.uniform(0, 120, size=(a, 2))
  sizes = rng.uniform(8, 64, size=(a, 2))
  anchors = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
  deltas = (rng.normal(size=(a, 4)) * 0.3).astype(np.float32)
  objectness = rng.normal(size=a).astype(np.float32) * 4
  objectness[rng.random(a) < 0.2] += 20.0    # probabilities saturated at 1.0 in float32
  hw = rng.integers(60, 120, size=2).astype(np.int32)   # some anchor centres in the padding
  min_size = np.float32(rng.choice([0.0, 8.0, 16.0]))
  return objectness, deltas, anchors, hw, min_size


def batched_random_run(pre, post, threshold):
  """150 random cases and the vmapped proposals on them (compiled once per setting)."""
  rng = np.random.default_rng(pre)
  cases = [random_case(rng) for _ in range(150)]
  fn = proposal_fn(True, pre_nms_top_n=pre, post_nms_top_n=post, nms_threshold=threshold)
  return cases, [np.asarray(x) for x in fn(*[np.stack(x) for x in zip(*cases)])]


# pre_nms_top_n > A (all anchors enter NMS), and post_nms_top_n > pre_nms_top_n (padding).
@pytest.mark.parametrize("pre,post,threshold", [(100, 30, 0.7), (8, 12, 0.3)])
def test_generate_proposals_matches_numpy_pipeline(pre, post, threshold):
  cases, (boxes, scores, valid) = batched_random_run(pre, post, threshold)
  for i, case in enumerate(cases):
    ref_boxes, ref_scores, ref_valid = np_proposals(*case, pre, post, threshold)
    np.testing.assert_array_equal(valid[i], ref_valid, err_msg=f"case {i}")
    np.testing.assert_allclose(boxes[i], ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-6)


def test_generate_proposals_golden_decode_clip_and_min_size():
  anchors = np.array([
      [250, 250, 350, 350],     # centred (300, 300), 100 x 100
      [0, 0, 20, 20],           # decodes to a box partly outside the image: clipped
      [100, 100, 105, 105],     # 5 x 5: below min_size 8
  ], np.float32)
  deltas = np.array([
      [-2.0, -1.0, math.log(0.5), math.log(1.0)],
      [-0.5, 0.0, 0.0, 0.0],
      [0.0, 0.0, 0.0, 0.0],
  ], np.float32)
  objectness = np.array([0.9, 0.8, 0.95], np.float32)
  hw = np.array([400, 500], np.int32)
  fn = proposal_fn(pre_nms_top_n=10, post_nms_top_n=4, nms_threshold=0.7)
  boxes, scores, valid = fn(objectness, deltas, anchors, hw, np.float32(8.0))
  # Centre (100, 200), size 50 x 100; then the second anchor shifted 10 px left and clipped.
  np.testing.assert_allclose(boxes, [[75, 150, 125, 250], [0, 0, 10, 20], [0] * 4, [0] * 4],
                             atol=1e-4)
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  np.testing.assert_allclose(scores, [sigmoid(0.9), sigmoid(0.8), 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(valid, [True, True, False, False])
  # Clipping uses the true image size: in an image 10 px wide only the second box is left
  # (its anchor is centred at x = 10, on the border: inside).
  boxes, _, valid = fn(objectness, deltas, anchors, np.array([400, 10], np.int32),
                       np.float32(1.0))
  np.testing.assert_array_equal(valid, [True, False, False, False])
  np.testing.assert_allclose(boxes[0], [0, 0, 10, 20], atol=1e-4)
  _, _, valid = fn(objectness, deltas, anchors, hw, np.float32(1000.0))
  assert not np.any(valid)


def test_generate_proposals_nms_suppresses_duplicates():
  anchors = np.tile(np.array([[10, 10, 60, 60]], np.float32), (5, 1))
  anchors[3:] += 100
  objectness = np.array([0.1, 0.5, 0.3, 0.2, 0.9], np.float32)
  fn = proposal_fn(pre_nms_top_n=5, post_nms_top_n=5, nms_threshold=0.7)
  boxes, scores, _ = fn(objectness, np.zeros((5, 4), np.float32), anchors,
                        np.array([300, 300]), np.float32(0.0))
  np.testing.assert_allclose(scores, 1 / (1 + np.exp(-np.array([0.9, 0.5, 0, 0, 0]))) *
                             [1, 1, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(boxes[:2], anchors[[4, 1]])


def test_generate_proposals_has_no_gradient_and_vmap_equals_loop():
  cases, batched = batched_random_run(8, 12, 0.3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def one(o, d, a, hw, m):
    return proposals.generate_proposals(o, d, a, hw, min_size=m, pre_nms_top_n=8,
                                        post_nms_top_n=12, nms_threshold=0.3)

  for i in range(4):
    for got, want in zip(batched, one(*cases[i])):
      np.testing.assert_array_equal(got[i], want)
  o, d, a, hw, m = cases[0]
  grad = jax.jit(jax.grad(lambda o, d: jnp.sum(one(o, d, a, hw, m)[0])
                          + jnp.sum(one(o, d, a, hw, m)[1]), argnums=(0, 1)))(o, d)
  for g in grad:
    assert np.all(np.asarray(g) == 0.0)


def test_rank_follows_logits_above_float32_saturation():
  # Logits 17..30: sigmoid is exactly 1.0 in float32, so ranking probabilities would keep
  # anchor order. Ranked by logit, the output follows the logits.
  a = 12
  anchors = np.stack([np.arange(a) * 40.0, np.zeros(a), np.arange(a) * 40.0 + 30.0,
                      np.full(a, 30.0)], 1).astype(np.float32)      # disjoint boxes
  logits = np.random.default_rng(3).permutation(np.linspace(17.0, 30.0, a)).astype(np.float32)
  assert np.all(np.asarray(jax.nn.sigmoid(logits)) == 1.0)
  fn = proposal_fn(pre_nms_top_n=a, post_nms_top_n=a, nms_threshold=0.7)
  boxes, scores, valid = fn(logits, np.zeros((a, 4), np.float32), anchors,
                            np.array([40, 40 * a]), np.float32(0.0))
  assert np.all(valid)
  np.testing.assert_array_equal(boxes, anchors[np.argsort(-logits)])
  np.testing.assert_array_equal(scores, 1.0)
  # Pre-NMS top-k keeps the highest logits, not the lowest anchor indices.
  fn = proposal_fn(pre_nms_top_n=3, post_nms_top_n=3, nms_threshold=0.7)
  boxes, _, _ = fn(logits, np.zeros((a, 4), np.float32), anchors, np.array([40, 40 * a]),
                   np.float32(0.0))
  np.testing.assert_array_equal(boxes, anchors[np.argsort(-logits)[:3]])


def test_no_proposal_from_an_anchor_centred_in_padding():
  # A 10 x 12 grid of anchors at stride 16 on a 160 x 192 canvas holding a 100 x 150 image;
  # the anchors in the padding get the highest logits and no NMS suppression (threshold 1).
  ys, xs = np.meshgrid(np.arange(10) * 16 + 8.0, np.arange(12) * 16 + 8.0, indexing="ij")
  centres = np.stack([xs.ravel(), ys.ravel()], 1)
  anchors = np.concatenate([centres - 20, centres + 20], 1).astype(np.float32)
  hw = np.array([100, 150], np.int32)
  inside = (centres[:, 0] <= 150) & (centres[:, 1] <= 100)
  rng = np.random.default_rng(4)
  logits = np.where(inside, rng.normal(size=len(anchors)),
                    30 + rng.normal(size=len(anchors))).astype(np.float32)
  deltas = (rng.normal(size=(len(anchors), 4)) * 0.1).astype(np.float32)
  n = len(anchors)
  fn = proposal_fn(pre_nms_top_n=n, post_nms_top_n=n, nms_threshold=1.0)
  boxes, scores, valid = fn(logits, deltas, anchors, hw, np.float32(0.0))
  assert int(np.sum(valid)) == int(np.sum(inside))
  # Every proposal is the decoded box of an inside anchor, matched by its score.
  decoded = np.stack([np_clip(np_decode(d, a), hw) for d, a in zip(deltas, anchors)])
  probs = np.array([np_sigmoid(l) for l in logits])
  for box, score in zip(boxes[valid], scores[valid]):
    i = int(np.argmin(np.abs(probs - score)))
    assert inside[i]
    np.testing.assert_allclose(box, decoded[i], atol=1e-3)
  # Without the padding (image = canvas) the padding anchors come first.
  boxes, _, valid = fn(logits, deltas, anchors, np.array([160, 192]), np.float32(0.0))
  assert np.all(valid)
  assert not inside[np.argmax(logits)]
  np.testing.assert_allclose(boxes[0], np_decode(deltas[np.argmax(logits)],
                                                 anchors[np.argmax(logits)]), atol=1e-3)


def test_generate_proposals_bad_shapes_raise():
  with pytest.raises(ValueError, match="objectness_logits"):
    proposals.generate_proposals(jnp.zeros((4, 2)), jnp.zeros((4, 4)), jnp.zeros((4, 4)),
                                 jnp.array([10, 10]), min_size=0.0, pre_nms_top_n=2,
                                 post_nms_top_n=2, nms_threshold=0.7)


# ------------------------------------- py-faster-rcnn's lib/rpn/proposal_layer.py, line by line
# (forward steps 1-8 on one image's flattened outputs; bbox_transform_inv, clip_boxes,
# _filter_boxes and py_cpu_nms from lib/), inclusive pixel boxes.


def bbox_transform_inv(boxes, deltas):
  widths = boxes[:, 2] - boxes[:, 0] + 1.0
  heights = boxes[:, 3] - boxes[:, 1] + 1.0
  ctr_x = boxes[:, 0] + 0.5 * widths
  ctr_y = boxes[:, 1] + 0.5 * heights
  dx, dy, dw, dh = deltas[:, 0::4], deltas[:, 1::4], deltas[:, 2::4], deltas[:, 3::4]
  pred_ctr_x = dx * widths[:, np.newaxis] + ctr_x[:, np.newaxis]
  pred_ctr_y = dy * heights[:, np.newaxis] + ctr_y[:, np.newaxis]
  pred_w = np.exp(dw) * widths[:, np.newaxis]
  pred_h = np.exp(dh) * heights[:, np.newaxis]
  pred_boxes = np.zeros(deltas.shape, dtype=deltas.dtype)
  pred_boxes[:, 0::4] = pred_ctr_x - 0.5 * pred_w
  pred_boxes[:, 1::4] = pred_ctr_y - 0.5 * pred_h
  pred_boxes[:, 2::4] = pred_ctr_x + 0.5 * pred_w
  pred_boxes[:, 3::4] = pred_ctr_y + 0.5 * pred_h
  return pred_boxes


def clip_boxes(boxes, im_shape):
  boxes[:, 0::4] = np.maximum(np.minimum(boxes[:, 0::4], im_shape[1] - 1), 0)
  boxes[:, 1::4] = np.maximum(np.minimum(boxes[:, 1::4], im_shape[0] - 1), 0)
  boxes[:, 2::4] = np.maximum(np.minimum(boxes[:, 2::4], im_shape[1] - 1), 0)
  boxes[:, 3::4] = np.maximum(np.minimum(boxes[:, 3::4], im_shape[0] - 1), 0)
  return boxes


def py_cpu_nms(dets, thresh):
  x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
  areas = (x2 - x1 + 1) * (y2 - y1 + 1)
  order = scores.argsort()[::-1]
  keep = []
  while order.size > 0:
    i = order[0]
    keep.append(i)
    xx1 = np.maximum(x1[i], x1[order[1:]])
    yy1 = np.maximum(y1[i], y1[order[1:]])
    xx2 = np.minimum(x2[i], x2[order[1:]])
    yy2 = np.minimum(y2[i], y2[order[1:]])
    w = np.maximum(0.0, xx2 - xx1 + 1)
    h = np.maximum(0.0, yy2 - yy1 + 1)
    inter = w * h
    ovr = inter / (areas[i] + areas[order[1:]] - inter)
    inds = np.where(ovr <= thresh)[0]
    order = order[inds + 1]
  return keep


def pfr_proposal_layer(scores, bbox_deltas, anchors, im_info, pre_nms_topN, post_nms_topN,
                       nms_thresh, min_size):
  """scores [A] object probabilities, anchors [A, 4] inclusive; returns inclusive boxes."""
  proposals_ = bbox_transform_inv(anchors, bbox_deltas)
  proposals_ = clip_boxes(proposals_, im_info[:2])
  ws = proposals_[:, 2] - proposals_[:, 0] + 1
  hs = proposals_[:, 3] - proposals_[:, 1] + 1
  keep = np.where((ws >= min_size * im_info[2]) & (hs >= min_size * im_info[2]))[0]
  proposals_ = proposals_[keep, :]
  scores = scores[keep].reshape(-1, 1)
  order = scores.ravel().argsort()[::-1]
  if pre_nms_topN > 0:
    order = order[:pre_nms_topN]
  proposals_ = proposals_[order, :]
  scores = scores[order]
  keep = py_cpu_nms(np.hstack((proposals_, scores)), nms_thresh)
  if post_nms_topN > 0:
    keep = keep[:post_nms_topN]
  return proposals_[keep, :], scores[keep]


def test_legacy_plus_one_reproduces_py_faster_rcnn_proposal_layer():
  rng = np.random.default_rng(5)
  grid = anchor_ops.anchor_grid(6, 8, 16, (32, 64), (0.5, 1.0, 2.0), "py-faster-rcnn")
  a = len(grid)
  fn = proposal_fn(True, pre_nms_top_n=60, post_nms_top_n=25, nms_threshold=0.7,
                   legacy_plus_one=True)
  cases = []
  for _ in range(20):
    logits = rng.normal(size=a).astype(np.float32) * 3
    deltas = (rng.normal(size=(a, 4)) * 0.3).astype(np.float32)
    hw = np.array([rng.integers(90, 97), rng.integers(120, 129)], np.int32)  # centres inside
    cases.append((logits, deltas, grid, hw, np.float32(16 * 0.75)))
  boxes, scores, valid = map(np.asarray, fn(*[np.stack(x) for x in zip(*cases)]))
  for i, (logits, deltas, _, hw, _) in enumerate(cases):
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want, want_scores = pfr_proposal_layer(
        probs, deltas.astype(np.float64), grid.astype(np.float64) - [0, 0, 1, 1],
        np.array([hw[0], hw[1], 0.75]), 60, 25, 0.7, 16)
    n = len(want)
    assert np.all(valid[i] == (np.arange(25) < n)), i
    np.testing.assert_allclose(boxes[i, :n], want + [0, 0, 1, 1], rtol=0, atol=2e-3)
    np.testing.assert_allclose(scores[i, :n], want_scores[:, 0], rtol=1e-5)
  # Without the flag every proposal is one pixel smaller at its right and bottom.
  plain = proposal_fn(pre_nms_top_n=60, post_nms_top_n=25, nms_threshold=0.7)
  legacy = proposal_fn(pre_nms_top_n=60, post_nms_top_n=25, nms_threshold=0.7,
                       legacy_plus_one=True)
  logits, deltas, _, _, _ = cases[0]
  deltas = deltas * 0.1
  big_hw = np.array([400, 400])
  b0, _, v0 = plain(logits, deltas, grid + 150, big_hw, np.float32(0.0))
  b1, _, v1 = legacy(logits, deltas, grid + 150, big_hw, np.float32(0.0))
  assert np.all(np.asarray(v0)) and np.all(np.asarray(v1))
  np.testing.assert_allclose(np.asarray(b1) - np.asarray(b0), np.tile([0, 0, 1, 1], (25, 1)),
                             atol=1e-4)


# ------------------------------------------------ generate_level_proposals (torchvision's RPN)


def np_level_proposals(objectness, deltas, anchors, hw, min_size, level_sizes, pre, post,
                       threshold):
  """filter_proposals by loops: per-level top-k, decode, clip, min size, per-level NMS, sort."""
  candidates = []    # (level, anchor index)
  start = 0
  for level, size in enumerate(level_sizes):
    order = sorted(range(start, start + size), key=lambda i: (-objectness[i], i))
    candidates += [(level, i) for i in order[:pre]]
    start += size
  boxes = {i: np_clip(np_decode(deltas[i], anchors[i]), hw) for _, i in candidates}
  kept = []
  for level in range(len(level_sizes)):
    members = [i for lvl, i in candidates if lvl == level
               and boxes[i][2] - boxes[i][0] >= min_size and boxes[i][3] - boxes[i][1] >= min_size]
    survivors = np_greedy_nms([boxes[i] for i in members], [objectness[i] for i in members],
                              threshold)
    kept += [(level, members[k]) for k in survivors]
  kept = sorted(kept, key=lambda li: (-objectness[li[1]], li[0], li[1]))[:post]
  out_boxes, out_scores = np.zeros((post, 4)), np.zeros(post)
  for slot, (_, i) in enumerate(kept):
    out_boxes[slot], out_scores[slot] = boxes[i], np_sigmoid(objectness[i])
  return out_boxes, out_scores, np.arange(post) < len(kept)


LEVEL_SIZES = (40, 20, 7, 1)     # pre_nms_top_n 15 is below the first two, above the others
LEVEL_ARGS = {"level_sizes": LEVEL_SIZES, "pre_nms_top_n": 15, "post_nms_top_n": 30,
              "nms_threshold": 0.7}


def random_level_case(rng):
  """Anchors doubling in size per level, some outside the image (clipped to nothing)."""
  parts = []
  for level, size in enumerate(LEVEL_SIZES):
    centres = rng.uniform(-20, 120, size=(size, 2))
    sides = rng.uniform(8, 24, size=(size, 2)) * 2**level
    parts.append(np.concatenate([centres - sides / 2, centres + sides / 2], 1))
  anchors = np.concatenate(parts).astype(np.float32)
  a = len(anchors)
  deltas = (rng.normal(size=(a, 4)) * 0.3).astype(np.float32)
  deltas[rng.random(a) < 0.05, 2:] = 6.0     # clamped at log(1000 / 16)
  objectness = (rng.normal(size=a) * 3).astype(np.float32)
  hw = rng.integers(60, 120, size=2).astype(np.int32)
  min_size = np.float32(rng.choice([1e-3, 8.0]) if rng.random() < 0.9 else 0.0)
  return objectness, deltas, anchors, hw, min_size


@functools.cache
def batched_level_run():
  """24 random cases and the vmapped level proposals on them (compiled once, shared)."""
  rng = np.random.default_rng(12)
  cases = [random_level_case(rng) for _ in range(24)]
  fn = jax.jit(jax.vmap(lambda o, d, a, hw, m: proposals.generate_level_proposals(
      o, d, a, hw, min_size=m, **LEVEL_ARGS)))
  return cases, [np.asarray(x) for x in fn(*[np.stack(x) for x in zip(*cases)])]


def test_generate_level_proposals_matches_numpy_pipeline():
  cases, (boxes, scores, valid) = batched_level_run()
  counts = valid.sum(1)
  assert counts.min() < 30 and counts.max() == 30     # padded and truncated outputs
  for i, case in enumerate(cases):
    ref_boxes, ref_scores, ref_valid = np_level_proposals(
        *case, LEVEL_SIZES, LEVEL_ARGS["pre_nms_top_n"], LEVEL_ARGS["post_nms_top_n"],
        LEVEL_ARGS["nms_threshold"])
    np.testing.assert_array_equal(valid[i], ref_valid, err_msg=f"case {i}")
    np.testing.assert_allclose(boxes[i], ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-6)


def test_generate_level_proposals_golden_levels_do_not_suppress_each_other():
  anchors = np.array([
      [0, 0, 10, 10],       # level 0
      [1, 0, 11, 10],       # level 0, IoU 90 / 110 = 0.82 with box 0: suppressed
      [20, 20, 40, 40],     # level 0, decoded to centre (32, 26), size 10 x 40
      [0, 1, 10, 11],       # level 1, IoU 0.82 with box 0: kept (another level)
      [52, 42, 72, 62],     # level 1, centred outside the 50 x 60 image: clipped to 8 x 8
  ], np.float32)
  logits = np.array([2.0, 1.0, 0.5, 1.5, 3.0], np.float32)
  deltas = np.zeros((5, 4), np.float32)
  deltas[2] = [0.1, -0.2, math.log(0.5), math.log(2.0)]
  fn = jax.jit(lambda m: proposals.generate_level_proposals(
      logits, deltas, anchors, np.array([50, 60]), level_sizes=(3, 2), min_size=m,
      pre_nms_top_n=10, post_nms_top_n=5, nms_threshold=0.7))
  corner, decoded = [52, 42, 60, 50], [27, 6, 37, 46]
  sigmoid = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))
  boxes, scores, valid = fn(1e-3)
  np.testing.assert_array_equal(valid, [True, True, True, True, False])
  np.testing.assert_allclose(boxes, [corner, anchors[0], anchors[3], decoded, [0] * 4],
                             atol=1e-5)
  np.testing.assert_allclose(scores, list(sigmoid([3.0, 2.0, 1.5, 0.5])) + [0], rtol=1e-6)
  # min_size 9 drops the clipped 8 x 8 box; 1000 drops every box.
  boxes, _, valid = fn(9.0)
  np.testing.assert_array_equal(valid, [True, True, True, False, False])
  np.testing.assert_allclose(boxes[:3], [anchors[0], anchors[3], decoded], atol=1e-5)
  boxes, scores, valid = fn(1000.0)
  assert not np.any(valid) and not np.any(boxes) and not np.any(scores)


def test_generate_level_proposals_traces_once_vmap_equals_loop_and_no_gradient():
  cases, batched = batched_level_run()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def one(o, d, a, hw, m):
    return proposals.generate_level_proposals(o, d, a, hw, min_size=m, **LEVEL_ARGS)

  for i in range(4):
    for got, want in zip(batched, one(*cases[i])):
      np.testing.assert_array_equal(got[i], want)
  o, d, a, hw, m = cases[0]
  grads = jax.jit(jax.grad(lambda o, d, a: jnp.sum(one(o, d, a, hw, m)[0])
                           + jnp.sum(one(o, d, a, hw, m)[1]), argnums=(0, 1, 2)))(o, d, a)
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def test_generate_level_proposals_bad_arguments_raise():
  o, d, a, hw = jnp.zeros(6), jnp.zeros((6, 4)), jnp.zeros((6, 4)), jnp.array([10, 10])

  def call(level_sizes=(4, 2), pre=3, post=3, **shapes):
    args = {"o": o, "d": d, "a": a} | shapes
    return proposals.generate_level_proposals(
        args["o"], args["d"], args["a"], hw, level_sizes=level_sizes, min_size=0.0,
        pre_nms_top_n=pre, post_nms_top_n=post, nms_threshold=0.7)

  with pytest.raises(ValueError, match="disagree"):
    call(d=jnp.zeros((5, 4)))
  with pytest.raises(ValueError, match="disagree"):
    call(o=jnp.zeros((6, 1)))
  with pytest.raises(ValueError, match="sum to 5"):
    call(level_sizes=(4, 1))
  with pytest.raises(ValueError, match="empty level"):
    call(level_sizes=(6, 0))
  with pytest.raises(ValueError, match="static ints"):
    call(level_sizes=())
  with pytest.raises(ValueError, match="static ints"):
    call(level_sizes=(4.0, 2.0))
  with pytest.raises(ValueError, match="pre_nms_top_n"):
    call(pre=0)
  with pytest.raises(ValueError, match="post_nms_top_n"):
    call(post=0)


def test_generate_level_proposals_matches_torchvision_filter_proposals():
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  from torchvision.models.detection import rpn as tv_rpn
  from torchvision.models.detection.anchor_utils import AnchorGenerator

  pre, post = LEVEL_ARGS["pre_nms_top_n"], LEVEL_ARGS["post_nms_top_n"]
  module = tv_rpn.RegionProposalNetwork(
      AnchorGenerator(), tv_rpn.RPNHead(4, 3), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
      batch_size_per_image=256, positive_fraction=0.5,
      pre_nms_top_n={"training": pre, "testing": pre},
      post_nms_top_n={"training": post, "testing": post},
      nms_thresh=LEVEL_ARGS["nms_threshold"]).eval()
  assert module.min_size == np.float32(1e-3) and module.score_thresh == 0.0
  # The shared random run, restricted to its cases with torchvision's min_size (images of
  # 20 different sizes).
  cases, (boxes, scores, valid) = batched_level_run()
  picked = [i for i, case in enumerate(cases) if case[4] == np.float32(1e-3)]
  assert len(picked) >= 10
  logits, deltas, anchors, image_hw = (np.stack([cases[i][k] for i in picked])
                                       for k in range(4))
  with torch.no_grad():
    decoded = module.box_coder.decode(torch.from_numpy(deltas).reshape(-1, 4),
                                      [torch.from_numpy(x) for x in anchors])
    want_boxes, want_scores = module.filter_proposals(
        decoded.view(len(picked), -1, 4), torch.from_numpy(logits),
        [tuple(int(v) for v in hw) for hw in image_hw], list(LEVEL_SIZES))
  for j, i in enumerate(picked):
    n = len(want_boxes[j])
    np.testing.assert_array_equal(valid[i], np.arange(post) < n, err_msg=f"case {i}")
    np.testing.assert_allclose(boxes[i, :n], want_boxes[j].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores[i, :n], want_scores[j].numpy(), rtol=1e-6, atol=0)
