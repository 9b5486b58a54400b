"""COCO detection metrics (AP@[.5:.95], AP50, AP75, APs/m/l, AR) through pycocotools.

At most 100 detections per image count (COCO's maxDets). Takes the same per-image lists as `frcnn_jax.evaluation.voc.evaluate`, so it serves COCO and
gives an extra view on VOC. The COCO objects are built in memory; pycocotools' console output
is captured and returned as `"summary"`.

Conventions: boxes go to COCO as [x, y, w, h] with w = x2 - x1 (continuous, like pycocotools'
own IoU). Ground truth flagged "difficult" (VOC) or crowd becomes `iscrowd=1`: detections
matched to it are ignored, as pycocotools does for crowds (note that a crowd's overlap is
intersection / detection area, not IoU, so this is close to but not the same as VOC's rule for
difficult objects). Object areas for the small/medium/large split are box areas w * h, since
there are no masks. Entries pycocotools reports as -1 (no ground truth in that range) are NaN.
"""

import contextlib
import io
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn_jax.evaluation.voc import check_inputs

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _annotation(ann_id: int, image_id: int, box: np.ndarray, label: int, **extra) -> dict:
  x1, y1, x2, y2 = (float(v) for v in box)
  w, h = x2 - x1, y2 - y1
  return {"id": ann_id, "image_id": image_id, "category_id": int(label),
          "bbox": [x1, y1, w, h], "area": w * h, **extra}


def _coco(images: list, categories: list, annotations: list) -> COCO:
  coco = COCO()
  coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
  coco.createIndex()
  return coco


def evaluate(detections: Sequence[Mapping[str, np.ndarray]],
             ground_truths: Sequence[Mapping[str, np.ndarray]], num_classes: int) -> dict:
  """COCO box metrics of per-image detections.

  Args:
    detections: one dict per image: "boxes" [K, 4] xyxy, "scores" [K], "labels" [K] in 1..C.
    ground_truths: one dict per image: "boxes" [G, 4] xyxy, "labels" [G] in 1..C, and optional
      "difficult" bool [G] (difficult or crowd objects), which become `iscrowd=1`.
    num_classes: C, foreground classes.

  Returns:
    {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
     "ARl": float (NaN where there is no ground truth), "map": float (== "AP"),
     "ap": float64 [C] per-class AP@[.5:.95] (NaN for classes without ground truth),
     "ap50": float64 [C] per-class AP at IoU 0.5, "summary": str (pycocotools' table)}.

  Raises:
    ValueError: as `frcnn_jax.evaluation.voc.check_inputs`.
  """
  pairs = check_inputs(detections, ground_truths, num_classes)
  images = [{"id": i + 1} for i in range(len(pairs))]
  categories = [{"id": c} for c in range(1, num_classes + 1)]
  gt_anns, dt_anns = [], []
  for i, (det, gt) in enumerate(pairs):
    for box, label, crowd in zip(gt["boxes"], gt["labels"], gt["difficult"]):
      gt_anns.append(_annotation(len(gt_anns) + 1, i + 1, box, label, iscrowd=int(crowd)))
    for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
      dt_anns.append(_annotation(len(dt_anns) + 1, i + 1, box, label, score=float(score),
                                 iscrowd=0))

  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = _coco(images, categories, gt_anns)
    coco_dt = _coco(images, categories, dt_anns)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.imgIds = [im["id"] for im in images]
    ev.params.catIds = [c["id"] for c in categories]
    ev.evaluate()
    ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      ev.summarize()
  stats = np.where(ev.stats < 0, np.nan, ev.stats)
  # precision: [T IoU thresholds, R recall points, K classes, A area ranges, M maxDets]; a
  # class without ground truth is -1 throughout, the others are filled in completely.
  precision = ev.eval["precision"][:, :, :, 0, -1]
  has_gt = precision[0, 0] > -1
  per_class = np.where(has_gt, precision.mean((0, 1)), np.nan)
  per_class50 = np.where(has_gt, precision[0].mean(0), np.nan)
  result = {name: float(v) for name, v in zip(STAT_NAMES, stats)}
  result.update(map=result["AP"], ap=per_class, ap50=per_class50, summary=summary.getvalue())
  return result
