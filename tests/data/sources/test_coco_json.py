"""Tests for frcnn_jax/data/coco_json.py (COCO-format json) and its bad-input handling."""

import copy
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from frcnn_jax.data.sources import base
from frcnn_jax.data.sources import coco_json
from tests.data import conftest as trees


def _reference(spec, drop_crowd):
  """Plain-loop reference: file_name -> (boxes, labels, difficult)."""
  ids = sorted(c["id"] for c in spec["categories"])
  out = {}
  for info in spec["images"]:
    boxes, labels, difficult = [], [], []
    for ann in spec["annotations"]:
      if ann["image_id"] != info["id"] or (ann["iscrowd"] and drop_crowd):
        continue
      x, y, w, h = ann["bbox"]
      boxes.append([x, y, x + w, y + h])
      labels.append(ids.index(ann["category_id"]) + 1)
      difficult.append(bool(ann["iscrowd"]))
    out[info["file_name"]] = (np.array(boxes, np.float32).reshape(-1, 4), labels, difficult)
  return out


def _source(root, **kwargs):
  return coco_json.COCOJsonSource(root / "annotations" / "instances_train.json", root / "images",
                             **kwargs)


@pytest.mark.parametrize("drop_crowd", [True, False])
def test_exact_read(coco_root, coco_spec, drop_crowd):
  source = _source(coco_root, drop_crowd=drop_crowd)
  assert source.classes == ("person", "car", "dog")
  assert source.category_ids == (1, 3, 18)
  assert len(source) == 4
  np.testing.assert_array_equal(source.coco_ids, [42, 7, 9, 100])
  reference = _reference(coco_spec, drop_crowd)
  for i, info in enumerate(coco_spec["images"]):
    ex = source[i]
    boxes, labels, difficult = reference[info["file_name"]]
    assert ex["name"] == info["file_name"].rsplit(".", 1)[0]
    assert ex["image_id"] == i and ex["image_id"].dtype == np.int64
    np.testing.assert_array_equal(
        ex["image"], np.asarray(Image.open(coco_root / "images" / info["file_name"])))
    assert ex["boxes"].dtype == np.float32 and ex["labels"].dtype == np.int32
    np.testing.assert_array_equal(ex["boxes"], boxes)
    np.testing.assert_array_equal(ex["labels"], labels)
    np.testing.assert_array_equal(ex["difficult"], difficult)
    np.testing.assert_array_equal(ex["orig_hw"], [trees.HEIGHT, trees.WIDTH])
  assert source.bad_input_log.skipped == []


def test_golden_boxes_and_crowd(coco_root):
  train = _source(coco_root, drop_crowd=True)
  evaluation = _source(coco_root, drop_crowd=False)
  np.testing.assert_array_equal(train[0]["boxes"], [[10.5, 8.0, 30.5, 23.25]])
  np.testing.assert_array_equal(train[0]["labels"], [3])
  np.testing.assert_array_equal(evaluation[0]["boxes"], [[10.5, 8.0, 30.5, 23.25],
                                                         [0, 0, 64, 48]])
  np.testing.assert_array_equal(evaluation[0]["difficult"], [False, True])
  assert train[2]["boxes"].shape == (0, 4) and train[2]["name"] == "empty"
  assert train[3]["name"] == "sub/c"


@pytest.mark.parametrize("drop_crowd", [True, False])
def test_annotation_equals_example_fields(coco_root, drop_crowd):
  trees.assert_annotations_match(_source(coco_root, drop_crowd=drop_crowd))


def test_annotation_shares_the_cleaning_and_reads_no_pixels(tmp_path):
  spec = _with(lambda s: (s["annotations"][4].update(bbox=[40.0, 30.0, 30.0, 30.0]),
                          s["annotations"][3].update(bbox=[1.0, 2.0, 0.0, 4.0])))
  source = _source(trees.write_coco(tmp_path, spec, {"b.jpg": b"not an image"}))
  trees.assert_annotations_match(source)
  np.testing.assert_array_equal(source.annotation(3)["boxes"], [[40, 30, 64, 48]])
  # b.jpg cannot be decoded (source[1] is skipped), yet its annotation needs no pixels.
  assert source[1] is None and source.annotation(1)["name"] == "b"
  np.testing.assert_array_equal(source.annotation(1)["boxes"], [[30, 20, 40, 25]])


def test_pickle_and_the_registered_settings(coco_root):
  settings = base.SOURCES.get("coco_json")(data_dir=str(coco_root),
                                           train_json="annotations/instances_train.json",
                                           train_images="images")
  source = settings.make("train", bad_input="skip", seed=0)
  assert settings.class_names() is None   # the json's categories
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[1]["boxes"], source[1]["boxes"])
  np.testing.assert_array_equal(clone[1]["image"], source[1]["image"])
  assert clone[0]["boxes"].shape == (1, 4)


