"""Tests for `base.WithObjects`: training leaves out images without a usable object."""

import copy
import pickle

import numpy as np
import pytest

from frcnn_jax.config import build as builders
from frcnn_jax.config import defaults
from frcnn_jax.data import images
from frcnn_jax.data.sources import base
from frcnn_jax.data.sources import coco_json
from frcnn_jax.data.sources import voc_folder
from frcnn_jax.data.sources import voc_tfds
from tests.data import conftest as trees
from tests.data.sources.test_voc_tfds import tfds_dir  # noqa: F401  pylint: disable=unused-import


def _reference_kept(source):
  """Plain loop, py-faster-rcnn's rule: drop difficult objects, keep images with a box left."""
  kept = []
  for i in range(len(source)):
    ex = source[i]
    if sum(1 for d in ex["difficult"] if not d) > 0:
      kept.append(ex["name"])
  return kept


def _check_wrapper(wrapped, inner):
  assert len(wrapped) == len(wrapped.records) <= len(inner)
  assert len(wrapped) + len(wrapped.dropped) == len(inner)
  assert [wrapped[i]["name"] for i in range(len(wrapped))] == _reference_kept(inner)
  for i in range(len(wrapped)):
    ex, original = wrapped[i], inner[int(wrapped.records[i])]
    assert ex["image_id"] == i and ex["image_id"].dtype == np.int64
    for key in ("image", "boxes", "labels", "difficult", "orig_hw"):
      np.testing.assert_array_equal(ex[key], original[key])
  trees.assert_annotations_match(wrapped)
  assert wrapped.classes == inner.classes and wrapped.name == inner.name
  with pytest.raises(IndexError):
    _ = wrapped[len(wrapped)]


def test_voc_folder_drops_empty_and_difficult_only_images(write_voc):
  root = write_voc({
      "a": [("dog", 10, 8, 40, 30, 0, 0), ("person", 5, 5, 20, 40, 1, 0)],   # kept
      "b": [("person", 5, 5, 20, 40, 1, 0)],                                 # only difficult
      "c": [],                                                               # no object
      "d": [("car", 1, 1, 64, 48, 0, 1)],                                    # kept
  })
  inner = voc_folder.VOCFolderSource(root / "VOCdevkit", ("2007",), "trainval")
  wrapped = base.WithObjects(inner)
  assert wrapped.records.tolist() == [0, 3]
  assert wrapped.dropped == ["b", "c"]
  _check_wrapper(wrapped, inner)


def test_voc_fixture_07_plus_12(voc_root):
  inner = voc_folder.VOCFolderSource(voc_root / "VOCdevkit", ("2007", "2012"), "trainval")
  wrapped = base.WithObjects(inner)
  assert wrapped.dropped == ["000003"]
  _check_wrapper(wrapped, inner)


def test_tfds_voc_equals_the_folder_reader(tfds_dir, voc_root):  # pylint: disable=redefined-outer-name
  folder = base.WithObjects(voc_folder.VOCFolderSource(voc_root / "VOCdevkit", ("2007", "2012"),
                                                   "trainval"))
  wrapped = base.WithObjects(voc_tfds.TfdsVOCSource(tfds_dir, ("2007", "2012"), "trainval"))
  assert wrapped.dropped == folder.dropped == ["000003"]
  _check_wrapper(wrapped, wrapped.source)
  assert [wrapped.annotation(i)["name"] for i in range(len(wrapped))] == [
      folder.annotation(i)["name"] for i in range(len(folder))]


def test_coco_drops_empty_and_crowd_only_images(tmp_path, coco_spec):
  spec = copy.deepcopy(coco_spec)
  spec["images"].append({"id": 5, "file_name": "crowd.jpg", "width": trees.WIDTH,
                         "height": trees.HEIGHT})
  spec["annotations"].append({"id": 9, "image_id": 5, "category_id": 1,
                              "bbox": [1.0, 1.0, 30.0, 30.0], "area": 900.0, "iscrowd": 1})
  root = trees.write_coco(tmp_path, spec)
  train = coco_json.COCOJsonSource(root / "annotations" / "instances_train.json", root / "images",
                              drop_crowd=True)
  wrapped = base.WithObjects(train)
  assert wrapped.dropped == ["empty", "crowd"]
  assert [train.coco_ids[r] for r in wrapped.records] == [42, 7, 100]
  _check_wrapper(wrapped, train)
  # Kept as difficult (evaluation), a crowd region is still no object to train on.
  flagged = coco_json.COCOJsonSource(root / "annotations" / "instances_train.json", root / "images",
                                drop_crowd=False)
  assert base.WithObjects(flagged).dropped == ["empty", "crowd"]


def test_pickles_for_the_worker_processes(voc_root):
  wrapped = base.WithObjects(voc_folder.VOCFolderSource(voc_root / "VOCdevkit", ("2007",),
                                                    "trainval"))
  again = pickle.loads(pickle.dumps(wrapped))
  assert again.records.tolist() == wrapped.records.tolist()
  np.testing.assert_array_equal(again[1]["image"], wrapped[1]["image"])


class _FakeSource:
  """Records given by their difficult flags; `unreadable` annotations raise (a bad header)."""
  classes = ("thing",)
  name = "fake"

  def __init__(self, difficult_lists, unreadable=()):
    self._unreadable = unreadable
    self._anns = [base.annotation(np.tile([[0.0, 0.0, 4.0, 4.0]], (len(d), 1)),
                                     np.ones(len(d)), d, f"r{i}", (8, 8))
                  for i, d in enumerate(difficult_lists)]

  def __len__(self):
    return len(self._anns)

  def annotation(self, index):
    if index in self._unreadable:
      raise images.ImageDecodeError(f"r{index}: cannot read image header")
    return dict(self._anns[index])

  def __getitem__(self, index):
    return None if index in self._unreadable else base.example(np.zeros((8, 8, 3), np.uint8),
                                                   self.annotation(index), index)


def test_unreadable_annotation_is_kept_and_skipped_records_stay_none():
  wrapped = base.WithObjects(_FakeSource([[False], [False], [True, True], [], [True, False]],
                                            unreadable=(1,)))
  assert wrapped.records.tolist() == [0, 1, 4] and wrapped.dropped == ["r2", "r3"]
  assert wrapped[1] is None
  assert wrapped[2]["name"] == "r4" and wrapped[2]["image_id"] == 2


def test_no_image_with_objects_is_a_clear_error():
  with pytest.raises(ValueError, match="drop_images_without_objects=false"):
    base.WithObjects(_FakeSource([[True], [], [True, True]]))


def test_logged_with_count(write_voc, caplog):
  root = write_voc({"a": [("dog", 10, 8, 40, 30, 0, 0)], "c": []})
  with caplog.at_level("INFO"):
    base.WithObjects(voc_folder.VOCFolderSource(root / "VOCdevkit", ("2007",), "trainval"))
  assert "1 of 2 training images have no object" in caplog.text


@pytest.mark.parametrize("drop", [True, False])
def test_builders_wrap_the_train_split_only(voc_root, drop):
  config = defaults.get_config()
  config.data.name = "voc_folder"
  config.data.voc_folder.data_dir = str(voc_root / "VOCdevkit")
  config.data.voc_folder.eval_split = "trainval"
  config.data.drop_images_without_objects = drop
  train = builders.source_from_config(config, "train")
  assert isinstance(train, base.WithObjects) == drop
  assert len(train) == (3 if drop else 4)
  assert not isinstance(builders.source_from_config(config, "eval"), base.WithObjects)
