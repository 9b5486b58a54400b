"""Box geometry: areas, IoU, clipping, format converters and the Faster R-CNN box coder.

Boxes are `[..., 4]` arrays of `(x1, y1, x2, y2)` in absolute pixels, float32, continuous
coordinates: width = x2 - x1 and height = y2 - y1, with no "+1" (docs/conventions.md). Every
function works on any leading batch dimensions and returns float32.

The box coder follows the paper: for a box with centre (x, y) and size (w, h) and an anchor
with centre (x_a, y_a) and size (w_a, h_a) (centre = x1 + w / 2),

  t_x = (x - x_a) / w_a,  t_y = (y - y_a) / h_a,  t_w = log(w / w_a),  t_h = log(h / h_a),

and `encode` returns `(t_x, t_y, t_w, t_h) * weights`. `decode` divides by the weights, clamps
t_w and t_h from above at log(1000 / 16) so that exp() cannot overflow, and inverts the above.
"""

import math
from collections.abc import Sequence

import jax.numpy as jnp

Array = jnp.ndarray

# Upper clamp on the decoded log-size deltas t_w, t_h (as in Detectron / torchvision).
DECODE_CLAMP = math.log(1000.0 / 16.0)
# Widths and heights are floored at this size inside `encode` so that degenerate boxes and
# anchors give large but finite deltas instead of inf/NaN.
_MIN_SIZE = 1e-6


def _as_boxes(boxes: Array, name: str = "boxes") -> Array:
  boxes = jnp.asarray(boxes, jnp.float32)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have shape [..., 4], got {boxes.shape}.")
  return boxes


def _as_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
  weights = tuple(float(w) for w in weights)
  if len(weights) != 4 or any(w <= 0 for w in weights):
    raise ValueError(f"weights must be 4 positive numbers, got {weights}.")
  return weights


def area(boxes: Array) -> Array:
  """Areas of boxes; inverted boxes (x2 < x1 or y2 < y1) have area 0.

  Args:
    boxes: [..., 4] xyxy boxes.

  Returns:
    [...] float32 areas.
  """
  boxes = _as_boxes(boxes)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def iou(boxes1: Array, boxes2: Array) -> Array:
  """Pairwise intersection over union.

  Inverted boxes count as empty. Where the union is empty (both boxes have zero area) the IoU
  is 0, never NaN; the gradient is finite everywhere.

  Args:
    boxes1: [..., N, 4] xyxy boxes.
    boxes2: [..., M, 4] xyxy boxes (leading dimensions broadcast against boxes1's).

  Returns:
    [..., N, M] float32 IoU in [0, 1].
  """
  boxes1 = _as_boxes(boxes1, "boxes1")
  boxes2 = _as_boxes(boxes2, "boxes2")
  if boxes1.ndim < 2 or boxes2.ndim < 2:
    raise ValueError(
        f"iou takes [..., N, 4] and [..., M, 4], got {boxes1.shape} and {boxes2.shape}.")
  a = boxes1[..., :, None, :]
  b = boxes2[..., None, :, :]
  iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
  ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
  inter = iw * ih
  union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - inter
  positive = union > 0.0
  return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def masked_iou(boxes: Array, gt: Array, gt_valid: Array) -> Array:
  """IoU against padded ground truth: -1 in the columns of invalid entries.

  Since every real IoU is >= 0, an invalid ground-truth box never wins an argmax, never passes
  a threshold and never counts as a negative (IoU < t) match either when callers test
  `iou >= 0` first.

  Args:
    boxes: [..., N, 4] xyxy boxes (anchors or proposals).
    gt: [..., G, 4] xyxy ground-truth boxes.
    gt_valid: [..., G] bool, False for padding entries.

  Returns:
    [..., N, G] float32 IoU, -1 where gt_valid is False.
  """
  gt_valid = jnp.asarray(gt_valid, bool)
  gt = _as_boxes(gt, "gt")
  if gt_valid.shape[-1:] != gt.shape[-2:-1]:
    raise ValueError(f"gt_valid {gt_valid.shape} does not match gt {gt.shape}.")
  return jnp.where(gt_valid[..., None, :], iou(boxes, gt), -1.0)


