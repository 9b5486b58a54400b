"""PASCAL VOC detection metrics: per-class average precision and mAP.

Follows the VOCdevkit's `VOCevaldet.m` / `VOCap.m` rules, on host NumPy arrays:

* The detections of one class are ranked by score over all images with a *stable* sort, so
  detections with equal scores keep their input order (image order, then order within the
  image). This is the devkit's MATLAB `sort`, which is stable, fed with a results file written
  in image order. (py-faster-rcnn's `np.argsort(-confidence)` is not stable; ties there fall in
  an unspecified order.)
* A detection is compared with every ground-truth box of its class in its image (difficult and
  already-matched boxes included) and takes the one with the highest IoU; among equal IoUs the
  first box wins (the devkit's strict `ov > ovmax`).
* It is a match when that IoU is `> iou_threshold` (as py-faster-rcnn's `voc_eval`;
  the MATLAB devkit uses `>=`, which differs only at an IoU of exactly the threshold).
* A match on a difficult box is ignored (neither true nor false positive); a match on a box
  already taken by a higher-ranked detection is a false positive (the devkit does not fall back
  to the second-best box); no match is a false positive.
* Recall counts the non-difficult ground truth of the class (`npos`). A class with `npos == 0`
  gets AP NaN, is listed in `classes_without_gt` and left out of the mean.
* `use_07_metric`: VOC2007's 11-point interpolated AP, the mean over t in {0, 0.1, ..., 1} of
  the highest precision at recall >= t (0 where none). By default the thresholds are
  py-faster-rcnn `voc_eval`'s `np.arange(0., 1.1, .1)` compared with the float64 recall
  `tp / npos`, as Detectron2 and mmdetection do: that array holds 0.30000000000000004,
  0.6000000000000001 and 0.7000000000000001, so a recall of exactly 3/10, 6/10 or 7/10 counts
  as below its threshold. `exact_tenths=True` compares with the exact tenths instead
  (`tp * 10 >= k * npos` in integers). Otherwise (VOC2010+): the area under the monotone
  (right-to-left running maximum) precision envelope.
* Ignored detections are dropped from the ranking before precision and recall are computed.
  They would only repeat the previous precision-recall point (or give 0/0 before the first
  true or false positive), which changes neither AP definition. A class whose detections are
  all ignored or absent has AP 0 (the devkit's MATLAB would give NaN for the all-ignored case).

IoU: continuous coordinates as everywhere in frcnn_jax (width = x2 - x1, no "+1"). In exact
arithmetic this equals the devkit's "+1" IoU under the VOC conversion of docs/conventions.md:
the devkit's 1-based inclusive box [xmin, xmax] is our [xmin - 1, xmax], so its width xmax -
xmin + 1 is our x2 - x1 and its intersection min(xmax) - max(xmin) + 1 is our min(x2) - max(x1),
and its `iw > 0` test is ours. This holds for detections too when they are written for the
devkit with the same map (xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2). py-faster-rcnn's
0-based inclusive boxes (x1_p = xmin - 1, x2_p = xmax - 1, written out with +1 on all four) are
ours with x2 = x2_p + 1, so its `voc_eval` agrees as well. Not equivalent: (a) feeding our boxes
to the devkit unmapped (xmin = x1): it then sees every detection one pixel wider and taller,
which changes IoUs noticeably for small objects; (b) floating-point rounding: the devkit adds
and subtracts 1 in double precision, we do not, so an IoU can differ in its last bits, which
matters only for an IoU exactly at the threshold (where the devkit's `>=` and our `>` already
differ).
"""

from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np


def _as_boxes(value, what: str) -> np.ndarray:
  boxes = np.asarray(value, dtype=np.float64)
  if boxes.size == 0:
    return boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{what}: boxes must have shape [N, 4], got {boxes.shape}")
  if not np.all(np.isfinite(boxes)):
    raise ValueError(f"{what}: boxes contain non-finite values")
  if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
    raise ValueError(f"{what}: boxes must satisfy x2 >= x1 and y2 >= y1")
  return boxes


def _as_vector(value, n: int, dtype, what: str) -> np.ndarray:
  vec = np.asarray(value)
  if vec.shape != (n,):
    raise ValueError(f"{what}: expected shape [{n}], got {vec.shape}")
  return vec.astype(dtype)


def _as_labels(value, n: int, num_classes: int, what: str) -> np.ndarray:
  labels = _as_vector(value, n, np.int64, f"{what}['labels']")
  if labels.size and (labels.min() < 1 or labels.max() > num_classes):
    raise ValueError(
        f"{what}: labels must lie in 1..{num_classes}, got values in "
        f"{labels.min()}..{labels.max()}")
  return labels


