"""Tests for frcnn_jax.ops.postprocess against a NumPy per-class greedy NMS reference."""

import functools
import math

import chex
import jax
import numpy as np
import pytest

from frcnn_jax.ops import postprocess
from tests.ops.test_proposals import bbox_transform_inv
from tests.ops.test_proposals import clip_boxes
from tests.ops.test_proposals import np_clip
from tests.ops.test_proposals import np_decode
from tests.ops.test_proposals import np_greedy_nms
from tests.ops.test_proposals import py_cpu_nms

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def np_detections(scores, deltas, rois, rois_valid, hw, *, threshold, nms_threshold, d,
                  min_size=0.01):
  """py-faster-rcnn's test_net loop: per class threshold + NMS, then the best d overall;
  boxes with a side under min_size (after clipping) are dropped first (torchvision)."""
  r, k = scores.shape
  deltas = deltas.reshape(r, k, 4)
  found = []   # (score, candidate index r * C + c - 1, box, class)
  for c in range(1, k):
    boxes = {i: np_clip(np_decode(deltas[i, c], rois[i], WEIGHTS), hw) for i in range(r)}
    idx = [i for i in range(r) if rois_valid[i] and scores[i, c] > threshold
           and min(boxes[i][2] - boxes[i][0], boxes[i][3] - boxes[i][1]) >= min_size]
    boxes = [boxes[i] for i in idx]
    for j in np_greedy_nms(boxes, [scores[i, c] for i in idx], nms_threshold):
      found.append((scores[idx[j], c], idx[j] * (k - 1) + c - 1, boxes[j], c))
  found.sort(key=lambda f: (-f[0], f[1]))
  out = (np.zeros((d, 4)), np.zeros(d), np.zeros(d, int), np.zeros(d, bool))
  for slot, (score, _, box, c) in enumerate(found[:d]):
    out[0][slot], out[1][slot], out[2][slot], out[3][slot] = box, score, c, True
  return out


@jax.jit
@chex.assert_max_traces(n=1)
def detections_d10(*args):
  """The single-image op as the random tests' batched one; must trace once in all tests."""
  return postprocess.detections(*args, nms_threshold=0.3, max_detections=10)


@functools.lru_cache(maxsize=None)
def detect_fn(batched: bool = False, **kwargs):
  fn = functools.partial(postprocess.detections, **kwargs)
  return jax.jit(jax.vmap(fn) if batched else fn)


