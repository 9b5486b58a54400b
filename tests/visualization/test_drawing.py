"""Tests of frcnn_jax/visualization/drawing.py: caption placement and enlargement."""

import itertools

import numpy as np
from PIL import Image
from PIL import ImageDraw

from frcnn_jax.visualization import drawing


def _rects(corners, sizes):
  return [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]


def _intersect(a, b):
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _crowd(rng, n, width, height):
  """n boxes crowded around one spot (a flock of people), some identical."""
  x1 = rng.uniform(40, 70, n)
  y1 = rng.uniform(30, 50, n)
  boxes = np.stack([x1, y1, x1 + rng.uniform(15, 40, n), y1 + rng.uniform(20, 60, n)], 1)
  boxes[1] = boxes[0]
  return np.clip(boxes, 0, [width, height, width, height])


def test_crowded_captions_do_not_overlap():
  rng = np.random.default_rng(0)
  width, height = 200, 160
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  caption_font = drawing.font(8)
  for trial in range(20):
    boxes = _crowd(rng, 8, width, height)
    sizes = []
    for k in range(len(boxes)):
      left, top, right, bottom = probe.textbbox((0, 0), f"person 0.{k}{trial}",
                                                font=caption_font)
      sizes.append((right - left + 4, bottom - top + 4))
    rects = _rects(drawing.place_captions(boxes, sizes, (width, height)), sizes)
    for a, b in itertools.combinations(rects, 2):
      assert not _intersect(a, b), (trial, a, b)
    for x1, y1, x2, y2 in rects:
      assert 0 <= x1 and x2 <= width and 0 <= y1 and y2 <= height


def test_first_placed_caption_keeps_its_spot_and_the_next_moves_down():
  boxes = np.array([[10, 30, 60, 80], [12, 32, 60, 80.]])
  sizes = [(40, 12), (40, 12)]
  # The higher score (second box) is placed first: above its box. The other one's spots above
  # and just inside its top edge overlap that caption, so it goes below its box.
  corners = drawing.place_captions(boxes, sizes, (100, 100), order=[1, 0])
  assert corners[1] == (12, 20) and corners[0] == (10, 80)
  # Every spot around the box taken: the free spot of the column nearest to the first choice.
  corners = drawing.place_captions(np.array([[10, 30, 60, 80], [10, 30, 60, 80],
                                             [10, 30, 60, 80.]]), [(40, 12), (40, 52), (40, 12)],
                                   (100, 100))
  assert corners == [(10, 18), (10, 30), (10, 6)]
  # A column with no free spot at all: overlapping at the first choice is the only way.
  full = drawing.place_captions(np.array([[0, 0, 10, 10.]] * 3), [(20, 10)] * 3, (20, 20))
  assert full[0] == (0, 0) and full[1] == (0, 10) and full[2] == (0, 0)


def test_drawn_captions_of_identical_boxes_are_both_visible():
  image = np.zeros((120, 160, 3), np.uint8)
  boxes = np.array([[40, 50, 100, 110], [40, 50, 100, 110.]])
  out = np.asarray(drawing.draw_boxes(image, boxes, np.array([1, 2]), np.array([0.9, 0.8]),
                                      ["cat", "dog"], width=1))
  for label in (1, 2):
    colour = drawing.class_colour(label)
    # A caption background: a run of the class colour many pixels wide (outlines are 1 px).
    filled = np.all(out == colour, axis=-1)
    assert (filled.sum(axis=1) > 10).any(), label


def test_small_images_are_enlarged_for_readable_captions():
  assert drawing.display_factor((50, 70)) == 6 and drawing.display_factor((300, 500)) == 1
  picture = drawing.enlarge(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 3)
  assert picture.size == (6, 6) and picture.mode == "RGB"
  assert tuple(np.asarray(picture)[5, 5]) == (9, 10, 11)