def check_inputs(detections: Sequence[Mapping[str, np.ndarray]],
                 ground_truths: Sequence[Mapping[str, np.ndarray]],
                 num_classes: int) -> list[tuple[dict, dict]]:
  """Validates and normalises per-image detections and ground truth.

  Args:
    detections: one dict per image: "boxes" [K, 4] xyxy, "scores" [K], "labels" [K] in 1..C.
    ground_truths: one dict per image: "boxes" [G, 4] xyxy, "labels" [G] in 1..C, optional
      "difficult" bool [G] (default all False).
    num_classes: C, foreground classes.

  Returns:
    One (detection, ground truth) pair per image: float64 boxes and scores, int64 labels,
    bool difficult, with empty inputs shaped [0, 4] / [0].

  Raises:
    ValueError: on mismatched lengths, bad shapes, non-finite or inverted boxes, non-finite
      scores, labels outside 1..C, or a non-positive `num_classes`.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if len(detections) != len(ground_truths):
    raise ValueError(f"detections has {len(detections)} images but ground_truths has "
                     f"{len(ground_truths)}")
  pairs = []
  for i, (det, gt) in enumerate(zip(detections, ground_truths)):
    gt_boxes = _as_boxes(gt["boxes"], f"ground_truths[{i}]")
    g = len(gt_boxes)
    difficult = _as_vector(gt.get("difficult", np.zeros(g, bool)), g, bool,
                           f"ground_truths[{i}]['difficult']")
    det_boxes = _as_boxes(det["boxes"], f"detections[{i}]")
    k = len(det_boxes)
    scores = _as_vector(det["scores"], k, np.float64, f"detections[{i}]['scores']")
    if not np.all(np.isfinite(scores)):
      raise ValueError(f"detections[{i}]: scores contain non-finite values")
    pairs.append((
        {"boxes": det_boxes, "scores": scores,
         "labels": _as_labels(det["labels"], k, num_classes, f"detections[{i}]")},
        {"boxes": gt_boxes, "difficult": difficult,
         "labels": _as_labels(gt["labels"], g, num_classes, f"ground_truths[{i}]")}))
  return pairs


def pairwise_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
  """IoU in continuous coordinates (no "+1"), 0 where the union is empty.

  Args:
    boxes1: [N, 4] xyxy boxes.
    boxes2: [M, 4] xyxy boxes.

  Returns:
    [N, M] float64 IoU.
  """
  b1 = boxes1[:, None, :]
  b2 = boxes2[None, :, :]
  iw = np.clip(np.minimum(b1[..., 2], b2[..., 2]) - np.maximum(b1[..., 0], b2[..., 0]), 0, None)
  ih = np.clip(np.minimum(b1[..., 3], b2[..., 3]) - np.maximum(b1[..., 1], b2[..., 1]), 0, None)
  inter = iw * ih
  area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
  area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
  union = area1 + area2 - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)   # py-faster-rcnn voc_eval's, 11 values


def average_precision(precision: np.ndarray, recall: np.ndarray, tp_cumsum: np.ndarray,
                      npos: int, use_07_metric: bool, exact_tenths: bool = False) -> float:
  """AP of one ranked list of true/false positives.

  Args:
    precision: [N] precision after each ranked detection.
    recall: [N] recall after each ranked detection (`tp_cumsum / npos`).
    tp_cumsum: [N] int, true positives among the first i + 1 detections.
    npos: number of (non-difficult) ground-truth objects, > 0.
    use_07_metric: 11-point interpolated AP (VOC2007) instead of the area under the
      monotone precision envelope (VOC2010+).
    exact_tenths: 11-point thresholds at the exact tenths instead of voc_eval's
      `np.arange(0, 1.1, 0.1)`.

  Returns:
    The average precision in [0, 1].
  """
  if use_07_metric:
    if exact_tenths:
      reached = tp_cumsum[None, :] * 10 >= np.arange(11)[:, None] * npos    # [11, N]
    else:
      reached = recall[None, :] >= VOC07_RECALL_THRESHOLDS[:, None]
    best = np.max(np.where(reached, precision[None, :], 0.0), axis=1, initial=0.0)
    return float(np.sum(best) / 11.0)
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  step = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def _best_matches(det_boxes: np.ndarray, det_labels: np.ndarray, gt_boxes: np.ndarray,
                  gt_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For each detection: highest IoU with a same-class gt box and that box's index (-1: none)."""
  k = len(det_boxes)
  if k == 0 or len(gt_boxes) == 0:
    return np.full(k, -np.inf), np.full(k, -1, np.int64)
  iou = pairwise_iou(det_boxes, gt_boxes)
  iou = np.where(det_labels[:, None] == gt_labels[None, :], iou, -np.inf)
  best = np.argmax(iou, axis=1)          # first index among ties, as the devkit
  ovmax = iou[np.arange(k), best]
  return ovmax, np.where(np.isfinite(ovmax), best, -1)


