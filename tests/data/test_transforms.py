"""Tests for frcnn_jax.data.transforms: resize rule, flip, padding, ground-truth slots."""

import logging
import math

import numpy as np
import pytest

from frcnn_jax.data import transforms

COLOUR = np.array([250, 10, 250], np.uint8)  # red channel never reached by the noise below


def _example(hw, boxes, labels=None, difficult=None, name="img", seed=0):
  """An Example: uniform noise in [0, 100], each box drawn as a solid COLOUR rectangle."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 100, size=(*hw, 3), dtype=np.uint8)
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  for x1, y1, x2, y2 in boxes.astype(int):
    image[y1:y2, x1:x2] = COLOUR
  n = len(boxes)
  return {"image": image, "boxes": boxes,
          "labels": np.asarray(labels if labels is not None else np.arange(1, n + 1), np.int32),
          "difficult": np.asarray(difficult if difficult is not None else np.zeros(n), bool),
          "image_id": np.int64(7), "name": name, "orig_hw": np.array(hw, np.int32)}


@pytest.mark.parametrize("hw, sizes, expected", [
    ((375, 500), (600, 1000, (1000, 1000)), 1.6),      # shorter side -> 600
    ((100, 1000), (600, 1000, (1000, 1000)), 1.0),     # longer side capped at 1000
    ((375, 500), (600, 1000, (600, 600)), 1.2),        # must fit a 600x600 canvas
    ((200, 100), (300, 1000, (500, 1000)), 2.5),       # canvas height limits a tall image
    ((48, 64), (24, 1000, (100, 100)), 0.5),           # shrinking
])
def test_resize_scale_is_min_of_the_three_rules(hw, sizes, expected):
  assert transforms.resize_scale(hw, *sizes) == pytest.approx(expected)


def test_resize_scale_rejects_bad_sizes():
  with pytest.raises(ValueError, match="positive"):
    transforms.resize_scale((0, 10), 600, 1000, (1000, 1000))


def test_hflip_golden_and_involution():
  image = np.arange(2 * 10 * 3, dtype=np.uint8).reshape(2, 10, 3)
  boxes = np.array([[1, 2, 4, 6], [0, 0, 10, 2]], np.float32)
  flipped_image, flipped = transforms.hflip(image, boxes)
  np.testing.assert_array_equal(flipped, [[6, 2, 9, 6], [0, 0, 10, 2]])
  np.testing.assert_array_equal(flipped_image[:, 0], image[:, -1])
  back_image, back = transforms.hflip(flipped_image, flipped)
  np.testing.assert_array_equal(back, boxes)
  np.testing.assert_array_equal(back_image, image)


def _check_boxes_on_objects(fields, margin=2):
  """Pixels well inside each valid box are COLOUR; pixels just outside it are not."""
  image = fields["image"].astype(int)
  h, w = fields["image_hw"]
  assert image[h:].max(initial=0) == 0 and image[:, w:].max(initial=0) == 0
  for box in fields["gt_boxes"][fields["gt_valid"]]:
    x1, y1, x2, y2 = box
    inner = image[math.ceil(y1) + margin:math.floor(y2) - margin,
                  math.ceil(x1) + margin:math.floor(x2) - margin]
    assert inner.size > 0
    assert np.abs(inner - COLOUR.astype(int)).max() <= 2
    cy, cx = int((y1 + y2) / 2), int((x1 + x2) / 2)
    outside = [(cy, math.floor(x1) - margin - 1), (cy, math.ceil(x2) + margin),
               (math.floor(y1) - margin - 1, cx), (math.ceil(y2) + margin, cx)]
    for y, x in outside:
      if 0 <= y < h and 0 <= x < w:
        assert image[y, x, 0] < 200, (box, y, x)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("flip", [False, True])
def test_boxes_stay_on_the_objects(seed, flip):
  rng = np.random.default_rng(seed)
  hw = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
  bw, bh = int(rng.integers(12, hw[1] // 2)), int(rng.integers(12, hw[0] // 2))
  x0, y0 = int(rng.integers(0, hw[1] - bw)), int(rng.integers(0, hw[0] - bh))
  example = _example(hw, [[x0, y0, x0 + bw, y0 + bh]], seed=seed)
  min_size = int(rng.choice([24, 60, 150]))          # shrink, about equal, enlarge
  pad_hw = (int(rng.integers(100, 300)), int(rng.integers(100, 300)))
  fields, counts = transforms.prepare(example, min_size=min_size, max_size=400, pad_hw=pad_hw,
                                      max_gt=4, training=True, flip=flip)
  scale = transforms.resize_scale(hw, min_size, 400, pad_hw)
  assert fields["scale"] == pytest.approx(scale)
  np.testing.assert_array_equal(fields["image_hw"], np.round(np.array(hw) * scale))
  assert fields["gt_valid"].tolist() == [True, False, False, False]
  expected = np.array([x0, y0, x0 + bw, y0 + bh], np.float32) * np.float32(scale)
  if flip:
    width = fields["image_hw"][1]
    expected = np.array([width - expected[2], expected[1], width - expected[0], expected[3]])
  np.testing.assert_allclose(fields["gt_boxes"][0], expected, atol=1e-4)
  assert counts == {"gt_overflow": 0, "degenerate_boxes": 0}
  _check_boxes_on_objects(fields)


def test_prepare_fields_shapes_and_dtypes():
  example = _example((48, 64), [[4, 4, 20, 30], [30, 10, 60, 40]])
  fields, _ = transforms.prepare(example, min_size=96, max_size=200, pad_hw=(128, 160),
                                 max_gt=5, training=False)
  expected = {"image": ((128, 160, 3), np.uint8), "image_hw": ((2,), np.int32),
              "scale": ((), np.float32), "gt_boxes": ((5, 4), np.float32),
              "gt_labels": ((5,), np.int32), "gt_valid": ((5,), bool),
              "gt_difficult": ((5,), bool), "image_id": ((), np.int32),
              "orig_hw": ((2,), np.int32), "valid": ((), bool)}
  assert set(fields) == set(expected)
  for k, (shape, dtype) in expected.items():
    assert np.shape(fields[k]) == shape and np.asarray(fields[k]).dtype == dtype, k
  np.testing.assert_array_equal(fields["image_hw"], [96, 128])
  np.testing.assert_array_equal(fields["orig_hw"], [48, 64])
  assert fields["image_id"] == 7 and fields["valid"]
  np.testing.assert_array_equal(fields["gt_labels"], [1, 2, 0, 0, 0])
  np.testing.assert_array_equal(fields["gt_boxes"][:2], [[8, 8, 40, 60], [60, 20, 120, 80]])
  assert not fields["gt_boxes"][2:].any()


def test_difficult_dropped_in_training_kept_flagged_in_eval():
  example = _example((48, 64), [[4, 4, 20, 30], [30, 10, 60, 40], [1, 1, 9, 9]],
                     difficult=[False, True, False])
  kw = dict(min_size=48, max_size=64, pad_hw=(48, 64), max_gt=4)
  train, _ = transforms.prepare(example, training=True, **kw)
  assert train["gt_valid"].tolist() == [True, True, False, False]
  np.testing.assert_array_equal(train["gt_labels"], [1, 3, 0, 0])
  assert not train["gt_difficult"].any()
  test, _ = transforms.prepare(example, training=False, **kw)
  assert test["gt_valid"].tolist() == [True, True, True, False]
  assert test["gt_difficult"].tolist() == [False, True, False, False]


def test_max_gt_overflow_keeps_largest_counts_and_warns(caplog):
  sides = [4, 10, 6, 12, 2]
  boxes = [[i * 12, 0, i * 12 + s, s] for i, s in enumerate(sides)]
  example = _example((20, 64), boxes, name="crowded_42")
  with caplog.at_level(logging.WARNING):
    fields, counts = transforms.prepare(example, min_size=20, max_size=64, pad_hw=(20, 64),
                                        max_gt=3, training=True)
  assert counts["gt_overflow"] == 2
  np.testing.assert_array_equal(fields["gt_labels"], [2, 3, 4])  # largest three, in order
  assert fields["gt_valid"].all()
  assert "crowded_42" in caplog.text and "max_gt" in caplog.text


def test_degenerate_boxes_after_resize_dropped_and_counted(caplog):
  example = _example((48, 64), [[4, 4, 20, 30], [10, 10, 10, 20], [64, 0, 64, 8]],
                     name="thin_7")
  with caplog.at_level(logging.WARNING):
    fields, counts = transforms.prepare(example, min_size=24, max_size=64, pad_hw=(48, 64),
                                        max_gt=4, training=True)
  assert counts == {"gt_overflow": 0, "degenerate_boxes": 2}
  assert fields["gt_valid"].tolist() == [True, False, False, False]
  assert "thin_7" in caplog.text


def test_image_without_objects_is_all_background():
  example = _example((30, 40), np.zeros((0, 4)))
  fields, counts = transforms.prepare(example, min_size=60, max_size=100, pad_hw=(64, 80),
                                      max_gt=2, training=True, flip=True)
  assert not fields["gt_valid"].any() and fields["valid"]
  np.testing.assert_array_equal(fields["image_hw"], [60, 80])
  assert counts == {"gt_overflow": 0, "degenerate_boxes": 0}


def test_pad_image_and_bad_inputs():
  image = np.full((3, 4, 3), 9, np.uint8)
  padded = transforms.pad_image(image, (5, 6))
  assert padded.shape == (5, 6, 3) and padded[:3, :4].min() == 9
  assert padded.sum() == image.sum()
  with pytest.raises(ValueError, match="canvas"):
    transforms.pad_image(image, (2, 6))
  gray = _example((8, 8), np.zeros((0, 4)))
  gray["image"] = gray["image"][..., 0]
  with pytest.raises(ValueError, match="uint8"):
    transforms.prepare(gray, min_size=8, max_size=8, pad_hw=(8, 8), max_gt=1, training=True)


def test_padding_example_is_invalid_and_matches_fields():
  example = _example((48, 64), [[4, 4, 20, 30]])
  fields, _ = transforms.prepare(example, min_size=48, max_size=64, pad_hw=(50, 70), max_gt=3,
                                 training=False)
  pad = transforms.padding_example((50, 70), 3)
  assert set(pad) == set(fields)
  for k in fields:
    assert np.shape(pad[k]) == np.shape(fields[k]) and pad[k].dtype == fields[k].dtype, k
  assert not pad["valid"] and not pad["gt_valid"].any() and pad["image_id"] == -1


def test_fit_scale_never_caps_an_image_its_canvas_holds():
  # 333 x 500 at 600 / 1000: scale 600 / 333, width 900.9 -> 901 pixels.
  scale = transforms.resize_scale((333, 500), 600, 1000)
  assert transforms.scaled_hw((333, 500), scale) == (600, 901)
  assert transforms.fit_scale((333, 500), 600, 1000, (608, 928)) == scale
  # A canvas 900 wide cannot hold 901: the factor is capped by the canvas (old rule).
  capped = transforms.fit_scale((333, 500), 600, 1000, (608, 900))
  assert capped == min(scale, 900 / 500) and transforms.scaled_hw((333, 500), capped) == (
      round(333 * 1.8), 900)
  # Rounding down into the canvas is not shrinking: 600.4 -> 600 fits a 600 canvas.
  hw = (300, 1000)
  s = transforms.resize_scale(hw, 2000, 2001.2)
  assert 300 * s > 600 and transforms.scaled_hw(hw, s)[0] == 600
  assert transforms.fit_scale(hw, 2000, 2001.2, (600, 2016)) == s
