"""RPN proposal generation for one image: decode, clip, filter, top-k, NMS, top-n."""

import jax
import jax.numpy as jnp

from frcnn_jax.ops import boxes as box_ops
from frcnn_jax.ops import nms as nms_ops


def generate_proposals(
    objectness: jax.Array,
    deltas: jax.Array,
    anchors: jax.Array,
    image_hw: jax.Array,
    *,
    min_size: float | jax.Array,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Turns RPN outputs into a fixed number of proposals (one image).

  Steps: decode the deltas on the anchors, clip to the true image size (not the padded
  canvas), mask boxes whose width or height is below `min_size`, keep the top
  `pre_nms_top_n` valid boxes by score (all A when it is larger), NMS at `nms_threshold`
  among them, keep the first `post_nms_top_n` survivors by descending score. Gradients do not
  flow into the outputs (approximate joint training).

  Args:
    objectness: [A] object probabilities (or any score that ranks the same way).
    deltas: [A, 4] RPN box deltas (box coder weights 1).
    anchors: [A, 4] xyxy anchors.
    image_hw: [2] true (resized) image height and width.
    min_size: minimum box side in resized-image pixels (the config's 16 times the image
      scale); may be a traced scalar.
    pre_nms_top_n: static number of boxes entering NMS.
    post_nms_top_n: static number R of proposals returned.
    nms_threshold: IoU above which a lower-scored box is suppressed.

  Returns:
    boxes: [R, 4] xyxy proposals by descending score, zeros where invalid.
    scores: [R] their objectness, 0 where invalid.
    valid: [R] bool.
  """
  a = objectness.shape[0]
  if objectness.shape != (a,) or deltas.shape != (a, 4) or anchors.shape != (a, 4):
    raise ValueError(f"generate_proposals: objectness [A], deltas [A, 4] and anchors [A, 4] "
                     f"disagree: {objectness.shape}, {deltas.shape}, {anchors.shape}.")
  if pre_nms_top_n < 1 or post_nms_top_n < 1:
    raise ValueError(f"pre_nms_top_n ({pre_nms_top_n}) and post_nms_top_n ({post_nms_top_n}) "
                     "must be >= 1.")
  objectness = jax.lax.stop_gradient(objectness.astype(jnp.float32))
  deltas = jax.lax.stop_gradient(deltas.astype(jnp.float32))
  boxes = box_ops.clip(box_ops.decode(deltas, anchors), image_hw)
  big = ((boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size))
  scores = jnp.where(big, objectness, -jnp.inf)

  top_scores, top_idx = jax.lax.top_k(scores, min(pre_nms_top_n, a))
  top_boxes = boxes[top_idx]
  top_valid = top_scores > -jnp.inf
  n = min(post_nms_top_n, top_idx.shape[0])
  keep = nms_ops.nms(top_boxes, top_scores, nms_threshold, n, valid=top_valid)
  keep = jnp.pad(keep, (0, post_nms_top_n - n), constant_values=-1)
  valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  out_boxes = jnp.where(valid[:, None], top_boxes[safe], 0.0)
  out_scores = jnp.where(valid, top_scores[safe], 0.0)
  return out_boxes, out_scores, valid
