"""experiments/coco.py end to end on a tiny COCO-format json folder written by the test."""

import json
import os

import numpy as np

from frcnn_jax import train
from frcnn_jax.config import flags as config_flags
from tests.data import conftest as trees

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(ROOT, "experiments", "coco.py")

# experiments/coco.py with every size scaled down (data paths set by the test).
TINY = {
    "data.min_size": 64, "data.max_size": 64, "data.pad_hw": (64, 64), "data.max_gt": 8,
    "data.num_workers": 0, "data.prefetch": 1,
    "model.pretrained": "", "model.vgg16.width": 0.125, "model.vgg16.convs_per_block": (1, 1, 1, 1, 1),
    "model.fc.dim": 32, "anchors.sizes": (8, 16, 32, 64),
    "rpn.pre_nms_top_n_train": 64, "rpn.post_nms_top_n_train": 16,
    "rpn.pre_nms_top_n_test": 64, "rpn.post_nms_top_n_test": 8, "rpn.batch_size_per_image": 32,
    "roi.batch_size_per_image": 16, "test.detections_per_image": 10,
    "train.batch_size": 2, "train.num_steps": 3, "train.lr_boundaries": (), "train.log_every": 1,
    "train.checkpoint_every": 3, "eval.batch_size": 2,
}


def _spec(names, objects):
  """A COCO json: images `names` (64 x 48), annotations (image index, category, bbox, crowd)."""
  images = [{"id": 10 + i, "file_name": f"{n}.jpg", "width": trees.WIDTH,
             "height": trees.HEIGHT} for i, n in enumerate(names)]
  annotations = [{"id": j + 1, "image_id": 10 + i, "category_id": cat, "bbox": list(bbox),
                  "area": float(bbox[2] * bbox[3]), "iscrowd": crowd}
                 for j, (i, cat, bbox, crowd) in enumerate(objects)]
  categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
  return {"images": images, "annotations": annotations, "categories": categories}


def test_coco_config_trains_and_evaluates_with_coco_ap(tmp_path):
  train_spec = _spec(["t0", "t1", "t2", "empty", "crowd_only"], [
      (0, 1, (4.0, 6.0, 20.0, 30.0), 0), (1, 3, (30.0, 10.0, 24.0, 16.0), 0),
      (2, 1, (10.0, 2.0, 16.0, 40.0), 0), (2, 3, (36.0, 20.0, 20.0, 20.0), 0),
      (4, 1, (0.0, 0.0, 64.0, 48.0), 1)])
  eval_spec = _spec(["v0", "v1", "v2"], [
      (0, 1, (5.0, 5.0, 20.0, 30.0), 0), (1, 3, (28.0, 12.0, 24.0, 16.0), 0),
      (2, 1, (10.0, 4.0, 16.0, 40.0), 0), (2, 3, (0.0, 0.0, 64.0, 48.0), 1)])
  root = tmp_path / "coco"
  trees.write_coco(root / "train", train_spec)
  trees.write_coco(root / "val", eval_spec)
  overrides = {**TINY, "data.coco_json.data_dir": str(root),
               "data.coco_json.train_json": "train/annotations/instances_train.json",
               "data.coco_json.train_images": "train/images",
               "data.coco_json.eval_json": "val/annotations/instances_train.json",
               "data.coco_json.eval_images": "val/images"}
  config = config_flags.load_config(COCO, overrides)
  assert config.eval.metric == "coco" and len(config.anchors.sizes) == 4
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 3
  assert all(np.isfinite(v) for k, v in result["train"].items()
             if k in ("rpn_cls", "rpn_box", "det_cls", "det_box", "total"))
  (name,) = [f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".json")]
  with open(os.path.join(workdir, "eval", name)) as f:
    report = json.load(f)
  assert (report["metric"], report["step"], report["num_images"]) == ("coco", 3, 3)
  assert set(report["ap"]) == {"person", "car"} and 0.0 <= report["map"] <= 1.0
  assert {"AP", "AP50", "AP75"} <= set(report["coco"])
  assert report["coco"]["AP"] == report["map"]
  assert result["eval"]["map"] == report["map"]
