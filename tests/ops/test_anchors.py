"""Tests for frcnn_jax.ops.anchors: the paper's anchors by hand and a NumPy loop reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import anchors as anchor_ops

_R2 = math.sqrt(2.0)
# (width, height) of the paper's 9 anchors, ratio (h / w) 0.5, 1, 2 major, size 128/256/512 minor.
_PAPER_SHAPES = [
    (128 * _R2, 64 * _R2), (256 * _R2, 128 * _R2), (512 * _R2, 256 * _R2),
    (128.0, 128.0), (256.0, 256.0), (512.0, 512.0),
    (64 * _R2, 128 * _R2), (128 * _R2, 256 * _R2), (256 * _R2, 512 * _R2),
]


def _np_anchor_grid(feat_h, feat_w, stride, sizes, ratios):
  out = []
  for i in range(feat_h):
    for j in range(feat_w):
      cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
      for r in ratios:
        for s in sizes:
          w, h = s / math.sqrt(r), s * math.sqrt(r)
          out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
  return np.asarray(out, np.float64).reshape(-1, 4)


def test_paper_anchors_at_origin_by_hand():
  grid = anchor_ops.anchor_grid(1, 1)
  expected = [[8 - w / 2, 8 - h / 2, 8 + w / 2, 8 + h / 2] for w, h in _PAPER_SHAPES]
  np.testing.assert_allclose(grid, expected, rtol=1e-6)
  widths, heights = grid[:, 2] - grid[:, 0], grid[:, 3] - grid[:, 1]
  np.testing.assert_allclose(widths * heights, np.tile([128.0**2, 256.0**2, 512.0**2], 3),
                             rtol=1e-5)
  np.testing.assert_allclose(heights / widths, np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-5)
  np.testing.assert_allclose(anchor_ops.base_anchors(), grid - 8.0, atol=1e-4)


def test_default_grid_order_and_shape():
  grid = anchor_ops.anchor_grid(38, 63)
  assert grid.shape == (38 * 63 * 9, 4) and grid.dtype == np.float32
  # Location (i=2, j=5) starts at row (2 * 63 + 5) * 9 and is centred at (88, 40).
  loc = grid[(2 * 63 + 5) * 9:(2 * 63 + 6) * 9]
  np.testing.assert_allclose((loc[:, 0] + loc[:, 2]) / 2, 88.0, atol=1e-4)
  np.testing.assert_allclose((loc[:, 1] + loc[:, 3]) / 2, 40.0, atol=1e-4)


@pytest.mark.parametrize("feat_h,feat_w,stride,sizes,ratios", [
    (1, 1, 16, (128, 256, 512), (0.5, 1.0, 2.0)),
    (3, 5, 16, (128, 256, 512), (0.5, 1.0, 2.0)),
    (4, 2, 8, (32,), (1.0,)),
    (2, 3, 32, (64, 100), (0.25, 0.5, 1.0, 3.0)),
    (5, 1, 4.5, (10.0, 20.0, 30.0, 40.0), (2.0,)),
])
def test_matches_numpy_loop(feat_h, feat_w, stride, sizes, ratios):
  grid = anchor_ops.anchor_grid(feat_h, feat_w, stride, sizes, ratios)
  np.testing.assert_allclose(grid, _np_anchor_grid(feat_h, feat_w, stride, sizes, ratios),
                             rtol=1e-6, atol=1e-4)


def test_random_configurations_match_numpy_loop():
  rng = np.random.default_rng(0)
  for _ in range(100):
    feat_h, feat_w = (int(v) for v in rng.integers(0, 6, 2))
    stride = float(rng.choice([4, 8, 16, 32]))
    sizes = tuple(rng.uniform(8, 600, rng.integers(1, 4)))
    ratios = tuple(rng.uniform(0.2, 5, rng.integers(1, 4)))
    grid = anchor_ops.anchor_grid(feat_h, feat_w, stride, sizes, ratios)
    assert grid.shape == (feat_h * feat_w * len(sizes) * len(ratios), 4)
    np.testing.assert_allclose(grid, _np_anchor_grid(feat_h, feat_w, stride, sizes, ratios),
                               rtol=1e-6, atol=1e-3)


def test_is_a_constant_under_jit():
  fn = jax.jit(lambda x: x + anchor_ops.anchor_grid(2, 3))
  np.testing.assert_allclose(fn(jnp.zeros((54, 4))), anchor_ops.anchor_grid(2, 3))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="static ints"):
    anchor_ops.anchor_grid(jnp.int32(2), 3)
  with pytest.raises(ValueError, match="static ints"):
    anchor_ops.anchor_grid(2.0, 3)
  with pytest.raises(ValueError, match=">= 0"):
    anchor_ops.anchor_grid(-1, 3)
  with pytest.raises(ValueError, match="stride"):
    anchor_ops.anchor_grid(2, 3, stride=0)
  with pytest.raises(ValueError, match="sizes"):
    anchor_ops.anchor_grid(2, 3, sizes=())
  with pytest.raises(ValueError, match="ratios"):
    anchor_ops.base_anchors(ratios=(1.0, -2.0))


# ------------------------------------------------- py-faster-rcnn's generate_anchors.py
# Line by line after rbgirshick/py-faster-rcnn lib/rpn/generate_anchors.py (inclusive pixel
# boxes, width = x2 - x1 + 1), with scales = sizes / 16.


def _whctrs(anchor):
  w = anchor[2] - anchor[0] + 1
  h = anchor[3] - anchor[1] + 1
  x_ctr = anchor[0] + 0.5 * (w - 1)
  y_ctr = anchor[1] + 0.5 * (h - 1)
  return w, h, x_ctr, y_ctr


def _mkanchors(ws, hs, x_ctr, y_ctr):
  ws = ws[:, np.newaxis]
  hs = hs[:, np.newaxis]
  return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                    x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))


def _ratio_enum(anchor, ratios):
  w, h, x_ctr, y_ctr = _whctrs(anchor)
  size = w * h
  size_ratios = size / ratios
  ws = np.round(np.sqrt(size_ratios))
  hs = np.round(ws * ratios)
  return _mkanchors(ws, hs, x_ctr, y_ctr)


def _scale_enum(anchor, scales):
  w, h, x_ctr, y_ctr = _whctrs(anchor)
  return _mkanchors(w * scales, h * scales, x_ctr, y_ctr)


def generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=2**np.arange(3, 6)):
  base_anchor = np.array([1, 1, base_size, base_size]) - 1
  ratio_anchors = _ratio_enum(base_anchor, np.asarray(ratios, np.float64))
  return np.vstack([_scale_enum(ratio_anchors[i, :], np.asarray(scales, np.float64))
                    for i in range(ratio_anchors.shape[0])])


def _pfr_grid(feat_h, feat_w, sizes, ratios):
  """proposal_layer.py's shifted anchors, converted to continuous boxes (x2 = x2_incl + 1)."""
  anchors = generate_anchors(16, ratios, np.asarray(sizes, np.float64) / 16)
  shift_x, shift_y = np.meshgrid(np.arange(feat_w) * 16, np.arange(feat_h) * 16)
  shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(),
                      shift_y.ravel())).transpose()
  k, a = shifts.shape[0], anchors.shape[0]
  grid = (anchors.reshape((1, a, 4)) + shifts.reshape((1, k, 4)).transpose((1, 0, 2)))
  return grid.reshape((k * a, 4)) + np.array([0, 0, 1, 1])


