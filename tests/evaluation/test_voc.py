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


@pytest.mark.parametrize("found,fp_after", [(3, 1), (6, 1), (7, 2)])
def test_eleven_point_thresholds_at_exact_tenths_of_recall(found, fp_after):
  # 10 objects; the first `found` are found at the top, then false positives: recall lands on
  # exactly found / 10. voc_eval's np.arange(0, 1.1, 0.1)[found] is a hair above it, so that
  # threshold gets no precision by default; the exact tenths give it precision 1.
  boxes = [[10 * i, 0, 10 * i + 5, 5] for i in range(10)]
  far = [[0, 50 + 10 * i, 5, 55 + 10 * i] for i in range(fp_after)]
  scores = np.linspace(0.9, 0.1, found + fp_after)
  dets = _det(boxes[:found] + far, scores, [1] * (found + fp_after))
  gts = [_gt(boxes, [1] * 10)]
  assert voc.VOC07_RECALL_THRESHOLDS[found] > found / 10
  default = voc.evaluate([dets], gts, 1)
  exact = voc.evaluate([dets], gts, 1, exact_tenths=True)
  assert default["ap"][0] == pytest.approx(found / 11, abs=1e-15)
  assert exact["ap"][0] == pytest.approx((found + 1) / 11, abs=1e-15)
  assert not default["exact_tenths"] and exact["exact_tenths"]
  # The area metric does not use thresholds.
  assert (voc.evaluate([dets], gts, 1, use_07_metric=False)["ap"][0] ==
          voc.evaluate([dets], gts, 1, use_07_metric=False, exact_tenths=True)["ap"][0])


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
    out = voc.evaluate(dets, gts, num_classes, iou_threshold=threshold, use_07_metric=use_07,
                       exact_tenths=True)
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


# ------------------------------------- py-faster-rcnn's lib/datasets/voc_eval.py, line by line
# voc_ap and the matching loop of voc_eval (rbgirshick/py-faster-rcnn master, with its eps guard
# on the precision), fed one class's boxes in its 1-based inclusive convention (our x1 + 1,
# y1 + 1, x2, y2: DESIGN.md's VOC conversion, reversed) instead of files.


def voc_ap(rec, prec, use_07_metric=False):
  if use_07_metric:
    ap = 0.
    for t in np.arange(0., 1.1, 0.1):
      if np.sum(rec >= t) == 0:
        p = 0
      else:
        p = np.max(prec[rec >= t])
      ap = ap + p / 11.
  else:
    mrec = np.concatenate(([0.], rec, [1.]))
    mpre = np.concatenate(([0.], prec, [0.]))
    for i in range(mpre.size - 1, 0, -1):
      mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
  return ap


def voc_eval(dets, gts, classname, ovthresh=0.5, use_07_metric=False):
  class_recs = {}
  npos = 0
  imagenames = list(range(len(gts)))
  for imagename in imagenames:
    g = gts[imagename]
    keep = np.asarray(g["labels"]) == classname
    bbox = np.asarray(g["boxes"], float)[keep] + [1, 1, 0, 0]
    difficult = np.asarray(g["difficult"])[keep].astype(bool)
    det = [False] * len(bbox)
    npos = npos + sum(~difficult)
    class_recs[imagename] = {'bbox': bbox, 'difficult': difficult, 'det': det}

  image_ids, confidence, BB = [], [], []
  for imagename in imagenames:
    d = dets[imagename]
    for k in np.flatnonzero(np.asarray(d["labels"]) == classname):
      image_ids.append(imagename)
      confidence.append(float(d["scores"][k]))
      BB.append(np.asarray(d["boxes"][k], float) + [1, 1, 0, 0])
  confidence = np.array(confidence)
  BB = np.array(BB).reshape(-1, 4)

  sorted_ind = np.argsort(-confidence)
  BB = BB[sorted_ind, :]
  image_ids = [image_ids[x] for x in sorted_ind]

  nd = len(image_ids)
  tp = np.zeros(nd)
  fp = np.zeros(nd)
  for d in range(nd):
    R = class_recs[image_ids[d]]
    bb = BB[d, :].astype(float)
    ovmax = -np.inf
    BBGT = R['bbox'].astype(float)
    if BBGT.size > 0:
      ixmin = np.maximum(BBGT[:, 0], bb[0])
      iymin = np.maximum(BBGT[:, 1], bb[1])
      ixmax = np.minimum(BBGT[:, 2], bb[2])
      iymax = np.minimum(BBGT[:, 3], bb[3])
      iw = np.maximum(ixmax - ixmin + 1., 0.)
      ih = np.maximum(iymax - iymin + 1., 0.)
      inters = iw * ih
      uni = ((bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.) +
             (BBGT[:, 2] - BBGT[:, 0] + 1.) * (BBGT[:, 3] - BBGT[:, 1] + 1.) - inters)
      overlaps = inters / uni
      ovmax = np.max(overlaps)
      jmax = np.argmax(overlaps)
    if ovmax > ovthresh:
      if not R['difficult'][jmax]:
        if not R['det'][jmax]:
          tp[d] = 1.
          R['det'][jmax] = 1
        else:
          fp[d] = 1.
    else:
      fp[d] = 1.

  fp = np.cumsum(fp)
  tp = np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  ap = voc_ap(rec, prec, use_07_metric)
  return rec, prec, ap