def random_case(rng, r=24, k=4, flat=False):
  centres = rng.uniform(0, 100, size=(r, 2))
  sizes = rng.uniform(10, 50, size=(r, 2))
  rois = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
  rois[r // 2:] = rois[rng.integers(0, r // 2, size=r - r // 2)]   # shared RoIs: overlaps
  logits = rng.normal(size=(r, k)) * 2
  scores = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
  deltas = rng.normal(size=(r, k * 4) if flat else (r, k, 4)).astype(np.float32)
  rois_valid = rng.random(r) < 0.9
  hw = rng.integers(60, 110, size=2).astype(np.int32)
  return scores, deltas, rois, rois_valid, hw


def batched_random_run(flat, d, nms_threshold):
  """150 random cases and the vmapped detections on them (compiled once per setting)."""
  rng = np.random.default_rng(d)
  cases = [random_case(rng, flat=flat) for _ in range(150)]
  fn = detect_fn(True, score_threshold=0.05, nms_threshold=nms_threshold, max_detections=d)
  return cases, [np.asarray(x) for x in fn(*[np.stack(x) for x in zip(*cases)])]


@pytest.mark.parametrize("flat,d,nms_threshold", [(False, 10, 0.3), (True, 40, 0.5)])
def test_detections_match_numpy_reference(flat, d, nms_threshold):
  cases, (boxes, scores, labels, valid) = batched_random_run(flat, d, nms_threshold)
  for i, case in enumerate(cases):
    ref = np_detections(*case, threshold=0.05, nms_threshold=nms_threshold, d=d)
    np.testing.assert_array_equal(valid[i], ref[3], err_msg=f"case {i}")
    np.testing.assert_array_equal(labels[i], ref[2], err_msg=f"case {i}")
    np.testing.assert_allclose(scores[i], ref[1], rtol=1e-6)
    np.testing.assert_allclose(boxes[i], ref[0], rtol=1e-5, atol=1e-3)


def test_detections_golden():
  rois = np.array([[10, 10, 50, 50], [10, 20, 50, 60], [200, 200, 220, 220]], np.float32)
  scores = np.array([
      [0.2, 0.8, 0.0],       # class 1 wins
      [0.25, 0.7, 0.05],     # class 1 overlaps RoI 0 (IoU 0.6 > 0.3): suppressed; class 2
                             # score exactly the threshold: dropped
      [0.0, 0.4, 0.6],
  ], np.float32)
  deltas = np.zeros((3, 3, 4), np.float32)
  deltas[2, 2] = [10.0, 0.0, 5 * math.log(2.0), 0.0]    # / weights: t_x = 1, t_w = log 2
  fn = detect_fn(max_detections=5)
  boxes, out_scores, labels, valid = map(np.asarray, fn(scores, deltas, rois, np.ones(3, bool),
                                                        np.array([300, 300], np.int32)))
  np.testing.assert_allclose(out_scores, [0.8, 0.6, 0.4, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(labels, [1, 2, 1, 0, 0])
  np.testing.assert_array_equal(valid, [True, True, True, False, False])
  # RoI 2 class 2: centre moves by one width (20) and the width doubles.
  np.testing.assert_allclose(boxes[:3], [rois[0], [210, 200, 250, 220], rois[2]], atol=1e-4)
  # Clipped to the true image size; invalid RoIs give nothing.
  boxes, _, _, valid = map(np.asarray, fn(scores, deltas, rois, np.array([True, True, False]),
                                          np.array([40, 45], np.int32)))
  np.testing.assert_array_equal(valid, [True, False, False, False, False])
  np.testing.assert_allclose(boxes[0], [10, 10, 45, 40], atol=1e-5)


def test_min_size_drops_zero_area_detections():
  # RoI 1 lies right of a 100 px wide image: clipped to x1 = x2 = 100, zero width.
  rois = np.array([[10, 10, 50, 50], [120, 10, 160, 50], [60, 10, 100, 50]], np.float32)
  scores = np.array([[0.1, 0.9], [0.1, 0.9], [0.2, 0.8]], np.float32)
  deltas = np.zeros((3, 2, 4), np.float32)
  hw = np.array([100, 100], np.int32)
  args = (scores, deltas, rois, np.ones(3, bool), hw)
  boxes, out_scores, _, valid = map(np.asarray, detect_fn(max_detections=4)(*args))
  np.testing.assert_array_equal(valid, [True, True, False, False])
  np.testing.assert_allclose(boxes[:2], rois[[0, 2]])
  np.testing.assert_allclose(out_scores[:2], [0.9, 0.8])
  # min_size 0 keeps it (py-faster-rcnn): a zero-width box at x = 100.
  boxes, _, _, valid = map(np.asarray, detect_fn(max_detections=4, min_size=0.0)(*args))
  np.testing.assert_array_equal(valid, [True, True, True, False])
  np.testing.assert_allclose(boxes[1], [100, 10, 100, 50])
  # A larger min_size drops boxes narrower than it: RoI 2 is 40 x 40.
  _, _, _, valid = map(np.asarray, detect_fn(max_detections=4, min_size=40.5)(*args))
  np.testing.assert_array_equal(valid, [False] * 4)
  ref = np_detections(*args, threshold=0.05, nms_threshold=0.3, d=4)
  np.testing.assert_array_equal(ref[3], [True, True, False, False])


def test_detections_truncate_to_best_and_pad():
  case = random_case(np.random.default_rng(1))
  full = detect_fn(nms_threshold=0.3, max_detections=120)(*case)    # more than R * C = 96
  few = detections_d10(*case)
  n = int(full[3].sum())
  assert 10 < n < 96 and np.all(np.asarray(full[3]) == (np.arange(120) < n))
  for a, b in zip(few, full):
    np.testing.assert_array_equal(a, np.asarray(b)[:10])
  assert np.all(np.diff(np.asarray(full[1])[:n]) <= 0)


def test_detections_vmap_equals_loop_and_traces_once():
  cases, batched = batched_random_run(False, 10, 0.3)
  for i in range(4):
    for got, want in zip(batched, detections_d10(*cases[i])):
      np.testing.assert_array_equal(got[i], want)


def test_detections_bad_shapes_raise():
  with pytest.raises(ValueError, match="box_deltas"):
    postprocess.detections(np.zeros((2, 3)), np.zeros((2, 8)), np.zeros((2, 4)),
                           np.ones(2, bool), np.array([10, 10]))
  with pytest.raises(ValueError, match="rois"):
    postprocess.detections(np.zeros((2, 3)), np.zeros((2, 12)), np.zeros((3, 4)),
                           np.ones(2, bool), np.array([10, 10]))


def test_legacy_plus_one_reproduces_py_faster_rcnn_im_detect():
  # lib/fast_rcnn/test.py im_detect + test_net's per-class loop, on py-faster-rcnn's inclusive
  # proposals (ours with legacy_plus_one are those + (0, 0, 1, 1)); it decodes in the original
  # image (rois / im_scale) and clips to the original size.
  rng = np.random.default_rng(8)
  r, k, scale = 20, 4, 1.5
  orig_hw = np.array([60, 70])
  fn = detect_fn(nms_threshold=0.3, max_detections=r * (k - 1), min_size=0.0,
                 legacy_plus_one=True)
  for _ in range(5):
    scores, deltas, _, _, _ = random_case(rng, r=r, k=k)
    deltas = deltas * 0.5
    xy = rng.uniform(0, 80, (r, 2))
    py_rois = np.concatenate([xy, xy + rng.uniform(5, 40, (r, 2))], 1)    # resized frame
    py_rois = np.minimum(py_rois, np.tile(orig_hw[::-1] * scale - 1, 2))
    boxes, out_scores, labels, valid = map(np.asarray, fn(
        scores, deltas, (py_rois + [0, 0, 1, 1]).astype(np.float32), np.ones(r, bool),
        (orig_hw * scale).astype(np.float32), image_scale=np.float32(scale)))
    pred = bbox_transform_inv(py_rois / scale, (deltas / np.array(WEIGHTS)).reshape(r, -1))
    pred = clip_boxes(pred, orig_hw)
    want = []
    for j in range(1, k):
      inds = np.where(scores[:, j] > 0.05)[0]
      cls_dets = np.hstack((pred[inds, j * 4:(j + 1) * 4], scores[inds, j:j + 1]))
      for det in cls_dets[py_cpu_nms(cls_dets, 0.3)]:
        want.append((j, det[4], *(det[:4] + [0, 0, 1, 1])))
    got = [(int(c), s, *(b / scale)) for c, s, b in zip(labels[valid], out_scores[valid],
                                                        boxes[valid])]
    assert len(got) == len(want)
    np.testing.assert_allclose(sorted(got), sorted(want), rtol=1e-5, atol=2e-3)