def evaluate(detections: Sequence[Mapping[str, np.ndarray]],
             ground_truths: Sequence[Mapping[str, np.ndarray]], num_classes: int,
             iou_threshold: float = 0.5, use_07_metric: bool = True,
             exact_tenths: bool = False) -> dict:
  """PASCAL VOC average precision per class and its mean.

  Args:
    detections: one dict per image: "boxes" [K, 4] xyxy, "scores" [K], "labels" [K] int in
      1..num_classes.
    ground_truths: one dict per image, aligned with `detections`: "boxes" [G, 4] xyxy,
      "labels" [G] int in 1..num_classes, "difficult" bool [G] (optional, default False).
    num_classes: C, foreground classes.
    iou_threshold: a detection matches when its best IoU is > this.
    use_07_metric: 11-point AP (VOC2007) if True, else the area under the precision envelope.
    exact_tenths: with use_07_metric, recall thresholds at the exact tenths instead of
      py-faster-rcnn voc_eval's `np.arange(0, 1.1, 0.1)` (the default, module docstring).

  Returns:
    {"ap": float64 [C] (ap[c - 1] is label c; NaN for classes without non-difficult ground
     truth), "map": float (mean over the finite entries of "ap"; NaN if there are none),
     "classes_without_gt": list of labels with no non-difficult ground truth,
     "npos": int64 [C] non-difficult ground-truth counts,
     "num_detections": int64 [C] ranked (non-ignored) detections per class,
     "num_ignored": int64 [C] detections ignored for matching a difficult box,
     "precision", "recall": lists of C float64 arrays, the curves over the ranked detections,
     "iou_threshold": float, "use_07_metric": bool, "exact_tenths": bool}.

  Raises:
    ValueError: on mismatched lengths, bad shapes, non-finite boxes or scores, labels
      outside 1..C, or a non-positive `num_classes`.
  """
  pairs = check_inputs(detections, ground_truths, num_classes)
  all_scores, all_labels, all_ovmax, all_gid, all_diff = [], [], [], [], []
  npos = np.zeros(num_classes, np.int64)
  gt_offset = 0
  for det, gt in pairs:
    gt_boxes, gt_labels, difficult = gt["boxes"], gt["labels"], gt["difficult"]
    det_boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
    g, k = len(gt_boxes), len(det_boxes)
    npos += np.bincount(gt_labels[~difficult] - 1, minlength=num_classes)
    ovmax, best = _best_matches(det_boxes, labels, gt_boxes, gt_labels)
    all_scores.append(scores)
    all_labels.append(labels)
    all_ovmax.append(ovmax)
    all_gid.append(np.where(best >= 0, best + gt_offset, -1))
    all_diff.append((best >= 0) & difficult[np.maximum(best, 0)] if g else np.zeros(k, bool))
    gt_offset += g

  scores = np.concatenate([np.zeros(0), *all_scores])
  labels = np.concatenate([np.zeros(0, np.int64), *all_labels])
  ovmax = np.concatenate([np.zeros(0), *all_ovmax])
  gid = np.concatenate([np.zeros(0, np.int64), *all_gid])
  best_difficult = np.concatenate([np.zeros(0, bool), *all_diff])
  matched = ovmax > iou_threshold

  ap = np.full(num_classes, np.nan)
  num_dets = np.zeros(num_classes, np.int64)
  num_ignored = np.zeros(num_classes, np.int64)
  precisions, recalls = [], []
  for c in range(1, num_classes + 1):
    idx = np.flatnonzero(labels == c)
    order = idx[np.argsort(-scores[idx], kind="stable")]
    ignored = matched[order] & best_difficult[order]
    num_ignored[c - 1] = np.count_nonzero(ignored)
    order = order[~ignored]
    hit = np.flatnonzero(matched[order])
    _, first = np.unique(gid[order[hit]], return_index=True)
    tp = np.zeros(len(order), bool)
    tp[hit[first]] = True
    tp_cumsum = np.cumsum(tp)
    fp_cumsum = np.cumsum(~tp)
    precision = tp_cumsum / np.maximum(tp_cumsum + fp_cumsum, 1)
    recall = tp_cumsum / max(npos[c - 1], 1)
    precisions.append(precision)
    recalls.append(recall)
    num_dets[c - 1] = len(order)
    if npos[c - 1] > 0:
      ap[c - 1] = average_precision(precision, recall, tp_cumsum, int(npos[c - 1]),
                                    use_07_metric, exact_tenths)
  finite = np.isfinite(ap)
  return {
      "ap": ap,
      "map": float(np.mean(ap[finite])) if finite.any() else float("nan"),
      "classes_without_gt": [int(c) + 1 for c in np.flatnonzero(~finite)],
      "npos": npos,
      "num_detections": num_dets,
      "num_ignored": num_ignored,
      "precision": precisions,
      "recall": recalls,
      "iou_threshold": float(iou_threshold),
      "use_07_metric": bool(use_07_metric),
      "exact_tenths": bool(exact_tenths),
  }
