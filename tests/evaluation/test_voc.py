"""Tests for frcnn_jax/evaluation/voc.py: hand-built cases and a brute-force devkit reference."""

from fractions import Fraction

import numpy as np
import pytest

from frcnn_jax.evaluation import voc


def _det(boxes, scores, labels):
  return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
          "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int32)}


def _gt(boxes, labels, difficult=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if difficult is None:
    difficult = np.zeros(len(boxes), bool)
  return {"boxes": boxes, "labels": np.asarray(labels, np.int32),
          "difficult": np.asarray(difficult, bool)}


A = [0, 0, 10, 10]
B = [20, 20, 40, 40]
C = [50, 0, 60, 30]


@pytest.mark.parametrize("use_07", [True, False])
def test_perfect_detections(use_07):
  gts = [_gt([A, B], [1, 2]), _gt([C], [1])]
  dets = [_det([A, B], [0.9, 0.8], [1, 2]), _det([C], [0.7], [1])]
  out = voc.evaluate(dets, gts, num_classes=2, use_07_metric=use_07)
  np.testing.assert_allclose(out["ap"], [1.0, 1.0])
  assert out["map"] == 1.0
  assert out["classes_without_gt"] == []
  np.testing.assert_array_equal(out["npos"], [2, 1])


@pytest.mark.parametrize("use_07", [True, False])
def test_false_positive_at_the_top(use_07):
  # Ranked: fp (0.9), tp (0.8): recall [0, 1], precision [0, 0.5] -> AP 0.5 both ways.
  out = voc.evaluate([_det([B, A], [0.9, 0.8], [1, 1])], [_gt([A], [1])], 1,
                     use_07_metric=use_07)
  assert out["ap"][0] == pytest.approx(0.5, abs=1e-15)
  np.testing.assert_allclose(out["precision"][0], [0.0, 0.5])
  np.testing.assert_allclose(out["recall"][0], [0.0, 1.0])


def test_duplicate_is_false_positive_and_hand_values():
  # Ranked: tp on A, duplicate on A (fp), tp on B: recall [.5, .5, 1], precision [1, .5, 2/3].
  dets = [_det([A, [0, 0, 10, 11], B], [0.9, 0.8, 0.7], [1, 1, 1])]
  gts = [_gt([A, B], [1, 1])]
  out07 = voc.evaluate(dets, gts, 1, use_07_metric=True)
  out12 = voc.evaluate(dets, gts, 1, use_07_metric=False)
  np.testing.assert_allclose(out07["precision"][0], [1, 0.5, 2 / 3])
  # 11-point: t <= 0.5 (6 points) -> 1, t >= 0.6 (5 points) -> 2/3.
  assert out07["ap"][0] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-15)
  # Area: 0.5 * 1 + 0.5 * 2/3.
  assert out12["ap"][0] == pytest.approx(0.5 + 1 / 3, abs=1e-15)


def test_best_box_already_matched_is_false_positive():
  # The second detection overlaps both boxes above 0.5 but A best; A is taken -> fp, no fallback.
  a2 = [0, 2, 10, 12]
  dets = [_det([A, [0, 0.5, 10, 10.5]], [0.9, 0.8], [1, 1])]
  out = voc.evaluate(dets, [_gt([A, a2], [1, 1])], 1)
  np.testing.assert_allclose(out["recall"][0], [0.5, 0.5])
  assert out["ap"][0] == pytest.approx(6 / 11, abs=1e-15)


def test_iou_exactly_at_threshold_does_not_match():
  det = _det([[0, 0, 10, 20]], [0.9], [1])        # IoU with A = 100 / 200 = 0.5
  out = voc.evaluate([det], [_gt([A], [1])], 1, iou_threshold=0.5)
  assert out["ap"][0] == 0.0
  out = voc.evaluate([det], [_gt([A], [1])], 1, iou_threshold=0.49)
  assert out["ap"][0] == 1.0


def test_difficult_objects_neither_help_nor_hurt():
  gts = [_gt([A], [1], [True]), _gt([B], [1])]
  dets = [_det([A], [0.95], [1]), _det([B], [0.5], [1])]
  out = voc.evaluate(dets, gts, 1)
  assert out["ap"][0] == 1.0
  np.testing.assert_array_equal(out["npos"], [1])
  np.testing.assert_array_equal(out["num_ignored"], [1])
  np.testing.assert_array_equal(out["num_detections"], [1])
  # Missing the difficult box costs nothing either.
  assert voc.evaluate([_det([], [], []), dets[1]], gts, 1)["ap"][0] == 1.0


