"""The RPN anchor grid (docs/conventions.md).

At every feature-map location (row i, column j) there are A = len(ratios) * len(sizes)
anchors. Anchors are ordered by row, then column, then ratio (major) and size (minor). The
grid is built in NumPy from static Python numbers, so it is a constant under jit. `stride` is
one number or a pair (stride_y, stride_x). The anchors of location (i, j) are centred at the
cell centre ((j + 0.5) * stride_x, (i + 0.5) * stride_y), except in the "torchvision" style
(below). Three anchor shapes (`style`):

* "exact" (default): for aspect ratio r = h / w and size s an anchor has width
  s / sqrt(r) and height s * sqrt(r) (area s^2 exactly).
* "torchvision": torchvision's `AnchorGenerator` (models/detection/anchor_utils.py), exactly.
  The base anchors are computed in float32 as torch does: h_ratios = sqrt(r),
  w_ratios = 1 / h_ratios, ws = w_ratios * s, hs = h_ratios * s, then
  [-ws, -hs, ws, hs] / 2 rounded half to even (torch.round) to integers. The 32-px anchor of
  ratio 0.5 is [-23, -11, 23, 11] (46 x 22; 45.25 x 22.63 in the exact style). They are
  centred at the cells' top-left corners (j * stride_x, i * stride_y), not at the cell
  centres. torchvision's stride of a level is (canvas_h // feat_h, canvas_w // feat_w) of the
  padded batch tensor, which is not always the nominal one: an 800 x 1216 canvas has a
  13 x 19 P6 (max-pooled with stride 2 from the 25 x 38 P5), so stride (61, 64), not 64;
  pass that pair to reproduce its anchors.
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

ANCHOR_STYLES = ("exact", "py-faster-rcnn", "torchvision")
PY_FASTER_RCNN_BASE_SIZE = 16


def _strides(stride) -> tuple[float, float]:
  """(stride_y, stride_x) of a positive number or a pair of positive numbers."""
  s = np.asarray(stride, np.float64)
  if s.shape == ():
    s = np.stack([s, s])
  if s.shape != (2,) or not np.all(s > 0) or not np.all(np.isfinite(s)):
    raise ValueError("stride must be a positive number or a pair (stride_y, stride_x) of "
                     f"positive numbers, got {stride!r}.")
  return s[0], s[1]


def _check(sizes: Sequence[float], ratios: Sequence[float], style: str) -> None:
  if style not in ANCHOR_STYLES:
    raise ValueError(f"style must be one of {ANCHOR_STYLES}, got {style!r}.")
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
    style: "exact" (exact sizes and ratios), "torchvision" (AnchorGenerator's float32
      shapes rounded to integers) or "py-faster-rcnn" (generate_anchors' rounded shapes); see
      the module docstring.

  Returns:
    [len(ratios) * len(sizes), 4] float32 xyxy boxes, ratio-major, size-minor.

  Raises:
    ValueError: an unknown style, empty or non-positive sizes or ratios, or py-faster-rcnn
      ratios that round to a zero-height base box.
  """
  _check(sizes, ratios, style)
  if style == "torchvision":    # AnchorGenerator.generate_anchors, float32 step by step
    s = np.asarray(sizes, np.float64).astype(np.float32)[None, :]
    h_ratios = np.sqrt(np.asarray(ratios, np.float64).astype(np.float32))
    w_ratios = np.float32(1) / h_ratios
    ws, hs = (w_ratios[:, None] * s).reshape(-1), (h_ratios[:, None] * s).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=-1) / np.float32(2))
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


def anchor_grid(feat_h: int, feat_w: int, stride: float | tuple[float, float] = 16,
                sizes: Sequence[float] = (128, 256, 512),
                ratios: Sequence[float] = (0.5, 1.0, 2.0),
                style: str = "exact") -> np.ndarray:
  """All anchors of a feat_h x feat_w feature map.

  Args:
    feat_h: feature-map height (a static Python int).
    feat_w: feature-map width (a static Python int).
    stride: feature stride in input pixels (16 for VGG16 conv5_3), or a pair
      (stride_y, stride_x): torchvision derives each level's stride from the padded canvas
      and the level's size, which may differ along the two axes (module docstring).
    sizes: anchor sizes s in pixels.
    ratios: aspect ratios r = height / width.
    style: anchor shapes and centres, "exact", "torchvision" or "py-faster-rcnn" (module
      docstring).

  Returns:
    [feat_h * feat_w * A, 4] float32 xyxy anchors, A = len(ratios) * len(sizes); anchor
    a of location (i, j) is row (i * feat_w + j) * A + a. Anchors are not clipped.

  Raises:
    ValueError: feat_h or feat_w not a static int >= 0, a stride that is not positive (or
      not a pair of positive numbers), or bad sizes, ratios or style (`base_anchors`).
  """
  if not (isinstance(feat_h, (int, np.integer)) and isinstance(feat_w, (int, np.integer))):
    raise ValueError(  # noqa: TRY004 (a bad argument value, as the other checks here)
        f"feat_h and feat_w must be static ints, got {feat_h!r}, {feat_w!r}.")
  if feat_h < 0 or feat_w < 0:
    raise ValueError(f"feat_h and feat_w must be >= 0, got {feat_h}, {feat_w}.")
  stride_y, stride_x = _strides(stride)
  _check(sizes, ratios, style)
  base = base_anchors(sizes, ratios, style).astype(np.float64)
  offset = 0.0 if style == "torchvision" else 0.5    # cell corner or cell centre
  cy = (np.arange(feat_h, dtype=np.float64) + offset) * stride_y
  cx = (np.arange(feat_w, dtype=np.float64) + offset) * stride_x
  cy, cx = np.meshgrid(cy, cx, indexing="ij")
  centres = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
  return (centres + base[None]).reshape(-1, 4).astype(np.float32)
