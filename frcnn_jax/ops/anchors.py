"""The RPN anchor grid (DESIGN.md).

At every feature-map location (row i, column j) there are A = len(ratios) * len(sizes)
anchors centred at ((j + 0.5) * stride, (i + 0.5) * stride). For aspect ratio r = h / w and
size s an anchor has width s / sqrt(r) and height s * sqrt(r) (area s^2). Anchors are ordered
by row, then column, then ratio (major) and size (minor). The grid is built in NumPy from
static Python numbers, so it is a constant under jit.
"""

from collections.abc import Sequence

import numpy as np


def _check(stride: float, sizes: Sequence[float], ratios: Sequence[float]) -> None:
  if stride <= 0:
    raise ValueError(f"stride must be positive, got {stride}.")
  if not sizes or any(s <= 0 for s in sizes):
    raise ValueError(f"sizes must be a non-empty sequence of positive numbers, got {sizes}.")
  if not ratios or any(r <= 0 for r in ratios):
    raise ValueError(f"ratios must be a non-empty sequence of positive numbers, got {ratios}.")


def base_anchors(sizes: Sequence[float] = (128, 256, 512),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> np.ndarray:
  """The anchors of one location, centred at the origin.

  Args:
    sizes: anchor sizes s in pixels (square root of the area).
    ratios: aspect ratios r = height / width.

  Returns:
    [len(ratios) * len(sizes), 4] float32 xyxy boxes, ratio-major, size-minor.
  """
  _check(1, sizes, ratios)
  r = np.asarray(ratios, np.float64)[:, None]
  s = np.asarray(sizes, np.float64)[None, :]
  w = (s / np.sqrt(r)).reshape(-1)
  h = (s * np.sqrt(r)).reshape(-1)
  return np.stack([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h], axis=-1).astype(np.float32)


def anchor_grid(feat_h: int, feat_w: int, stride: float = 16,
                sizes: Sequence[float] = (128, 256, 512),
                ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> np.ndarray:
  """All anchors of a feat_h x feat_w feature map.

  Args:
    feat_h: feature-map height (a static Python int).
    feat_w: feature-map width (a static Python int).
    stride: feature stride in input pixels (16 for VGG16 conv5_3).
    sizes: anchor sizes s in pixels.
    ratios: aspect ratios r = height / width.

  Returns:
    [feat_h * feat_w * A, 4] float32 xyxy anchors, A = len(ratios) * len(sizes); anchor
    a of location (i, j) is row (i * feat_w + j) * A + a. Anchors are not clipped.
  """
  if not (isinstance(feat_h, (int, np.integer)) and isinstance(feat_w, (int, np.integer))):
    raise ValueError(f"feat_h and feat_w must be static ints, got {feat_h!r}, {feat_w!r}.")
  if feat_h < 0 or feat_w < 0:
    raise ValueError(f"feat_h and feat_w must be >= 0, got {feat_h}, {feat_w}.")
  _check(stride, sizes, ratios)
  base = base_anchors(sizes, ratios).astype(np.float64)
  cy = (np.arange(feat_h, dtype=np.float64) + 0.5) * stride
  cx = (np.arange(feat_w, dtype=np.float64) + 0.5) * stride
  cy, cx = np.meshgrid(cy, cx, indexing="ij")
  centres = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
  return (centres + base[None]).reshape(-1, 4).astype(np.float32)
