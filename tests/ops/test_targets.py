"""Tests for frcnn_jax.ops.targets against plain-NumPy loop references.

Random boxes use integer coordinates so that intersections and unions are exact in float32
and IoU ties and threshold comparisons agree between the float32 op and the float64 reference.
"""

import collections
import functools
import math

import chex
import jax
import numpy as np
import pytest

from frcnn_jax.ops import targets
from tests.ops.test_proposals import np_iou


def np_encode(box, ref, weights):
  bw, bh = box[2] - box[0], box[3] - box[1]
  rw, rh = ref[2] - ref[0], ref[3] - ref[1]
  return np.array([
      weights[0] * ((box[0] + bw / 2) - (ref[0] + rw / 2)) / rw,
      weights[1] * ((box[1] + bh / 2) - (ref[1] + rh / 2)) / rh,
      weights[2] * math.log(bw / rw),
      weights[3] * math.log(bh / rh)])


def np_rpn_labels(anchors, gt, gt_valid, hw, *, allowed_border, positive_iou, negative_iou):
  """Pre-sampling labels and matched gt index, by py-faster-rcnn's rules with the fixes."""
  n = len(anchors)
  valid_g = [g for g in range(len(gt)) if gt_valid[g]]
  inside = [allowed_border < 0 or (a[0] >= -allowed_border and a[1] >= -allowed_border
                                   and a[2] <= hw[1] + allowed_border
                                   and a[3] <= hw[0] + allowed_border) for a in anchors]
  ious = [[np_iou(anchors[i], gt[g]) for g in range(len(gt))] for i in range(n)]
  labels = [-1] * n
  matched = [0] * n
  for i in range(n):
    if not inside[i]:
      continue
    best = -1.0
    for g in valid_g:
      if ious[i][g] > best:
        best, matched[i] = ious[i][g], g
    if best < negative_iou:
      labels[i] = 0
  for g in valid_g:
    gt_best = max((ious[i][g] for i in range(n) if inside[i]), default=0.0)
    if gt_best > 0:
      for i in range(n):
        if inside[i] and ious[i][g] == gt_best:
          labels[i] = 1
  for i in range(n):
    if inside[i] and any(ious[i][g] >= positive_iou for g in valid_g):
      labels[i] = 1
  return np.array(labels), np.array(matched)


def random_boxes(rng, n, lo, hi, min_side=1, max_side=60):
  x1 = rng.integers(lo, hi, size=n)
  y1 = rng.integers(lo, hi, size=n)
  w = rng.integers(min_side, max_side, size=n)
  h = rng.integers(min_side, max_side, size=n)
  return np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)


