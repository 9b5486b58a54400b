"""The RPN anchor grid (docs/conventions.md).

At every feature-map location (row i, column j) there are A = len(ratios) * len(sizes)
anchors centred at ((j + 0.5) * stride, (i + 0.5) * stride). Anchors are ordered by row, then
column, then ratio (major) and size (minor). The grid is built in NumPy from static Python
numbers, so it is a constant under jit. Two anchor shapes (`style`):

* "exact" (default): for aspect ratio r = h / w and size s an anchor has width
  s / sqrt(r) and height s * sqrt(r) (area s^2 exactly). (torchvision's AnchorGenerator uses
  these shapes too but rounds the corners to integers and centres anchors on the cells' top
  left corners, j * stride.)
* "py-faster-rcnn": the shapes of py-faster-rcnn's `generate_anchors(base_size=16, ratios,
  scales=sizes / 16)` (lib/rpn/generate_anchors.py). It rounds the ratio step on the 16 x 16
  base box: w0 = np.round(sqrt(256 / r)), h0 = np.round(w0 * r) (NumPy rounds half to even),
  then scales both by s / 16. The 128-px anchor of ratio 0.5 is 184 x 96 there (23 x 12
  times 8), 181.02 x 90.51 in the exact style. py-faster-rcnn writes boxes as inclusive
  pixel indices (width = x2 - x1 + 1): its base box [0, 0, 15, 15] has the centre 7.5 and its
  first anchor is [-84, -40, 99, 55]. In the continuous convention used here (x2 = x2_incl + 1)
  that box is [-84, -40, 100, 56]: same width and height, centre 8 = (0 + 0.5) * 16, and its
  shifted copies (centre 7.5 + 16 j inclusive = 8 + 16 j continuous) are this module's centres
  ((j + 0.5) * 16). So at stride 16 the grid equals py-faster-rcnn's anchors with x2, y2
  shifted by +1, exactly. The rounding always uses the 16-px base box (py-faster-rcnn's
  default, independent of the feature stride); the centres stay ((j + 0.5) * stride) for any
  stride (py-faster-rcnn only uses 16). The MATLAB array quoted in generate_anchors.py
  ([-83, -39, 100, 56], ...) is 1-based; converted like a VOC box (x1 = xmin - 1, x2 = xmax)
  it is this grid's first location.
"""

from collections.abc import Sequence

import numpy as np

ANCHOR_STYLES = ("exact", "py-faster-rcnn")
PY_FASTER_RCNN_BASE_SIZE = 16


def _check(stride: float, sizes: Sequence[float], ratios: Sequence[float],
           style: str) -> None:
  if style not in ANCHOR_STYLES:
    raise ValueError(f"style must be one of {ANCHOR_STYLES}, got {style!r}.")
  if stride <= 0:
    raise ValueError(f"stride must be positive, got {stride}.")
  if len(sizes) == 0 or any(s <= 0 for s in sizes):
    raise ValueError(f"sizes must be a non-empty sequence of positive numbers, got {sizes}.")
  if len(ratios) == 0 or any(r <= 0 for r in ratios):
    raise ValueError(f"ratios must be a non-empty sequence of positive numbers, got {ratios}.")


def base_anchors(sizes: Sequence[float] = (128, 256, 512),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 style: str = "exact") -> np.ndarray:
  """The anchors of one location, centred at the origin.

  Args:
    sizes: anchor sizes s in pixels (square root of the area in the exact style).
    ratios: aspect ratios r = height / width.
    style: "exact" (exact sizes and ratios) or "py-faster-rcnn" (generate_anchors'
      rounded shapes; see the module docstring).

  Returns:
    [len(ratios) * len(sizes), 4] float32 xyxy boxes, ratio-major, size-minor.
  """
  _check(1, sizes, ratios, style)
  r = np.asarray(ratios, np.float64)[:, None]
  s = np.asarray(sizes, np.float64)[None, :]
  if style == "exact":
    w, h = s / np.sqrt(r), s * np.sqrt(r)
  else:
    base = float(PY_FASTER_RCNN_BASE_SIZE)
    w0 = np.round(np.sqrt(base * base / r))    # _ratio_enum
    h0 = np.round(w0 * r)
    if np.any(h0 < 1):
      raise ValueError(f"ratios {ratios} round to a zero-height py-faster-rcnn base anchor.")
    w, h = w0 * (s / base), h0 * (s / base)    # _scale_enum
  w, h = w.reshape(-1), h.reshape(-1)
  return np.stack([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h], axis=-1).astype(np.float32)


def anchor_grid(feat_h: int, feat_w: int, stride: float = 16,
                sizes: Sequence[float] = (128, 256, 512),
                ratios: Sequence[float] = (0.5, 1.0, 2.0),
                style: str = "exact") -> np.ndarray:
  """All anchors of a feat_h x feat_w feature map.

  Args:
    feat_h: feature-map height (a static Python int).
    feat_w: feature-map width (a static Python int).
    stride: feature stride in input pixels (16 for VGG16 conv5_3).
    sizes: anchor sizes s in pixels.
    ratios: aspect ratios r = height / width.
    style: anchor shapes, "exact" or "py-faster-rcnn" (module docstring).

  Returns:
    [feat_h * feat_w * A, 4] float32 xyxy anchors, A = len(ratios) * len(sizes); anchor
    a of location (i, j) is row (i * feat_w + j) * A + a. Anchors are not clipped.
  """
  if not (isinstance(feat_h, (int, np.integer)) and isinstance(feat_w, (int, np.integer))):
    raise ValueError(f"feat_h and feat_w must be static ints, got {feat_h!r}, {feat_w!r}.")
  if feat_h < 0 or feat_w < 0:
    raise ValueError(f"feat_h and feat_w must be >= 0, got {feat_h}, {feat_w}.")
  _check(stride, sizes, ratios, style)
  base = base_anchors(sizes, ratios, style).astype(np.float64)
  cy = (np.arange(feat_h, dtype=np.float64) + 0.5) * stride
  cx = (np.arange(feat_w, dtype=np.float64) + 0.5) * stride
  cy, cx = np.meshgrid(cy, cx, indexing="ij")
  centres = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
  return (centres + base[None]).reshape(-1, 4).astype(np.float32)
