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


def generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=2**np.arange(3, 6)):  # noqa: B008
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
    anchor_ops.anchor_grid(2, 3, style="detectron2")
  with pytest.raises(ValueError, match="zero-height"):
    anchor_ops.base_anchors(ratios=(1e-4,), style="py-faster-rcnn")


# ------------------------------------------------- torchvision's AnchorGenerator
# models/detection/anchor_utils.py: float32 base anchors rounded half to even, shifted to the
# cells' top-left corners (j * stride_x, i * stride_y).


def _np_torchvision_grid(feat_h, feat_w, stride_y, stride_x, sizes, ratios):
  """generate_anchors + grid_anchors one anchor at a time, in float32 scalars."""
  base = []
  for r in ratios:
    h_ratio = np.sqrt(np.float32(r))
    w_ratio = np.float32(1.0) / h_ratio
    for s in sizes:
      ws, hs = w_ratio * np.float32(s), h_ratio * np.float32(s)
      base.append([np.round(v / np.float32(2.0)) for v in (-ws, -hs, ws, hs)])
  out = []
  for i in range(feat_h):
    for j in range(feat_w):
      for b in base:
        out.append([np.float32(j * stride_x) + b[0], np.float32(i * stride_y) + b[1],
                    np.float32(j * stride_x) + b[2], np.float32(i * stride_y) + b[3]])
  return np.asarray(out, np.float32).reshape(-1, 4)


def test_torchvision_base_anchors_golden():
  # 32 px, ratio 0.5: w = 32 / sqrt(0.5) = 45.25, h = 22.63; halves 22.63 and 11.31 round to
  # 23 and 11. Ratio 2 swaps them.
  np.testing.assert_array_equal(
      anchor_ops.base_anchors((32,), (0.5, 1.0, 2.0), "torchvision"),
      [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])
  # 128 px: 181.02 x 90.51, halves 90.51 and 45.25 -> 91, 45 (the exact style keeps them).
  np.testing.assert_array_equal(
      anchor_ops.base_anchors((128, 256), (0.5,), "torchvision"),
      [[-91, -45, 91, 45], [-181, -91, 181, 91]])
  # Halves of exactly .5 round to even (torch.round): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
  np.testing.assert_array_equal(
      anchor_ops.base_anchors((1, 3, 5), (1.0,), "torchvision"),
      [[0, 0, 0, 0], [-2, -2, 2, 2], [-2, -2, 2, 2]])
  assert anchor_ops.base_anchors(style="torchvision").dtype == np.float32


def test_torchvision_grid_golden_corners_and_stride_pair():
  grid = anchor_ops.anchor_grid(2, 3, (61, 64), (32,), (1.0,), "torchvision")
  assert grid.shape == (6, 4) and grid.dtype == np.float32
  np.testing.assert_array_equal(grid[0], [-16, -16, 16, 16])    # centred at the corner (0, 0)
  # Location (i=1, j=2) is centred at (2 * 64, 1 * 61) = (128, 61).
  np.testing.assert_array_equal(grid[5], [112, 45, 144, 77])
  np.testing.assert_array_equal(
      anchor_ops.anchor_grid(2, 3, 16, (32,), (1.0,), "torchvision"),
      anchor_ops.anchor_grid(2, 3, (16, 16), (32,), (1.0,), "torchvision"))


@pytest.mark.parametrize("style", ["exact", "py-faster-rcnn"])
def test_stride_pair_other_styles(style):
  # An int stride keeps its meaning; a pair scales rows by stride_y and columns by stride_x.
  np.testing.assert_array_equal(anchor_ops.anchor_grid(3, 4, 16, style=style),
                                anchor_ops.anchor_grid(3, 4, (16, 16), style=style))
  grid = anchor_ops.anchor_grid(3, 4, (8, 32), style=style)
  base = anchor_ops.base_anchors(style=style)
  loc = grid[(2 * 4 + 3) * 9:(2 * 4 + 4) * 9]       # (i=2, j=3): centre (3.5 * 32, 2.5 * 8)
  np.testing.assert_allclose(loc, base + [112.0, 20.0, 112.0, 20.0], rtol=0, atol=1e-4)
  if style == "exact":
    for sy, sx in [(8, 32), (4.5, 7.25)]:
      want = [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
              for cy in (np.arange(3) + 0.5) * sy for cx in (np.arange(2) + 0.5) * sx
              for r in (0.5, 2.0) for w, h in ((s / math.sqrt(r), s * math.sqrt(r))
                                               for s in (40, 90))]
      np.testing.assert_allclose(anchor_ops.anchor_grid(3, 2, (sy, sx), (40, 90), (0.5, 2.0)),
                                 want, rtol=1e-6, atol=1e-4)


def test_torchvision_random_configurations_match_numpy_loop():
  rng = np.random.default_rng(2)
  for _ in range(100):
    feat_h, feat_w = (int(v) for v in rng.integers(0, 6, 2))
    stride_y, stride_x = (int(v) for v in rng.integers(1, 70, 2))
    sizes = tuple(int(v) for v in rng.integers(1, 600, rng.integers(1, 4)))
    ratios = tuple(float(v) for v in rng.uniform(0.2, 5, rng.integers(1, 4)))
    grid = anchor_ops.anchor_grid(feat_h, feat_w, (stride_y, stride_x), sizes, ratios,
                                  "torchvision")
    np.testing.assert_array_equal(
        grid, _np_torchvision_grid(feat_h, feat_w, stride_y, stride_x, sizes, ratios))


def test_bad_stride_raises():
  for stride in [0, -16, (16, 0), (16,), (16, 16, 16), float("nan")]:
    with pytest.raises(ValueError, match="stride"):
      anchor_ops.anchor_grid(2, 3, stride=stride, style="torchvision")


def _fpn_feature_sizes(canvas_h, canvas_w):
  """P2-P5 (strides 4..32 of a canvas divisible by 32) and P6 (max-pool 1, stride 2 of P5)."""
  sizes = [(canvas_h // s, canvas_w // s) for s in (4, 8, 16, 32)]
  return sizes + [(-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2))]


@pytest.mark.parametrize("canvas_hw", [(800, 1216), (96, 160), (1344, 800)])
def test_torchvision_anchor_generator_fpn_levels(canvas_hw):
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList

  sizes = (32, 64, 128, 256, 512)
  ratios = (0.5, 1.0, 2.0)
  generator = AnchorGenerator(sizes=tuple((s,) for s in sizes), aspect_ratios=(ratios,) * 5)
  canvas_h, canvas_w = canvas_hw
  feature_hw = _fpn_feature_sizes(canvas_h, canvas_w)
  images = ImageList(torch.zeros(2, 3, canvas_h, canvas_w),
                     [(canvas_h - 10, canvas_w), (canvas_h, canvas_w - 30)])
  with torch.no_grad():
    want = generator(images, [torch.zeros(2, 1, h, w) for h, w in feature_hw])
  assert len(want) == 2 and torch.equal(want[0], want[1])
  want = want[0].numpy()
  start = 0
  for (h, w), size in zip(feature_hw, sizes):
    stride = (canvas_h // h, canvas_w // w)
    got = anchor_ops.anchor_grid(h, w, stride, (size,), ratios, "torchvision")
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want[start:start + len(got)], err_msg=str((h, w)))
    start += len(got)
  assert start == len(want)
  if canvas_hw == (800, 1216):    # P6 is 13 x 19: stride (61, 64), not 64
    assert feature_hw[-1] == (13, 19)
    assert (canvas_h // 13, canvas_w // 19) == (61, 64)