def _random_float_case(rng, num_images, num_classes):
  """Continuous boxes (no IoU lands on the threshold) and distinct scores (no ties, which
  voc_eval's unstable argsort would order arbitrarily)."""
  gts, dets = [], []
  for _ in range(num_images):
    g = int(rng.integers(0, 6))
    xy = rng.uniform(0, 80, size=(g, 2))
    gt_boxes = np.concatenate([xy, xy + rng.uniform(4, 40, size=(g, 2))], 1)
    gt_labels = rng.integers(1, num_classes + 1, size=g)
    gts.append(_gt(gt_boxes, gt_labels, rng.random(g) < 0.15))
    k = int(rng.integers(0, 8))
    src = rng.integers(0, max(g, 1), size=k)
    near = (gt_boxes[src] + rng.normal(size=(k, 4)) * 3) if g else rng.uniform(0, 80, (k, 4))
    xy = rng.uniform(0, 80, size=(k, 2))
    far = np.concatenate([xy, xy + rng.uniform(2, 40, size=(k, 2))], 1)
    boxes = np.where((rng.random(k) < 0.75)[:, None], near, far)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    labels = np.where(rng.random(k) < 0.85, gt_labels[src] if g else 1,
                      rng.integers(1, num_classes + 1, size=k))
    dets.append(_det(boxes, rng.random(k), labels))
  return dets, gts


def _landing_case(rng, npos, found):
  """One class, `npos` objects in one image; the top `found` detections hit distinct objects,
  then misses and hits mixed: recall passes exactly found / npos."""
  xy = np.arange(npos)[:, None] * [50.0, 0.0]
  gt = np.concatenate([xy, xy + 30.0], 1)
  hits = gt[rng.permutation(npos)] + rng.uniform(-1, 1, size=(npos, 4))
  misses = np.concatenate([np.full((4, 1), 10.0), np.arange(4)[:, None] * 40 + 100.0,
                           np.full((4, 1), 30.0), np.arange(4)[:, None] * 40 + 130.0], 1)
  order = list(hits[:found]) + list(misses[:2]) + list(hits[found:]) + list(misses[2:])
  scores = np.linspace(1.0, 0.01, len(order))
  return [_det(np.array(order), scores, [1] * len(order))], [_gt(gt, [1] * npos)]


def test_eleven_point_ap_matches_py_faster_rcnn_voc_eval():
  rng = np.random.default_rng(7)
  cases = [(*_random_float_case(rng, int(rng.integers(1, 8)), n), n)
           for n in rng.integers(1, 4, size=60)]
  # Recall landing exactly on 3/10, 6/10 and 7/10 (and 3/10 again as 6/20, 7/10 as 14/20).
  landings = [(10, 3), (10, 6), (10, 7), (20, 6), (20, 14)]
  cases += [(*_landing_case(rng, npos, found), 1) for npos, found in landings]
  differs = 0
  for trial, (dets, gts, num_classes) in enumerate(cases):
    for use_07 in (True, False):
      out = voc.evaluate(dets, gts, num_classes, use_07_metric=use_07)
      for c in range(1, num_classes + 1):
        npos = sum(int(np.sum((np.asarray(g["labels"]) == c) & ~np.asarray(g["difficult"])))
                   for g in gts)
        if npos == 0:
          assert np.isnan(out["ap"][c - 1])
          continue
        rec, prec, ap = voc_eval(dets, gts, c, 0.5, use_07)
        assert out["ap"][c - 1] == pytest.approx(ap, abs=1e-12), (trial, c, use_07)
        exact = voc.evaluate(dets, gts, num_classes, use_07_metric=use_07, exact_tenths=True)
        differs += use_07 and abs(exact["ap"][c - 1] - ap) > 1e-9
  assert differs >= len(landings)     # the exact tenths differ exactly where recall lands
