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
