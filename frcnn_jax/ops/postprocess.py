"""Inference post-processing for one image: class-specific boxes, thresholds, per-class NMS."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from frcnn_jax.ops import boxes as box_ops
from frcnn_jax.ops import nms as nms_ops


def detections(
    class_scores: jax.Array,
    box_deltas: jax.Array,
    rois: jax.Array,
    rois_valid: jax.Array,
    image_hw: jax.Array,
    *,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    score_threshold: float = 0.05,
    nms_threshold: float = 0.3,
    max_detections: int = 100,
    min_size: float = 0.01,
    legacy_plus_one: bool = False,
    image_scale: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Final detections of one image, as py-faster-rcnn's test_net.

  Every valid RoI gives one candidate per foreground class c = 1..C: its class-c deltas
  decoded on the RoI (dividing by `weights`), clipped to the image, scored by the softmax
  probability of c. Candidates with score <= `score_threshold` or a side below `min_size`
  after clipping are dropped, NMS runs per class (`batched_nms`), and the `max_detections`
  best survivors over all classes are kept. (py-faster-rcnn keeps degenerate boxes: a box
  clipped to zero width or height is always a false positive and takes one of the slots;
  torchvision drops sides under 1e-2 px, as `min_size` does by default.)

  Args:
    class_scores: [R, C + 1] softmax probabilities, column 0 background.
    box_deltas: [R, C + 1, 4] or [R, 4 (C + 1)] class-specific deltas (class-major).
    rois: [R, 4] xyxy proposals in the resized-image frame.
    rois_valid: [R] bool.
    image_hw: [2] true (resized) image height and width.
    weights: the box coder weights used for training targets.
    score_threshold: a candidate needs a score strictly above this.
    nms_threshold: per-class NMS IoU threshold.
    max_detections: static number D of outputs.
    min_size: a candidate needs width and height >= this, in resized-image pixels (0 keeps
      zero-area boxes, as py-faster-rcnn).
    legacy_plus_one: static; reproduce py-faster-rcnn's `im_detect`, which decodes in
      original-image pixels with its "+1" inclusive convention: the RoIs (proposals made
      with `legacy_plus_one`, i.e. inclusive boxes with x2, y2 + 1) are taken to the original
      frame (its inclusive numbers divided by `image_scale`, + 1), decoded, given x2, y2 + 1
      (`bbox_transform_inv` returns inclusive ends one pixel out), clipped to the image and
      scaled back.
    image_scale: resized / original size (scalar, may be traced); used with legacy_plus_one.

  Returns:
    boxes: [D, 4] xyxy in the resized-image frame (divide by the scale for the original),
      zeros where invalid.
    scores: [D] by descending score, 0 where invalid.
    labels: [D] int32 classes in 1..C, 0 where invalid.
    valid: [D] bool.
  """
  if class_scores.ndim != 2 or class_scores.shape[1] < 2:
    raise ValueError(f"class_scores must have shape [R, C + 1] with C >= 1, got "
                     f"{class_scores.shape}.")
  r, k = class_scores.shape
  if box_deltas.shape not in ((r, k, 4), (r, 4 * k)):
    raise ValueError(f"box_deltas must have shape [{r}, {k}, 4] or [{r}, {4 * k}], got "
                     f"{box_deltas.shape}.")
  if rois.shape != (r, 4) or rois_valid.shape != (r,):
    raise ValueError(f"rois [R, 4] and rois_valid [R] must match R = {r}, got {rois.shape} "
                     f"and {rois_valid.shape}.")
  class_scores, box_deltas = jnp.asarray(class_scores), jnp.asarray(box_deltas)
  rois, rois_valid = jnp.asarray(rois), jnp.asarray(rois_valid)
  c = k - 1
  deltas = box_deltas.reshape(r, k, 4)[:, 1:].astype(jnp.float32)
  rois = rois.astype(jnp.float32)
  image_hw = jnp.asarray(image_hw).astype(jnp.float32)
  if legacy_plus_one:
    one = jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32)
    scale = jnp.asarray(image_scale, jnp.float32)
    rois = (rois - one) / scale + one
    boxes = box_ops.decode(deltas, rois[:, None, :], weights) + one
    boxes = box_ops.clip(boxes, image_hw / scale) * scale
  else:
    boxes = box_ops.clip(box_ops.decode(deltas, rois[:, None, :], weights), image_hw)
  boxes = boxes.reshape(r * c, 4)
  scores = class_scores[:, 1:].astype(jnp.float32).reshape(r * c)
  classes = jnp.tile(jnp.arange(1, k, dtype=jnp.int32), r)
  big = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
  candidate = jnp.repeat(rois_valid.astype(bool), c) & (scores > score_threshold) & big

  d = min(max_detections, r * c)
  keep = nms_ops.batched_nms(boxes, scores, classes, nms_threshold, d, valid=candidate)
  keep = jnp.pad(keep, (0, max_detections - d), constant_values=-1)
  valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  out_boxes = jnp.where(valid[:, None], boxes[safe], 0.0)
  out_scores = jnp.where(valid, scores[safe], 0.0)
  out_labels = jnp.where(valid, classes[safe], 0)
  return out_boxes, out_scores, out_labels, valid
