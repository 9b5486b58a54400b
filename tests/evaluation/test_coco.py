"""Tests for frcnn_jax/evaluation/coco.py (pycocotools from in-memory lists)."""

import numpy as np
import pytest

from frcnn_jax.evaluation import coco


def _det(boxes, scores, labels):
  return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
          "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int32)}


def _gt(boxes, labels, difficult=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult)
  return {"boxes": boxes, "labels": np.asarray(labels, np.int32), "difficult": difficult}


BIG = [0, 0, 100, 100]          # area 10000: "large"
SMALL = [200, 200, 220, 220]    # area 400: "small"


def test_perfect_detections(capsys):
  gts = [_gt([BIG, SMALL], [1, 2]), _gt([BIG], [2])]
  dets = [_det([BIG, SMALL], [0.9, 0.8], [1, 2]), _det([BIG], [0.7], [2])]
  out = coco.evaluate(dets, gts, num_classes=2)
  for key in ("AP", "AP50", "AP75", "APs", "APl", "AR100", "map"):
    assert out[key] == pytest.approx(1.0), key
  assert np.isnan(out["APm"])                 # no medium objects
  np.testing.assert_allclose(out["ap"], [1.0, 1.0])
  assert "Average Precision" in out["summary"]
  assert capsys.readouterr().out == ""        # pycocotools' prints are captured


def test_shifted_box_passes_iou_50_but_not_75():
  # Shift by 30 px: IoU = 70 * 100 / (130 * 100) = 0.538, matched only at the 0.5 threshold.
  out = coco.evaluate([_det([[30, 0, 130, 100]], [0.9], [1])], [_gt([BIG], [1])], 1)
  assert out["AP50"] == pytest.approx(1.0)
  assert out["AP75"] == 0.0
  assert out["AP"] == pytest.approx(0.1)      # 1 of the 10 thresholds .50:.05:.95
  np.testing.assert_allclose(out["ap50"], [1.0])


def test_shift_inside_threshold_range():
  # Shift by 10 px: IoU = 90 / 110 = 0.818: matched at .50, .55, ..., .80 (7 of 10).
  out = coco.evaluate([_det([[10, 0, 110, 100]], [0.9], [1])], [_gt([BIG], [1])], 1)
  assert out["AP75"] == pytest.approx(1.0)
  assert out["AP"] == pytest.approx(0.7)


def test_difficult_ground_truth_is_ignored():
  gts = [_gt([BIG, SMALL], [1, 1], [False, True])]
  with_hit = coco.evaluate([_det([SMALL, BIG], [0.95, 0.9], [1, 1])], gts, 1)
  without = coco.evaluate([_det([BIG], [0.9], [1])], gts, 1)
  assert with_hit["AP"] == pytest.approx(1.0)
  assert without["AP"] == pytest.approx(1.0)


def test_class_without_gt_and_no_detections():
  out = coco.evaluate([_det([], [], [])], [_gt([BIG], [1])], 2)
  assert out["AP"] == 0.0
  assert out["ap"][0] == 0.0 and np.isnan(out["ap"][1])


def test_bad_labels_raise():
  with pytest.raises(ValueError, match="labels must lie in 1..1"):
    coco.evaluate([_det([BIG], [0.9], [2])], [_gt([BIG], [1])], 1)