# The array quoted in generate_anchors.py (Shaoqing Ren's MATLAB anchors, 1-based inclusive).
_MATLAB_ANCHORS = np.array([
    [-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
    [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
    [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360]], np.float64)


def test_py_faster_rcnn_anchors_golden():
  grid = anchor_ops.anchor_grid(1, 1, style="py-faster-rcnn")
  # 1-based inclusive -> continuous, as a VOC box: x1 = xmin - 1, x2 = xmax.
  np.testing.assert_array_equal(grid, _MATLAB_ANCHORS - [1, 1, 0, 0])
  # generate_anchors() itself prints the 0-based inclusive boxes: x2 = x2_incl + 1 here.
  np.testing.assert_array_equal(grid, generate_anchors() + [0, 0, 1, 1])
  np.testing.assert_array_equal(grid[0], [-84, -40, 100, 56])
  widths, heights = grid[:, 2] - grid[:, 0], grid[:, 3] - grid[:, 1]
  assert (widths[0], heights[0]) == (184, 96)      # 181.02 x 90.51 in the exact style
  exact = anchor_ops.anchor_grid(1, 1)
  np.testing.assert_allclose(exact[0, 2] - exact[0, 0], 128 * _R2, rtol=1e-6)
  # Same centres as the exact style: 7.5 + 16 j inclusive is (j + 0.5) * 16 continuous.
  np.testing.assert_array_equal((grid[:, 0] + grid[:, 2]) / 2, 8.0)
  np.testing.assert_array_equal((grid[:, 1] + grid[:, 3]) / 2, 8.0)


def test_py_faster_rcnn_grid_matches_proposal_layer():
  np.testing.assert_array_equal(
      anchor_ops.anchor_grid(38, 63, style="py-faster-rcnn"),
      _pfr_grid(38, 63, (128, 256, 512), (0.5, 1.0, 2.0)))


def test_py_faster_rcnn_random_sizes_and_ratios():
  rng = np.random.default_rng(1)
  for _ in range(100):
    feat_h, feat_w = (int(v) for v in rng.integers(0, 5, 2))
    sizes = tuple(float(v) for v in rng.uniform(8, 600, rng.integers(1, 4)))
    ratios = tuple(float(v) for v in rng.uniform(0.2, 5, rng.integers(1, 4)))
    if rng.random() < 0.3:    # values whose rounding hits exact halves (11.5 -> 12, even)
      ratios = tuple(float(v) for v in rng.choice([0.5, 1.0, 2.0, 1 / 3, 3.0, 0.25], 2))
      sizes = tuple(float(v) for v in 16 * rng.integers(1, 40, 2))
    grid = anchor_ops.anchor_grid(feat_h, feat_w, 16, sizes, ratios, style="py-faster-rcnn")
    np.testing.assert_allclose(grid, _pfr_grid(feat_h, feat_w, sizes, ratios), rtol=0,
                               atol=1e-4 * max(sizes) / 16)


def test_py_faster_rcnn_other_stride_keeps_cell_centres():
  grid = anchor_ops.anchor_grid(2, 3, stride=8, style="py-faster-rcnn")
  np.testing.assert_array_equal(grid[:9],
                                anchor_ops.anchor_grid(1, 1, style="py-faster-rcnn") - 4.0)
  np.testing.assert_array_equal((grid[-9:, 0] + grid[-9:, 2]) / 2, 2.5 * 8)


def test_bad_style_raises():
  with pytest.raises(ValueError, match="style"):
    anchor_ops.anchor_grid(2, 3, style="torchvision")
  with pytest.raises(ValueError, match="zero-height"):
    anchor_ops.base_anchors(ratios=(1e-4,), style="py-faster-rcnn")