def test_difficult_only_class_is_nan_and_excluded():
  gts = [_gt([A, B], [1, 2], [True, False])]
  dets = [_det([A, C], [0.9, 0.8], [1, 2])]
  out = voc.evaluate(dets, gts, 2)
  assert np.isnan(out["ap"][0])
  assert out["ap"][1] == 0.0
  assert out["classes_without_gt"] == [1]
  assert out["map"] == 0.0


def test_class_without_detections_is_zero():
  gts = [_gt([A, B], [1, 2])]
  out = voc.evaluate([_det([A], [0.9], [1])], gts, 2)
  np.testing.assert_array_equal(out["ap"], [1.0, 0.0])
  assert out["map"] == 0.5


def test_class_without_gt_is_nan_and_excluded_from_mean():
  gts = [_gt([A], [1])]
  dets = [_det([A, B], [0.9, 0.9], [1, 3])]
  out = voc.evaluate(dets, gts, 3)
  assert out["ap"][0] == 1.0
  assert np.isnan(out["ap"][1]) and np.isnan(out["ap"][2])
  assert out["classes_without_gt"] == [2, 3]
  assert out["map"] == 1.0


def test_no_ground_truth_at_all_gives_nan_map():
  out = voc.evaluate([_det([A], [0.9], [1])], [_gt([], [])], 1)
  assert np.isnan(out["map"])


@pytest.mark.parametrize("fp_first,expected", [(True, 0.5), (False, 1.0)])
def test_score_ties_keep_image_order(fp_first, expected):
  # Equal scores: the stable ranking keeps image order, so the fp ranks first iff its image does.
  fp_image = (_det([B], [0.5], [1]), _gt([], []))
  tp_image = (_det([A], [0.5], [1]), _gt([A], [1]))
  images = [fp_image, tp_image] if fp_first else [tp_image, fp_image]
  out = voc.evaluate([d for d, _ in images], [g for _, g in images], 1)
  assert out["ap"][0] == expected


def test_eleven_point_uses_exact_tenths():
  # 10 objects, 3 found at the top then one fp: recall exactly 3/10 counts for t = 0.3.
  boxes = [[10 * i, 0, 10 * i + 5, 5] for i in range(10)]
  dets = _det(boxes[:3] + [[0, 50, 5, 55]], [0.9, 0.8, 0.7, 0.6], [1] * 4)
  out = voc.evaluate([dets], [_gt(boxes, [1] * 10)], 1)
  assert out["ap"][0] == pytest.approx(4 / 11, abs=1e-15)


@pytest.mark.parametrize("bad,match", [
    ({"labels": np.array([0])}, "labels must lie in 1..2"),
    ({"labels": np.array([3])}, "labels must lie in 1..2"),
    ({"scores": np.array([0.5, 0.4])}, "scores"),
    ({"boxes": np.zeros((1, 3))}, "shape"),
    ({"boxes": np.array([[5.0, 0, 1, 1]])}, "x2 >= x1"),
    ({"scores": np.array([np.nan])}, "non-finite"),
])
def test_bad_detections_raise(bad, match):
  det = {**_det([A], [0.5], [1]), **bad}
  with pytest.raises(ValueError, match=match):
    voc.evaluate([det], [_gt([A], [1])], 2)


def test_mismatched_lengths_raise():
  with pytest.raises(ValueError, match="ground_truths"):
    voc.evaluate([_det([A], [0.5], [1])], [], 1)