def clip(boxes: Array, image_hw: Array) -> Array:
  """Clips boxes to the image: x to [0, width], y to [0, height].

  Args:
    boxes: [..., 4] xyxy boxes.
    image_hw: [2] (height, width), or [..., 2] broadcasting against boxes' leading
      dimensions (for example [B, 2] with boxes [B, N, 4] needs image_hw[:, None]).

  Returns:
    [..., 4] clipped boxes.
  """
  boxes = _as_boxes(boxes)
  image_hw = jnp.asarray(image_hw, jnp.float32)
  if image_hw.shape[-1:] != (2,):
    raise ValueError(f"image_hw must have shape [..., 2], got {image_hw.shape}.")
  h, w = image_hw[..., 0], image_hw[..., 1]
  x1 = jnp.clip(boxes[..., 0], 0.0, w)
  y1 = jnp.clip(boxes[..., 1], 0.0, h)
  x2 = jnp.clip(boxes[..., 2], 0.0, w)
  y2 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def xyxy_to_cxcywh(boxes: Array) -> Array:
  """Converts (x1, y1, x2, y2) to (cx, cy, w, h) with cx = x1 + w / 2.

  Args:
    boxes: [..., 4] xyxy boxes.

  Returns:
    [..., 4] (centre x, centre y, width, height).
  """
  boxes = _as_boxes(boxes)
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return jnp.stack([boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h], axis=-1)


def cxcywh_to_xyxy(boxes: Array) -> Array:
  """Converts (cx, cy, w, h) to (x1, y1, x2, y2).

  Args:
    boxes: [..., 4] (centre x, centre y, width, height).

  Returns:
    [..., 4] xyxy boxes.
  """
  boxes = _as_boxes(boxes)
  cx, cy, w, h = (boxes[..., k] for k in range(4))
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def encode(boxes: Array, anchors: Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Array:
  """Regression targets of boxes relative to anchors (the paper's t_x, t_y, t_w, t_h).

  Widths and heights are floored at 1e-6 so that degenerate boxes give finite deltas.

  Args:
    boxes: [..., 4] xyxy target boxes.
    anchors: [..., 4] xyxy reference boxes (anchors or proposals), broadcasting with boxes.
    weights: (w_x, w_y, w_w, w_h) multipliers, e.g. (10, 10, 5, 5) for the detection head.

  Returns:
    [..., 4] deltas (t_x * w_x, t_y * w_y, t_w * w_w, t_h * w_h).
  """
  wx, wy, ww, wh = _as_weights(weights)
  boxes = _as_boxes(boxes)
  anchors = _as_boxes(anchors, "anchors")
  bx, by, bw, bh = (xyxy_to_cxcywh(boxes)[..., k] for k in range(4))
  ax, ay, aw, ah = (xyxy_to_cxcywh(anchors)[..., k] for k in range(4))
  aw = jnp.maximum(aw, _MIN_SIZE)
  ah = jnp.maximum(ah, _MIN_SIZE)
  tx = (bx - ax) / aw
  ty = (by - ay) / ah
  tw = jnp.log(jnp.maximum(bw, _MIN_SIZE) / aw)
  th = jnp.log(jnp.maximum(bh, _MIN_SIZE) / ah)
  return jnp.stack([tx * wx, ty * wy, tw * ww, th * wh], axis=-1)


def decode(deltas: Array, anchors: Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Array:
  """Applies deltas to anchors: the inverse of `encode`.

  The log-size deltas t_w, t_h are clamped from above at log(1000 / 16) after dividing by
  the weights, so a box is at most 62.5 times its anchor's size.

  Args:
    deltas: [..., 4] (t_x * w_x, t_y * w_y, t_w * w_w, t_h * w_h).
    anchors: [..., 4] xyxy reference boxes, broadcasting with deltas.
    weights: (w_x, w_y, w_w, w_h), the same as given to `encode`.

  Returns:
    [..., 4] xyxy boxes (not clipped to the image).
  """
  wx, wy, ww, wh = _as_weights(weights)
  deltas = _as_boxes(deltas, "deltas")
  anchors = _as_boxes(anchors, "anchors")
  ax, ay, aw, ah = (xyxy_to_cxcywh(anchors)[..., k] for k in range(4))
  tx = deltas[..., 0] / wx
  ty = deltas[..., 1] / wy
  tw = jnp.minimum(deltas[..., 2] / ww, DECODE_CLAMP)
  th = jnp.minimum(deltas[..., 3] / wh, DECODE_CLAMP)
  cx = ax + tx * aw
  cy = ay + ty * ah
  w = aw * jnp.exp(tw)
  h = ah * jnp.exp(th)
  return cxcywh_to_xyxy(jnp.stack([cx, cy, w, h], axis=-1))
