"""frcnn_jax.benchmarking.size_mix: size mixes, their layouts on canvases, the pixel line."""

import os

import numpy as np
import pytest

from frcnn_jax.benchmarking import size_mix
from frcnn_jax.config import flags as config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")

# A hand-computed mix: data.min_size 64, max_size 96 resize 100x150 -> 64x96 (x3),
# 150x100 -> 96x64 (x1), 120x120 -> 64x64 (x2): 6 images, content
# 3*6144 + 6144 + 2*4096 = 32768 pixels.
MIX = "100x150:3,150x100:1,120x120:2"
MIX_CONTENT = 3 * 64 * 96 + 96 * 64 + 2 * 64 * 64


def mix_config():
  config = config_flags.load_config(SHAPES)
  config.data.min_size, config.data.max_size = 64, 96
  return config


def test_parse_mix_list_and_bad_entries():
  hw, counts = size_mix.parse_mix_list("375x500:3, 500x375")
  np.testing.assert_array_equal(hw, [[375, 500], [500, 375]])
  np.testing.assert_array_equal(counts, [3, 1])
  for text, message in (("600x", "HEIGHTxWIDTH"), ("600x800:two", "integer"),
                        ("600x800:0", ">= 1")):
    with pytest.raises(ValueError, match=message):
      size_mix.parse_mix_list(text)


def test_voc07_table_is_voc2007_test():
  hw, counts = size_mix.read_size_table(size_mix.VOC07_SIZES)
  assert counts.sum() == 4952 and len(hw) == len(np.unique(hw, axis=0)) == 514
  assert hw.max() == 500   # VOC images are at most 500 px on a side
  assert tuple(hw[0]) == (375, 500) and counts[0] == 2090   # 500x375 landscape first
  sizes, merged = size_mix.resized_mix(hw, counts, 600, 1000)
  assert merged.sum() == 4952 and (np.diff(merged) <= 0).all()
  assert tuple(sizes[0]) == (600, 800) and tuple(sizes[2]) == (800, 600)
  assert sizes.min(axis=1).max() <= 600 and sizes.max() <= 1000


def test_mix_layouts_hand_computed():
  plan = size_mix.plan_mix(mix_config(), MIX, [1, 2], (96, 96), 32)
  np.testing.assert_array_equal(plan.sizes, [[64, 96], [64, 64], [96, 64]])
  np.testing.assert_array_equal(plan.counts, [3, 2, 1])
  single, k1, k2 = plan.layouts
  assert (single.name, single.canvases, single.shares) == ("single 96x96", ((96, 96),), (1.0,))
  assert single.useful == pytest.approx(MIX_CONTENT / (6 * 96 * 96))
  assert k1.canvases == ((96, 96),) and k1.useful == single.useful
  # Two canvases: 64x96 holds the landscape and the square images (5 of 6; the square one
  # ties in area and takes the first), 96x64 the portrait one.
  assert k2.canvases == ((64, 96), (96, 64))
  assert k2.shares == pytest.approx((5 / 6, 1 / 6))
  assert k2.useful == pytest.approx(MIX_CONTENT / (6 * 64 * 96))
  assert size_mix.canvas_contents(plan.layouts, plan.sizes, plan.counts) == {
      (96, 96): (64, 96), (64, 96): (64, 96), (96, 64): (96, 64)}
  assert size_mix.exact_flop_sizes(plan.sizes, plan.counts, 1) == [(64, 96), (64, 64)]
  with pytest.raises(ValueError, match="--mix_single 64x96: no canvas holds .*96x64"):
    size_mix.plan_mix(mix_config(), MIX, [1], (64, 96), 32)
  with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
    size_mix.plan_mix(mix_config(), "100x", [1], (96, 96), 32)


def test_mix_from_a_voc_folder(tmp_path):
  from tests.data import conftest as data  # pylint: disable=g-import-not-at-top
  sizes = {"a": (48, 64), "b": (48, 64), "c": (64, 48)}
  records = {name: {"objects": [("dog", 2, 2, 20, 20, 0, 0)], "size": (w, h),
                    "image": data.encode(data.pixels(name, (h, w)))}
             for name, (h, w) in sizes.items()}
  data.write_voc_year(tmp_path / "VOCdevkit", "2007", records, {"trainval": list(records)})
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py"))
  config.data.name, config.data.voc_folder.data_dir = "voc_folder", str(tmp_path)
  hw, counts, description = size_mix.mix_sizes("train", config)
  np.testing.assert_array_equal(hw, [[48, 64], [64, 48]])
  np.testing.assert_array_equal(counts, [2, 1])
  assert "voc_folder train" in description and "3 records" in description
  assert str(tmp_path) in description


def test_pixel_line_known_exact_others_on_the_line():
  sizes = np.array([[10, 10], [10, 20], [20, 20], [5, 10]])
  values, residual = size_mix.pixel_line({(10, 10): 205.0, (20, 20): 805.0}, sizes)
  np.testing.assert_allclose(values, [205.0, 405.0, 805.0, 105.0])   # 5 + 2 * pixels
  assert residual == pytest.approx(0.0, abs=1e-9)
  values, _ = size_mix.pixel_line({(10, 20): 400.0}, sizes)   # one pixel count: proportional
  np.testing.assert_allclose(values, [200.0, 400.0, 800.0, 100.0])
  with pytest.raises(ValueError, match="no known values"):
    size_mix.pixel_line({}, sizes)
  assert size_mix.mix_mean(np.array([1.0, 3.0]), np.array([3, 1])) == pytest.approx(1.5)
  assert size_mix.mix_mean(np.array([1.0, 3.0]), np.array([3, 1]),
                           np.array([False, True])) == pytest.approx(3.0)