def _reference(dets, gts, num_classes, threshold, use_07):
  """The devkit's VOCevaldet + VOCap, loop by loop, in exact rational arithmetic."""

  def iou(a, b):
    a = [Fraction(float(v)) for v in a]
    b = [Fraction(float(v)) for v in b]
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
      return None
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

  aps = []
  for c in range(1, num_classes + 1):
    npos = sum(1 for g in gts for lab, d in zip(g["labels"], g["difficult"])
               if lab == c and not d)
    cand = [(float(d["scores"][k]), i, k) for i, d in enumerate(dets)
            for k in range(len(d["scores"])) if d["labels"][k] == c]
    cand = sorted(cand, key=lambda t: -t[0])      # Python's sort is stable
    taken = {}
    tp, fp = [], []
    for _, i, k in cand:
      ovmax, jmax = None, None
      for j in range(len(gts[i]["labels"])):
        if gts[i]["labels"][j] != c:
          continue
        ov = iou(dets[i]["boxes"][k], gts[i]["boxes"][j])
        if ov is not None and (ovmax is None or ov > ovmax):
          ovmax, jmax = ov, j
      t = f = 0
      if ovmax is not None and ovmax > Fraction(str(threshold)):
        if not gts[i]["difficult"][jmax]:
          if (i, jmax) in taken:
            f = 1
          else:
            t = 1
            taken[(i, jmax)] = True
      else:
        f = 1
      tp.append(t)
      fp.append(f)
    if npos == 0:
      aps.append(float("nan"))
      continue
    rec, prec, ctp, cfp = [], [], 0, 0
    for t, f in zip(tp, fp):
      ctp, cfp = ctp + t, cfp + f
      rec.append(Fraction(ctp, npos))
      prec.append(Fraction(ctp, ctp + cfp) if ctp + cfp else Fraction(0))
    if use_07:
      ap = Fraction(0)
      for k in range(11):
        ps = [p for p, r in zip(prec, rec) if r >= Fraction(k, 10)]
        ap += (max(ps) if ps else 0) / Fraction(11)
    else:
      mrec = [Fraction(0)] + rec + [Fraction(1)]
      mpre = [Fraction(0)] + prec + [Fraction(0)]
      for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
      ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec))
               if mrec[i] != mrec[i - 1])
    aps.append(float(ap))
  return np.array(aps)


def _random_case(rng):
  num_classes = int(rng.integers(1, 4))
  gts, dets = [], []
  for _ in range(int(rng.integers(1, 6))):
    g = int(rng.integers(0, 5))
    xy = rng.integers(0, 12, size=(g, 2))
    wh = rng.integers(2, 9, size=(g, 2))
    gt_boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    gt_labels = rng.integers(1, num_classes + 1, size=g)
    gts.append(_gt(gt_boxes, gt_labels, rng.random(g) < 0.2))
    k = int(rng.integers(0, 10))
    src = rng.integers(0, max(g, 1), size=k)
    near = gt_boxes[src] + rng.integers(-1, 2, size=(k, 4)) if g else np.zeros((k, 4))
    xy = rng.integers(0, 12, size=(k, 2))
    far = np.concatenate([xy, xy + rng.integers(1, 9, size=(k, 2))], 1)
    boxes = np.where((rng.random(k) < 0.7)[:, None] & (g > 0), near, far)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    labels = np.where(rng.random(k) < 0.8, gt_labels[src] if g else 1,
                      rng.integers(1, num_classes + 1, size=k))
    scores = rng.integers(1, 6, size=k) / 5       # few distinct values: many ties
    dets.append(_det(boxes, scores, labels))
  return dets, gts, num_classes


def test_matches_brute_force_devkit_reference():
  rng = np.random.default_rng(0)
  for trial in range(100):
    dets, gts, num_classes = _random_case(rng)
    threshold = (0.5, 0.3, 0.7)[trial % 3]
    use_07 = trial % 2 == 0
    out = voc.evaluate(dets, gts, num_classes, iou_threshold=threshold, use_07_metric=use_07)
    ref = _reference(dets, gts, num_classes, threshold, use_07)
    np.testing.assert_allclose(out["ap"], ref, rtol=0, atol=1e-12, err_msg=f"trial {trial}")
    finite = np.isfinite(ref)
    if finite.any():
      assert out["map"] == pytest.approx(ref[finite].mean(), abs=1e-12)


def test_iou_equals_devkit_plus_one_iou_under_the_conversion():
  rng = np.random.default_rng(1)
  xy = rng.integers(1, 50, size=(20, 2))
  devkit_gt = np.concatenate([xy, xy + rng.integers(0, 30, size=(20, 2))], 1).astype(float)
  dets = rng.uniform(0, 60, size=(30, 4))
  dets[:, 2:] = dets[:, :2] + rng.uniform(0.5, 30, size=(30, 2))

  def devkit_iou(d, g):     # VOCevaldet.m on 1-based inclusive boxes
    iw = min(d[2], g[2]) - max(d[0], g[0]) + 1
    ih = min(d[3], g[3]) - max(d[1], g[1]) + 1
    if iw <= 0 or ih <= 0:
      return 0.0
    ua = (d[2] - d[0] + 1) * (d[3] - d[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
    return iw * ih / ua

  devkit_dets = dets + [1, 1, 0, 0]                        # xmin = x1 + 1, xmax = x2
  ours_gt = devkit_gt - [1, 1, 0, 0]                       # x1 = xmin - 1, x2 = xmax
  want = [[devkit_iou(d, g) for g in devkit_gt] for d in devkit_dets]
  np.testing.assert_allclose(voc.pairwise_iou(dets, ours_gt), want, rtol=0, atol=1e-12)
