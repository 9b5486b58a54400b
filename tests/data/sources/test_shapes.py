"""Tests for frcnn_jax.data.shapes: tight boxes, determinism, splits, variety, the Example dict."""

import pickle

import numpy as np
import pytest

from frcnn_jax.data.sources import shapes
from tests.data import conftest as trees


def _mask_box(mask: np.ndarray) -> list[int]:
  """Plain-NumPy reference: the tight xyxy box of a mask (x2 = last column + 1)."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_example_dict_contract():
  source = shapes.ShapesSource(3, image_size=(40, 56), seed=2)
  assert len(source) == 3 and source.name == "shapes_train"
  assert source.classes == shapes.CLASSES and len(source.classes) >= 3
  ex = source[1]
  n = len(ex["boxes"])
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (40, 56, 3)
  assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (n, 4)
  assert ex["labels"].dtype == np.int32 and ex["labels"].shape == (n,)
  assert ex["difficult"].dtype == bool and not ex["difficult"].any()
  assert ex["image_id"].dtype == np.int64 and ex["image_id"] == 1
  assert ex["orig_hw"].dtype == np.int32 and ex["orig_hw"].tolist() == [40, 56]
  assert isinstance(ex["name"], str)
  assert 1 <= n and ((ex["labels"] >= 1) & (ex["labels"] <= len(source.classes))).all()
  with pytest.raises(IndexError):
    source[3]


@pytest.mark.parametrize("index", range(8))
def test_boxes_are_tight_around_the_drawn_pixels(index):
  source = shapes.ShapesSource(8, image_size=48, seed=5, noise_std=0.0, texture=False)
  example, masks = source.render(index)
  image = example["image"].astype(int)
  background = np.all(image == 127, axis=-1)   # flat grey background without noise
  assert len(masks) == len(example["boxes"])
  assert not (masks.sum(0) > 1).any()           # visible masks are disjoint
  np.testing.assert_array_equal(masks.any(0), ~background)
  for k, mask in enumerate(masks):
    np.testing.assert_array_equal(example["boxes"][k], _mask_box(mask))
    colours = np.unique(image[mask], axis=0)
    assert len(colours) == 1                    # one solid colour per object
    x1, y1, x2, y2 = example["boxes"][k].astype(int)
    window = np.zeros_like(mask)
    window[y1:y2, x1:x2] = True
    assert not (mask & ~window).any()
    # Every border row and column of the box holds a pixel of the object.
    assert mask[y1].any() and mask[y2 - 1].any() and mask[:, x1].any() and mask[:, x2 - 1].any()


def test_boxes_tight_with_texture_and_noise():
  source = shapes.ShapesSource(4, image_size=64, seed=1)
  for index in range(4):
    example, masks = source.render(index)
    for k, mask in enumerate(masks):
      np.testing.assert_array_equal(example["boxes"][k], _mask_box(mask))


def test_deterministic_and_splits_differ():
  a = shapes.ShapesSource(5, image_size=32, seed=3)
  b = shapes.ShapesSource(5, image_size=32, seed=3)
  for i in (0, 4):
    for k in ("image", "boxes", "labels"):
      np.testing.assert_array_equal(a[i][k], b[i][k])
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  test = shapes.ShapesSource(5, image_size=32, seed=3, split="test")
  assert test.name == "shapes_test"
  assert all(not np.array_equal(a[i]["image"], test[i]["image"]) for i in range(5))
  other_seed = shapes.ShapesSource(5, image_size=32, seed=4)
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])


def test_cache_returns_equal_copies_up_to_its_budget():
  image_bytes = 32 * 32 * 3
  source = shapes.ShapesSource(5, image_size=32, seed=3, cache_bytes=2 * image_bytes)
  plain = shapes.ShapesSource(5, image_size=32, seed=3)
  for i in (0, 1, 2, 0, 1, 2):
    example = source[i]
    for key, value in plain[i].items():
      np.testing.assert_array_equal(example[key], value)
    example["image"][:] = 0          # callers may modify what they get
    example["boxes"][:] = -1
  assert sorted(source._cache) == [0, 1]
  np.testing.assert_array_equal(source[0]["image"], plain[0]["image"])
  clone = pickle.loads(pickle.dumps(source))
  assert clone._cache == {} and clone.cache_bytes == source.cache_bytes
  np.testing.assert_array_equal(clone[1]["boxes"], plain[1]["boxes"])


def test_annotation_equals_example_fields():
  source = shapes.ShapesSource(4, split="test", image_size=(40, 56), seed=7)
  trees.assert_annotations_match(source)
  fresh = shapes.ShapesSource(4, split="test", image_size=(40, 56), seed=7)
  np.testing.assert_array_equal(fresh.annotation(3)["boxes"], source[3]["boxes"])


def test_variety_of_classes_sizes_and_aspect_ratios():
  source = shapes.ShapesSource(30, image_size=96, seed=0)
  labels, sides, ratios, counts = [], [], [], []
  for i in range(len(source)):
    ex = source[i]
    w, h = (ex["boxes"][:, 2] - ex["boxes"][:, 0]), (ex["boxes"][:, 3] - ex["boxes"][:, 1])
    labels.extend(ex["labels"].tolist())
    sides.extend(np.sqrt(w * h).tolist())
    ratios.extend((h / w).tolist())
    counts.append(len(ex["labels"]))
  assert set(labels) == set(range(1, len(shapes.CLASSES) + 1))
  assert min(sides) < 0.15 * 96 and max(sides) > 0.4 * 96
  assert min(ratios) < 0.75 and max(ratios) > 1.33
  assert min(counts) >= 1 and max(counts) > 2


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="split"):
    shapes.ShapesSource(4, split="val")
  with pytest.raises(ValueError, match="positive"):
    shapes.ShapesSource(0)
  with pytest.raises(ValueError, match="object sizes"):
    shapes.ShapesSource(4, min_object=0.5, max_object=0.2)