def test_missing_and_unreadable_json(tmp_path, coco_root):
  with pytest.raises(FileNotFoundError, match="cocodataset.org"):
    coco_json.COCOJsonSource(tmp_path / "instances_val.json", coco_root / "images")
  with pytest.raises(FileNotFoundError, match="image folder"):
    coco_json.COCOJsonSource(coco_root / "annotations" / "instances_train.json", tmp_path / "x")
  (tmp_path / "broken.json").write_text('{"images": [')
  with pytest.raises(ValueError, match="broken.json: unreadable COCO json"):
    coco_json.COCOJsonSource(tmp_path / "broken.json", coco_root / "images", bad_input="skip")


def _with(mutate):
  spec = copy.deepcopy(trees.COCO)
  mutate(spec)
  return spec


def _set_bbox(index, bbox):
  return lambda s: s["annotations"][index].update(bbox=bbox)


# Annotation problems: case -> (spec, message fragment, file_name -> kept boxes under "skip").
ANNOTATION_CASES = {
    "zero_width_box": (_with(_set_bbox(2, [30.0, 20.0, 0.0, 5.0])), "degenerate box 0",
                       {"b.jpg": [[1, 2, 4, 6]]}),
    "negative_height_box": (_with(_set_bbox(3, [1.0, 2.0, 3.0, -4.0])), "degenerate box 1",
                            {"b.jpg": [[30, 20, 40, 25]]}),
    "box_outside": (_with(_set_bbox(3, [70.0, 50.0, 3.0, 4.0])), "lies outside the 64x48 image",
                    {"b.jpg": [[30, 20, 40, 25]]}),
    "unknown_category": (_with(lambda s: s["annotations"][3].update(category_id=99)),
                         "unknown category id 99", {"b.jpg": [[30, 20, 40, 25]]}),
    "unreadable_bbox": (_with(_set_bbox(3, [1.0, 2.0])), "unreadable bbox",
                        {"b.jpg": [[30, 20, 40, 25]]}),
    "unknown_image": (_with(lambda s: s["annotations"][3].update(image_id=555)),
                      "unknown image id 555", {"b.jpg": [[30, 20, 40, 25]]}),
    "missing_image": (_with(lambda s: s["images"][1].update(file_name="gone.jpg")),
                      "not found", {"b.jpg": None}),
}


@pytest.mark.parametrize("case", list(ANNOTATION_CASES))
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_annotation_bad_input(tmp_path, case, policy):
  spec, message, kept = ANNOTATION_CASES[case]
  images = {"gone.jpg": None}
  root = trees.write_coco(tmp_path, spec, images)
  if policy == "error":
    with pytest.raises(ValueError, match=message):
      _source(root, bad_input="error")
    return
  source = _source(root, bad_input="skip")
  skipped = source.bad_input_log.skipped
  assert len(skipped) == 1 and message in skipped[0] and "instances_train.json" in skipped[0]
  names = [source[i]["name"] for i in range(len(source))]
  for file_name, boxes in kept.items():
    stem = file_name.rsplit(".", 1)[0]
    if boxes is None:
      assert stem not in names and len(source) == 3
    else:
      np.testing.assert_array_equal(source[names.index(stem)]["boxes"], boxes)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_box_partly_outside_clipped(tmp_path, policy):
  root = trees.write_coco(tmp_path, _with(_set_bbox(4, [40.0, 30.0, 30.0, 30.0])))
  source = _source(root, bad_input=policy)
  np.testing.assert_array_equal(source[3]["boxes"], [[40, 30, 64, 48]])
  assert source.bad_input_log.clipped == 1 and source.bad_input_log.skipped == []


IMAGE_CASES = {
    "corrupt_jpeg": (trees.encode(trees.pixels("b.jpg"))[:200], "cannot decode"),
    "size_mismatch": (trees.encode(trees.pixels("b.jpg", (20, 30))),
                      "image is 20x30 (HxW) but its annotation says 48x64"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_image_bad_input(tmp_path, case, policy):
  data, message = IMAGE_CASES[case]
  source = _source(trees.write_coco(tmp_path, trees.COCO, {"b.jpg": data}), bad_input=policy)
  assert len(source) == 4 and source[0]["name"] == "a"
  if policy == "error":
    with pytest.raises(ValueError, match=re.escape(message)):
      source[1]
    return
  assert source[1] is None
  skipped = source.bad_input_log.skipped
  assert len(skipped) == 1 and "b.jpg" in skipped[0] and message in skipped[0]


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_grayscale_and_rgba_converted(tmp_path, policy):
  gray = trees.pixels("g")[..., 0]
  rgba = np.concatenate([trees.pixels("r"), np.zeros((48, 64, 1), np.uint8)], axis=2)
  root = trees.write_coco(tmp_path, trees.COCO, {"a.jpg": trees.encode(gray, "PNG"),
                                                "b.jpg": trees.encode(rgba, "PNG")})
  source = _source(root, bad_input=policy)
  np.testing.assert_array_equal(source[0]["image"], np.repeat(gray[..., None], 3, axis=2))
  np.testing.assert_array_equal(source[1]["image"], trees.pixels("r"))


def test_no_categories_is_an_error(tmp_path):
  root = trees.write_coco(tmp_path, _with(lambda s: s.update(categories=[])))
  with pytest.raises(ValueError, match="no categories"):
    _source(root)