def random_anchor_case(rng, a=48, g=5):
  # Mix random anchors with shifted copies of the gt boxes so that high IoUs and ties occur.
  gt = random_boxes(rng, g, 0, 80)
  gt_valid = rng.random(g) < 0.7
  near = gt[rng.integers(0, g, size=a // 2)] + rng.integers(-6, 7, size=(a // 2, 1))
  anchors = np.concatenate([random_boxes(rng, a - a // 2, -20, 100), near]).astype(np.float32)
  hw = rng.integers(60, 140, size=2).astype(np.int32)
  return anchors, gt, gt_valid, hw


# ------------------------------------------------------------------ RPN targets: golden cases

GOLDEN_GT = np.array([
    [0, 0, 10, 10],      # gt0
    [50, 50, 60, 60],    # gt1: best anchors tie at IoU 0.5
    [30, 30, 40, 40],    # gt2: no anchor overlaps it (zero IoU must not make positives)
    [80, 80, 90, 90],    # padding, identical to anchor 4: must be ignored
    [70, 0, 80, 10],     # gt4: best anchor has IoU 0.2
    [0, 20, 10, 30],     # gt5: its best anchor overall crosses the border
], np.float32)
GOLDEN_VALID = np.array([True, True, True, False, True, True])
GOLDEN_ANCHORS = np.array([
    [0, 0, 10, 10],      # a0: IoU 1 with gt0                  -> 1
    [0, 0, 10, 7],       # a1: IoU 0.7 exactly                 -> 1
    [0, 0, 10, 3],       # a2: IoU 0.3 exactly (not < 0.3)     -> -1
    [0, 0, 10, 2],       # a3: IoU 0.2                         -> 0
    [80, 80, 90, 90],    # a4: overlaps only the padding       -> 0
    [50, 50, 60, 55],    # a5: IoU 0.5, tied best of gt1       -> 1
    [50, 55, 60, 60],    # a6: IoU 0.5, tied best of gt1       -> 1
    [50, 50, 60, 54],    # a7: IoU 0.4                         -> -1
    [-5, 0, 5, 10],      # a8: crosses the border              -> -1
    [95, 95, 101, 100],  # a9: crosses the border by 1 pixel   -> -1
    [70, 0, 80, 2],      # a10: best anchor of gt4, IoU 0.2    -> 1
    [70, 0, 80, 1],      # a11: IoU 0.1                        -> 0
    [-2, 20, 8, 30],     # a12: crosses the border (IoU 0.67)  -> -1
    [0, 20, 10, 22],     # a13: best inside anchor of gt5      -> 1
], np.float32)
GOLDEN_HW = np.array([100, 100], np.int32)


@functools.lru_cache(maxsize=None)
def rpn_fn(batched: bool = False, **kwargs):
  """Jitted rpn_targets taking an integer seed (optionally vmapped), cached per setting."""
  def fn(anchors, gt, gt_valid, hw, seed):
    return targets.rpn_targets(anchors, gt, gt_valid, hw, jax.random.key(seed), **kwargs)
  return jax.jit(jax.vmap(fn) if batched else fn)


@functools.lru_cache(maxsize=None)
def sample_fn(batched: bool = False, **kwargs):
  """Jitted sample_proposals taking an integer seed (optionally vmapped), cached per setting."""
  def fn(proposals, proposals_valid, gt, gt_labels, gt_valid, seed):
    return targets.sample_proposals(proposals, proposals_valid, gt, gt_labels, gt_valid,
                                    jax.random.key(seed), **kwargs)
  return jax.jit(jax.vmap(fn) if batched else fn)


def _all_labels(anchors, gt, gt_valid, hw, **kwargs):
  """rpn_targets with a sample as large as the anchor set (labels before sampling)."""
  fn = rpn_fn(batch_size_per_image=anchors.shape[0], positive_fraction=1.0, **kwargs)
  return fn(anchors, gt, gt_valid, hw, 0)


def test_rpn_targets_golden_labels_and_targets():
  labels, box_targets = _all_labels(GOLDEN_ANCHORS, GOLDEN_GT, GOLDEN_VALID, GOLDEN_HW)
  expected = [1, 1, -1, 0, 0, 1, 1, -1, -1, -1, 1, 0, -1, 1]
  np.testing.assert_array_equal(labels, expected)
  np.testing.assert_allclose(box_targets[1], [0.0, 1.5 / 7, 0.0, math.log(10 / 7)], rtol=1e-5)
  np.testing.assert_allclose(box_targets[0], np.zeros(4), atol=1e-6)
  np.testing.assert_allclose(box_targets[13], [0, 2.0, 0, math.log(5.0)], rtol=1e-5)
  assert np.all(np.asarray(box_targets)[np.asarray(labels) != 1] == 0.0)


def test_rpn_targets_golden_border_disabled():
  labels, _ = _all_labels(GOLDEN_ANCHORS, GOLDEN_GT, GOLDEN_VALID, GOLDEN_HW,
                          allowed_border=-1.0)
  # a8 (IoU 1/3) stays ignored, a9 becomes negative, a12 becomes gt5's best anchor and a13
  # (IoU 0.2) a negative.
  np.testing.assert_array_equal(labels, [1, 1, -1, 0, 0, 1, 1, -1, -1, 0, 1, 0, 1, 0])


def test_rpn_targets_no_valid_gt_gives_all_inside_negative():
  labels, box_targets = _all_labels(GOLDEN_ANCHORS, GOLDEN_GT, np.zeros(6, bool), GOLDEN_HW)
  inside = [i not in (8, 9, 12) for i in range(len(GOLDEN_ANCHORS))]
  np.testing.assert_array_equal(labels, np.where(inside, 0, -1))
  assert np.all(np.asarray(box_targets) == 0.0)
  # No ground-truth slots at all (G = 0) behaves the same.
  labels0, _ = _all_labels(GOLDEN_ANCHORS, np.zeros((0, 4), np.float32), np.zeros(0, bool),
                           GOLDEN_HW)
  np.testing.assert_array_equal(labels0, labels)


# ------------------------------------------------------------------ RPN targets: random cases

def test_rpn_targets_match_reference_on_random_cases():
  rng = np.random.default_rng(0)
  cases = [random_anchor_case(rng) for _ in range(300)]
  stacked = [np.stack(x) for x in zip(*cases)]
  for border in (3.0, -1.0):     # a widened border and none (the golden cases test 0)
    fn = rpn_fn(True, batch_size_per_image=48, positive_fraction=1.0, allowed_border=border,
                weights=(1.0, 2.0, 3.0, 4.0))
    labels, box_targets = map(np.asarray, fn(*stacked, np.arange(300)))
    for i in range(0 if border > 0 else 1, 300, 2):
      anchors, gt, gt_valid, hw = cases[i]
      ref_labels, matched = np_rpn_labels(anchors, gt, gt_valid, hw, allowed_border=border,
                                          positive_iou=0.7, negative_iou=0.3)
      np.testing.assert_array_equal(labels[i], ref_labels, err_msg=f"case {i}")
      for j in np.flatnonzero(ref_labels == 1):
        np.testing.assert_allclose(
            box_targets[i, j], np_encode(gt[matched[j]], anchors[j], (1, 2, 3, 4)),
            rtol=1e-4, atol=1e-5)
      assert np.all(box_targets[i][ref_labels != 1] == 0.0)


SAMPLED_RPN = dict(batch_size_per_image=12, positive_fraction=0.25, allowed_border=3.0,
                   weights=(1.0, 2.0, 3.0, 4.0))


def sampled_rpn_run():
  """300 random cases and their vmapped sampled RPN targets (compiled once)."""
  rng = np.random.default_rng(2)
  cases = [random_anchor_case(rng) for _ in range(300)]
  stacked = [np.stack(x) for x in zip(*cases)]
  return cases, stacked, rpn_fn(True, **SAMPLED_RPN)(*stacked, np.arange(300) + 1000)


def test_rpn_sampling_counts_subsets_and_targets():
  cases, stacked, (labels, box_targets) = sampled_rpn_run()
  full = rpn_fn(True, batch_size_per_image=48, positive_fraction=1.0, allowed_border=3.0,
                weights=(1.0, 2.0, 3.0, 4.0))
  all_labels, all_targets = map(np.asarray, full(*stacked, np.arange(300)))
  labels, box_targets = np.asarray(labels), np.asarray(box_targets)
  for i in range(len(cases)):
    n_pos, n_neg = np.sum(all_labels[i] == 1), np.sum(all_labels[i] == 0)
    pos, neg = labels[i] == 1, labels[i] == 0
    assert pos.sum() == min(n_pos, 3)
    assert neg.sum() == min(n_neg, 12 - pos.sum())
    assert np.all(all_labels[i][pos] == 1) and np.all(all_labels[i][neg] == 0)
    np.testing.assert_array_equal(box_targets[i][pos], all_targets[i][pos])
    assert np.all(box_targets[i][~pos] == 0.0)


def test_rpn_sampling_is_uniform_and_key_driven():
  # Anchors 0..9 have IoU 10/19 with the gt (positive), anchors 10..19 IoU 0 (negative).
  x = np.concatenate([np.arange(10), 100 + np.arange(10)]).astype(np.float32)
  anchors = np.stack([x, 0 * x, x + 10, 0 * x + 10], 1)
  gt = np.array([[0, 0, 19, 10]], np.float32)
  fn = jax.jit(jax.vmap(lambda seed: targets.rpn_targets(
      anchors, gt, np.ones(1, bool), np.array([200, 200]), jax.random.key(seed),
      batch_size_per_image=8, positive_fraction=0.5, positive_iou=0.5)[0]))
  labels = np.asarray(fn(np.arange(2000)))
  assert np.all((labels[:, :10] == 1).sum(1) == 4) and np.all(labels[:, :10] != 0)
  assert np.all((labels[:, 10:] == 0).sum(1) == 4) and np.all(labels[:, 10:] != 1)
  np.testing.assert_allclose((labels[:, :10] == 1).mean(0), 0.4, atol=0.05)  # sd ~ 0.011
  np.testing.assert_allclose((labels[:, 10:] == 0).mean(0), 0.4, atol=0.05)
  assert len({tuple(row) for row in labels[:50]}) > 40


def test_rpn_targets_vmap_equals_loop_and_traces_once():
  cases, _, batched = sampled_rpn_run()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def one(anchors, gt, gt_valid, hw, seed):
    return targets.rpn_targets(anchors, gt, gt_valid, hw, jax.random.key(seed), **SAMPLED_RPN)

  for i, case in enumerate(cases[:4]):
    labels, box_targets = one(*case, np.int32(i + 1000))
    np.testing.assert_array_equal(batched[0][i], labels)
    np.testing.assert_allclose(batched[1][i], box_targets, rtol=1e-6)


def test_rpn_targets_bad_input_raises():
  with pytest.raises(ValueError, match="anchors"):
    targets.rpn_targets(np.zeros((3, 5)), GOLDEN_GT, GOLDEN_VALID, GOLDEN_HW,
                        jax.random.key(0))
  with pytest.raises(ValueError, match="gt_valid"):
    targets.rpn_targets(GOLDEN_ANCHORS, GOLDEN_GT, np.ones(2, bool), GOLDEN_HW,
                        jax.random.key(0))


# ------------------------------------------------------------------ proposal sampling

def np_candidates(proposals, proposals_valid, gt, gt_labels, gt_valid, *, fg_iou, bg_iou_lo):
  """Returns per candidate box (proposals then gt): 'fg', 'bg' or None, with label and gt."""
  boxes = list(proposals) + list(gt)
  valid = list(proposals_valid) + list(gt_valid)
  valid_g = [g for g in range(len(gt)) if gt_valid[g]]
  out = []
  for box, ok in zip(boxes, valid):
    if not ok:
      out.append((None, -1, -1))
      continue
    if not valid_g:
      out.append(("bg", 0, -1))
      continue
    best, m = -1.0, -1
    for g in valid_g:
      v = np_iou(box, gt[g])
      if v > best:
        best, m = v, g
    if best >= fg_iou:
      out.append(("fg", int(gt_labels[m]), m))
    elif best >= bg_iou_lo:
      out.append(("bg", 0, m))
    else:
      out.append((None, -1, -1))
  return boxes, out


def check_sample(sample, proposals, proposals_valid, gt, gt_labels, gt_valid, *, s, fg_fraction,
                 fg_iou, bg_iou_lo, weights):
  rois, labels, box_targets, box_weights, valid = map(np.asarray, sample)
  boxes, kinds = np_candidates(proposals, proposals_valid, gt, gt_labels, gt_valid,
                               fg_iou=fg_iou, bg_iou_lo=bg_iou_lo)
  n_fg_avail = sum(k[0] == "fg" for k in kinds)
  n_bg_avail = sum(k[0] == "bg" for k in kinds)
  n_fg = min(n_fg_avail, int(round(fg_fraction * s)))
  n_bg = min(n_bg_avail, s - n_fg)
  np.testing.assert_array_equal(valid, np.arange(s) < n_fg + n_bg)
  np.testing.assert_array_equal(box_weights, (np.arange(s) < n_fg).astype(np.float32))
  assert np.all(labels[:n_fg] >= 1) and np.all(labels[n_fg:n_fg + n_bg] == 0)
  assert np.all(labels[n_fg + n_bg:] == -1)
  assert np.all(rois[~valid] == 0) and np.all(box_targets[n_fg:] == 0)
  # The sample is a sub-multiset of the candidates of each kind; labels and targets follow
  # from each sampled box's own IoUs.
  pools = {kind: collections.Counter(tuple(b) for b, k in zip(boxes, kinds) if k[0] == kind)
           for kind in ("fg", "bg")}
  for j in range(n_fg + n_bg):
    kind = "fg" if j < n_fg else "bg"
    key = tuple(rois[j])
    assert pools[kind][key] > 0, (j, kind, key)
    pools[kind][key] -= 1
    k = next(k for b, k in zip(boxes, kinds) if tuple(b) == key and k[0] == kind)
    assert labels[j] == k[1]
    if kind == "fg":
      np.testing.assert_allclose(box_targets[j], np_encode(gt[k[2]], rois[j], weights),
                                 rtol=1e-4, atol=1e-4)


def random_proposal_case(rng, r=20, g=4, num_classes=5):
  gt = random_boxes(rng, g, 0, 60, min_side=4)
  gt_labels = rng.integers(1, num_classes + 1, size=g).astype(np.int32)
  gt_valid = rng.random(g) < 0.75
  near = gt[rng.integers(0, g, size=r // 2)] + rng.integers(-4, 5, size=(r // 2, 4))
  near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)
  proposals = np.concatenate([random_boxes(rng, r - r // 2, 0, 80), near]).astype(np.float32)
  proposals_valid = rng.random(r) < 0.9
  return proposals, proposals_valid, gt, gt_labels, gt_valid


def sampled_proposals_run(s, fg_fraction, bg_iou_lo):
  """150 random cases and their vmapped proposal samples (compiled once per setting)."""
  rng = np.random.default_rng(6)
  cases = [random_proposal_case(rng) for _ in range(150)]
  for case in cases[::10]:
    case[4][:] = False                                   # some images without ground truth
  fn = sample_fn(True, batch_size_per_image=s, fg_fraction=fg_fraction, bg_iou_lo=bg_iou_lo)
  return cases, fn(*[np.stack(x) for x in zip(*cases)], np.arange(len(cases)))


@pytest.mark.parametrize("s,fg_fraction,bg_iou_lo", [(16, 0.25, 0.0), (40, 0.5, 0.1)])
def test_sample_proposals_match_reference_on_random_cases(s, fg_fraction, bg_iou_lo):
  cases, out = sampled_proposals_run(s, fg_fraction, bg_iou_lo)
  for i, case in enumerate(cases):
    check_sample([o[i] for o in out], *case, s=s, fg_fraction=fg_fraction, fg_iou=0.5,
                 bg_iou_lo=bg_iou_lo, weights=(10, 10, 5, 5))


def test_sample_proposals_golden_thresholds():
  gt = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
  gt_labels = np.array([3, 0], np.int32)
  gt_valid = np.array([True, False])
  proposals = np.array([
      [0, 0, 10, 5],       # IoU 0.5 exactly: foreground
      [0, 0, 10, 4],       # IoU 0.4: background
      [0, 0, 10, 1],       # IoU 0.1 exactly: background when bg_iou_lo = 0.1
      [0, 0, 5, 1],        # IoU 0.05: background only when bg_iou_lo = 0
      [50, 50, 60, 60],    # IoU 0
      [0, 0, 10, 10],      # invalid: never sampled
  ], np.float32)
  proposals_valid = np.array([True] * 5 + [False])
  fn = lambda lo: sample_fn(batch_size_per_image=8, fg_fraction=0.25, bg_iou_lo=lo)(
      proposals, proposals_valid, gt, gt_labels, gt_valid, 0)
  rois, labels, box_targets, box_weights, valid = map(np.asarray, fn(0.1))
  assert valid.sum() == 4                               # 2 fg (with the gt itself), 2 bg
  np.testing.assert_array_equal(labels, [3, 3, 0, 0, -1, -1, -1, -1])
  fg = {tuple(rois[0]): box_targets[0], tuple(rois[1]): box_targets[1]}
  np.testing.assert_allclose(fg[(0, 0, 10, 10)], np.zeros(4), atol=1e-6)
  np.testing.assert_allclose(fg[(0, 0, 10, 5)], [0, 5.0, 0, 5 * math.log(2)], rtol=1e-5)
  assert {tuple(rois[2]), tuple(rois[3])} == {(0, 0, 10, 4), (0, 0, 10, 1)}
  np.testing.assert_array_equal(box_weights, [1, 1, 0, 0, 0, 0, 0, 0])
  _, labels, _, _, valid = map(np.asarray, fn(0.0))
  assert valid.sum() == 6 and np.all(labels[2:6] == 0)  # 2 fg + 4 bg


def test_sample_proposals_fraction_and_no_gt():
  gt = np.array([[0, 0, 10, 10]], np.float32)
  proposals = np.tile(gt, (30, 1)) + np.arange(30)[:, None] * np.array([0, 0, 0, 0.01],
                                                                         np.float32)
  far = np.tile(np.array([[50, 50, 60, 60]], np.float32), (30, 1))
  both = np.concatenate([proposals, far])
  fn = lambda v: sample_fn(batch_size_per_image=10, fg_fraction=0.25)(
      both, np.ones(60, bool), gt, np.array([7]), v, 1)
  _, labels, _, box_weights, valid = map(np.asarray, fn(np.array([True])))
  # round(0.25 * 10) = 2: round half to even, like py-faster-rcnn's np.round.
  np.testing.assert_array_equal(labels, [7, 7, 0, 0, 0, 0, 0, 0, 0, 0])
  assert valid.all() and box_weights.sum() == 2
  rois, labels, box_targets, box_weights, valid = map(np.asarray, fn(np.array([False])))
  assert valid.all() and np.all(labels == 0)
  assert np.all(box_weights == 0) and np.all(box_targets == 0)
  # No foreground slots at all: every slot is background.
  _, labels, _, _, valid = map(np.asarray, sample_fn(batch_size_per_image=10, fg_fraction=0.0)(
      both, np.ones(60, bool), gt, np.array([7]), np.array([True]), 1))
  assert valid.all() and np.all(labels == 0)


def test_sample_proposals_vmap_equals_loop_and_traces_once():
  cases, batched = sampled_proposals_run(16, 0.25, 0.0)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def one(*x):
    return targets.sample_proposals(*x[:-1], jax.random.key(x[-1]), batch_size_per_image=16,
                                    fg_fraction=0.25, bg_iou_lo=0.0)

  for i, case in enumerate(cases[:4]):   # the 1st image has no ground truth
    for got, want in zip(batched, one(*case, np.int32(i))):
      np.testing.assert_array_equal(got[i], want)


def test_sample_proposals_bad_input_raises():
  with pytest.raises(ValueError, match="gt_labels"):
    targets.sample_proposals(np.zeros((3, 4)), np.ones(3, bool), np.zeros((2, 4)),
                             np.zeros(3, np.int32), np.ones(2, bool), jax.random.key(0))
