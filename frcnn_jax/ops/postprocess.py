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
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Final detections of one image, as py-faster-rcnn's test_net.

  Every valid RoI gives one candidate per foreground class c = 1..C: its class-c deltas
  decoded on the RoI (dividing by `weights`), clipped to the image, scored by the softmax
  probability of c. Candidates with score <= `score_threshold` are dropped, NMS runs per
  class (`batched_nms`), and the `max_detections` best survivors over all classes are kept.

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
  c = k - 1
  deltas = box_deltas.reshape(r, k, 4)[:, 1:].astype(jnp.float32)
  boxes = box_ops.decode(deltas, rois.astype(jnp.float32)[:, None, :], weights)
  boxes = box_ops.clip(boxes, image_hw).reshape(r * c, 4)
  scores = class_scores[:, 1:].astype(jnp.float32).reshape(r * c)
  classes = jnp.tile(jnp.arange(1, k, dtype=jnp.int32), r)
  candidate = jnp.repeat(rois_valid.astype(bool), c) & (scores > score_threshold)

  d = min(max_detections, r * c)
  keep = nms_ops.batched_nms(boxes, scores, classes, nms_threshold, d, valid=candidate)
  keep = jnp.pad(keep, (0, max_detections - d), constant_values=-1)
  valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  out_boxes = jnp.where(valid[:, None], boxes[safe], 0.0)
  out_scores = jnp.where(valid, scores[safe], 0.0)
  out_labels = jnp.where(valid, classes[safe], 0)
  return out_boxes, out_scores, out_labels, valid
