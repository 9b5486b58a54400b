"""COCO-format json datasets (`instances_*.json` + an image folder): COCO itself or custom data.

Boxes: COCO's [x, y, w, h] (continuous pixels) -> xyxy (x, y, x + w, y + h). Categories:
sorted by id and numbered 1..C (`classes` holds their names, `category_ids[c - 1]` the json id
of label c). Crowd annotations (iscrowd = 1): dropped when `drop_crowd` (training), otherwise
kept with difficult = True (evaluation), so that the VOC-style evaluator neither rewards nor
penalises detections on crowd regions. Images without annotations are kept as all-background.
Annotations are checked when the source is built; images are decoded when a record is read.
"""

import collections
import dataclasses
import json
import os
from typing import Any

import numpy as np

from frcnn_jax.config.fields import setting
from frcnn_jax.data import images
from frcnn_jax.data.sources import base


class COCOJsonSource(base.IndexedFileSource):
  """Random-access source over a COCO-format json, yielding Example dicts (docs/conventions.md).

  `source[i]` returns the Example of the i-th image of the json's "images" list that survived
  the checks, or None when its image cannot be decoded (or its size differs from the json's)
  and the policy is "skip"; under "error" it raises ValueError naming the file.
  `annotation(i)` returns its annotation fields without reading the image.

  Attributes:
    classes: category names in increasing category id order.
    category_ids: [C] json category id of each label (label c -> category_ids[c - 1]).
    coco_ids: int64 [len] json image id of each record (image_id i -> coco_ids[i]).
  """

  def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, *,
               drop_crowd: bool = True, bad_input: str = "skip"):
    """Loads and checks the json.

    Args:
      annotation_file: the COCO-format json (e.g. annotations/instances_train2017.json).
      image_dir: folder that the images' `file_name`s are relative to.
      drop_crowd: drop crowd boxes (training) instead of keeping them as difficult.
      bad_input: "skip" or "error" (see frcnn_jax/data/sources/base.py).

    Raises:
      FileNotFoundError: the json or the image folder is missing.
      ValueError: the json is unreadable or has no categories; bad annotations under
        bad_input="error".
    """
    annotation_file, image_dir = os.fspath(annotation_file), os.fspath(image_dir)
    for path, what in ((annotation_file, "annotation json"), (image_dir, "image folder")):
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"COCO {what} {path} not found: download e.g. annotations_trainval2017.zip and "
            "train2017.zip/val2017.zip from https://cocodataset.org and unzip them, then set "
            "data.coco_json.train_json/data.coco_json.train_images (and the eval ones) to these paths")
    try:
      with open(annotation_file) as f:
        data = json.load(f)
      categories = sorted(data["categories"], key=lambda c: int(c["id"]))
      image_infos = data["images"]
      annotations = data.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{annotation_file}: unreadable COCO json ({e!r})") from e
    if not categories:
      raise ValueError(f"{annotation_file}: no categories")
    self.classes = tuple(str(c["name"]) for c in categories)
    self.category_ids = tuple(int(c["id"]) for c in categories)
    super().__init__(f"coco_json:{os.path.basename(annotation_file)}", bad_input)
    self._drop_crowd = drop_crowd
    label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

    by_image = collections.defaultdict(list)
    known_ids = {info.get("id") for info in image_infos}
    for ann in annotations:
      if ann.get("image_id") not in known_ids:
        self.bad_input_log.skip(annotation_file, f"annotation {ann.get('id')} refers to "
                                f"unknown image id {ann.get('image_id')}")
        continue
      by_image[ann["image_id"]].append(ann)

    coco_ids = []
    for info in image_infos:
      path = os.path.join(image_dir, str(info.get("file_name", "")))
      where = f"{annotation_file} image {info.get('id')} ({info.get('file_name')})"
      if "id" not in info or "file_name" not in info:
        self.bad_input_log.skip(where, "image entry without id or file_name")
        continue
      if not os.path.isfile(path):
        self.bad_input_log.skip(where, f"image file {path} not found")
        continue
      try:
        hw = int(info["height"]), int(info["width"])
        if min(hw) <= 0:
          raise ValueError("non-positive size")
      except (KeyError, TypeError, ValueError):
        try:
          hw = images.image_size(path)
        except images.ImageDecodeError as e:
          self.bad_input_log.skip(where, f"no size in the json and {e}")
          continue
      boxes, labels, difficult = self._objects(by_image[info["id"]], label_of, where)
      boxes, keep = base.clean_boxes(boxes, hw, where, self.bad_input_log)
      self._paths.append(path)
      self._names.append(os.path.splitext(str(info["file_name"]))[0])
      self._hw.append(hw)
      self._boxes.append(boxes)
      self._labels.append(labels[keep])
      self._difficult.append(difficult[keep])
      coco_ids.append(int(info["id"]))
    self.coco_ids = np.array(coco_ids, np.int64)
    if not self._paths:
      raise ValueError(f"{annotation_file}: no usable image in {image_dir} "
                       f"({self.bad_input_log.summary()})")
    self.bad_input_log.log_summary(self.name)

  def _objects(self, anns: list[dict[str, Any]], label_of: dict[int, int],
               where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Converts one image's annotations: [K, 4] xyxy boxes, [K] labels, [K] difficult."""
    boxes, labels, difficult = [], [], []
    for ann in anns:
      crowd = bool(ann.get("iscrowd", 0))
      if crowd and self._drop_crowd:
        continue
      label = label_of.get(ann.get("category_id"))
      if label is None:
        self.bad_input_log.skip(where, f"annotation {ann.get('id')}: unknown category id "
                                f"{ann.get('category_id')}")
        continue
      try:
        x, y, w, h = (float(v) for v in ann["bbox"])
      except (KeyError, TypeError, ValueError):
        self.bad_input_log.skip(where, f"annotation {ann.get('id')}: unreadable bbox "
                                f"{ann.get('bbox')!r}")
        continue
      boxes.append((x, y, x + w, y + h))
      labels.append(label)
      difficult.append(crowd)
    return (np.array(boxes, np.float64).reshape(-1, 4), np.array(labels, np.int32),
            np.array(difficult, bool))

  def __repr__(self) -> str:
    return f"COCOJsonSource({self.name}, {len(self)} images, {len(self.classes)} classes)"


@base.SOURCES.register("coco_json")
@dataclasses.dataclass(frozen=True)
class COCOJson:
  """`data.coco_json`: a COCO-format json with its image folder (COCO itself, or any dataset
  in that format); the class names are the json's categories."""
  data_dir: str = setting("", "the folder the json and image paths below are relative to",
                          role="local")
  train_json: str = setting("", "instances json of the train split", role="training")
  train_images: str = setting("", "image folder of the train split", role="training")
  eval_json: str = setting("", "instances json of the eval split", role="test")
  eval_images: str = setting("", "image folder of the eval split", role="local")

  def make(self, split: str, *, bad_input: str, seed: int) -> COCOJsonSource:
    """The train split drops crowd boxes; the eval split keeps them, flagged difficult."""
    del seed
    json_file, image_dir = ((self.train_json, self.train_images) if split == "train"
                            else (self.eval_json, self.eval_images))
    return COCOJsonSource(os.path.join(self.data_dir, json_file),
                          os.path.join(self.data_dir, image_dir), drop_crowd=split == "train",
                          bad_input=bad_input)

  def class_names(self) -> None:
    return None
