"""RPN proposal generation for one image: decode, clip, filter, top-k, NMS, top-n.

`generate_proposals` follows py-faster-rcnn's proposal layer (one feature level);
`generate_level_proposals` follows torchvision's RegionProposalNetwork (FPN levels).
"""

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops import boxes as box_ops
from frcnn_jax.ops import nms as nms_ops


def _checked_inputs(caller: str, objectness_logits, deltas, anchors, pre_nms_top_n: int,
                    post_nms_top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[A] logits, [A, 4] deltas and [A, 4] anchors as float32 without gradient.

  Raises:
    ValueError: the shapes disagree, or a count is below 1.
  """
  objectness_logits = jnp.asarray(objectness_logits)
  deltas, anchors = jnp.asarray(deltas), jnp.asarray(anchors)
  a = objectness_logits.shape[0] if objectness_logits.ndim == 1 else -1
  if objectness_logits.shape != (a,) or deltas.shape != (a, 4) or anchors.shape != (a, 4):
    raise ValueError(f"{caller}: objectness_logits [A], deltas [A, 4] and anchors [A, 4] "
                     f"disagree: {objectness_logits.shape}, {deltas.shape}, {anchors.shape}.")
  if pre_nms_top_n < 1 or post_nms_top_n < 1:
    raise ValueError(f"pre_nms_top_n ({pre_nms_top_n}) and post_nms_top_n ({post_nms_top_n}) "
                     "must be >= 1.")
  return tuple(jax.lax.stop_gradient(x.astype(jnp.float32))
               for x in (objectness_logits, deltas, anchors))


def generate_proposals(
    objectness_logits: jax.Array,
    deltas: jax.Array,
    anchors: jax.Array,
    image_hw: jax.Array,
    *,
    min_size: float | jax.Array,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_threshold: float,
    legacy_plus_one: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Turns RPN outputs into a fixed number of proposals (one image).

  Steps, as py-faster-rcnn's proposal_layer: decode the deltas on the anchors, clip to the true
  image size (not the padded canvas), mask boxes whose width or height is below `min_size`,
  keep the top `pre_nms_top_n` valid boxes by score (all A when it is larger), NMS at
  `nms_threshold` among them, keep the first `post_nms_top_n` survivors by descending score.
  Anchors whose centre lies outside the true image (in the canvas padding: x outside
  [0, width] or y outside [0, height]) never become proposals: training never labels them, so
  their objectness is unsupervised. Gradients do not flow into the outputs (approximate joint
  training).

  Boxes are ranked by the objectness logit, not by the probability: a float32 sigmoid is
  exactly 1.0 above a logit of about 16.6, so ranking probabilities would break many ties by
  anchor index. The logit orders the same wherever the probabilities differ. Equal logits
  keep the lower anchor index first.

  Args:
    objectness_logits: [A] log-odds that each anchor holds an object: the sigmoid logit, or
      for 2-way softmax objectness the object logit minus the background logit
      (`frcnn_jax.models.rpn.objectness_logits`).
    deltas: [A, 4] RPN box deltas (box coder weights 1).
    anchors: [A, 4] xyxy anchors.
    image_hw: [2] true (resized) image height and width.
    min_size: minimum box side in resized-image pixels (the config's 16 times the image
      scale); may be a traced scalar.
    pre_nms_top_n: static number of boxes entering NMS.
    post_nms_top_n: static number R of proposals returned.
    nms_threshold: IoU above which a lower-scored box is suppressed.
    legacy_plus_one: static; decoded boxes get x2 + 1 and y2 + 1 before clipping, as
      py-faster-rcnn: its `bbox_transform_inv` returns ctr +- w / 2 as *inclusive* pixel
      indices, one pixel wider and taller than the box the deltas encode (its `bbox_transform`
      counts widths as x2 - x1 + 1). Every later step there (clip to W - 1, min size and IoU
      with "+1") treats that box consistently, so this flag reproduces its proposals (tested;
      up to float rounding, its arbitrary order of equal scores, and the anchors centred
      outside the image, which it keeps).

  Returns:
    boxes: [R, 4] xyxy proposals by descending score, zeros where invalid.
    scores: [R] their object probability sigmoid(logit), 0 where invalid.
    valid: [R] bool.
  """
  logits, deltas, anchors = _checked_inputs("generate_proposals", objectness_logits, deltas,
                                            anchors, pre_nms_top_n, post_nms_top_n)
  a = logits.shape[0]
  image_hw = jnp.asarray(image_hw).astype(jnp.float32)
  boxes = box_ops.decode(deltas, anchors)
  if legacy_plus_one:
    boxes = boxes + jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32)
  boxes = box_ops.clip(boxes, image_hw)
  big = ((boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size))
  cx = 0.5 * (anchors[:, 0] + anchors[:, 2])
  cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
  in_image = (cx >= 0) & (cx <= image_hw[1]) & (cy >= 0) & (cy <= image_hw[0])
  scores = jnp.where(big & in_image, logits, -jnp.inf)

  top_scores, top_idx = jax.lax.top_k(scores, min(pre_nms_top_n, a))
  top_boxes = boxes[top_idx]
  top_valid = top_scores > -jnp.inf
  n = min(post_nms_top_n, top_idx.shape[0])
  keep = nms_ops.nms(top_boxes, top_scores, nms_threshold, n, valid=top_valid)
  keep = jnp.pad(keep, (0, post_nms_top_n - n), constant_values=-1)
  valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  out_boxes = jnp.where(valid[:, None], top_boxes[safe], 0.0)
  out_scores = jnp.where(valid, jax.nn.sigmoid(top_scores[safe]), 0.0)
  return out_boxes, out_scores, valid


def generate_level_proposals(
    objectness_logits: jax.Array,
    deltas: jax.Array,
    anchors: jax.Array,
    image_hw: jax.Array,
    *,
    level_sizes: tuple[int, ...],
    min_size: float | jax.Array,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Turns multi-level (FPN) RPN outputs into a fixed number of proposals (one image).

  torchvision's `RegionProposalNetwork.filter_proposals` (models/detection/rpn.py) for one
  image, with static shapes: the anchors come in L consecutive blocks, one per feature level.
  Steps: per level, the top min(pre_nms_top_n, A_l) anchors by objectness logit (before any
  filtering, as torchvision); decode their deltas (box coder weights 1), clip to the true
  image size `image_hw`, drop boxes whose width or height is below `min_size`
  (torchvision's remove_small_boxes; its RPN uses 1e-3); NMS at `nms_threshold` per level
  (boxes of two levels never suppress each other: torchvision's batched_nms with the level
  as the class); keep the first `post_nms_top_n` survivors of all levels by descending score.
  torchvision's score threshold (0.0 on a probability) keeps every box. Unlike
  `generate_proposals` there is no mask on anchors centred in the canvas padding
  (torchvision has none). With level_sizes=(A,) this is torchvision's single-level RPN.
  Gradients do not flow into the outputs.

  Boxes are ranked by the objectness logit, torchvision's NMS and final sort by the
  probability sigmoid(logit); the two orders agree wherever the probabilities differ. Where
  float32 probabilities tie (above a logit of about 16.6 they are all 1.0) torchvision's
  order is its score sort's: on short inputs the candidates' order (level, then logit), on
  long ones (torch.sort is not stable there) undefined. Here it follows the logits, which
  within a level is torchvision's order too; equal logits keep the lower level, then the
  higher-ranked anchor of the level's top-k, first.

  Args:
    objectness_logits: [A] log-odds that each anchor holds an object (the sigmoid logit).
    deltas: [A, 4] RPN box deltas (box coder weights 1).
    anchors: [A, 4] xyxy anchors, level by level (e.g. `anchor_grid` per level, concatenated).
    image_hw: [2] true (resized) image height and width, not the padded canvas.
    level_sizes: static positive ints A_l, the anchors of each level in order; they must
      sum to A.
    min_size: minimum box side, in the pixels of the boxes; may be a traced scalar.
    pre_nms_top_n: static number of boxes per level entering NMS (all A_l when larger).
    post_nms_top_n: static number R of proposals returned.
    nms_threshold: IoU above which a lower-scored box of the same level is suppressed.

  Returns:
    boxes: [R, 4] xyxy proposals by descending score, zeros where invalid.
    scores: [R] their object probability sigmoid(logit), 0 where invalid.
    valid: [R] bool.

  Raises:
    ValueError: input shapes that disagree, level_sizes that are not positive ints summing
      to A, or pre_nms_top_n or post_nms_top_n below 1.
  """
  logits, deltas, anchors = _checked_inputs("generate_level_proposals", objectness_logits,
                                            deltas, anchors, pre_nms_top_n, post_nms_top_n)
  a = logits.shape[0]
  level_sizes = tuple(level_sizes)
  if not level_sizes or not all(isinstance(n, (int, np.integer)) for n in level_sizes):
    raise ValueError(f"level_sizes must be a non-empty tuple of static ints, got {level_sizes}.")
  if any(n < 1 for n in level_sizes):
    raise ValueError(f"level_sizes has an empty level: {level_sizes}.")
  if sum(level_sizes) != a:
    raise ValueError(f"level_sizes {level_sizes} sum to {sum(level_sizes)}, not to the "
                     f"number of anchors A = {a}.")
  image_hw = jax.lax.stop_gradient(jnp.asarray(image_hw).astype(jnp.float32))

  # Per-level top-k: K = sum_l min(pre_nms_top_n, A_l) candidates, level by level.
  index, levels = [], []
  start = 0
  for level, size in enumerate(level_sizes):
    k = min(pre_nms_top_n, int(size))
    index.append(jax.lax.top_k(logits[start:start + size], k)[1] + start)
    levels.append(np.full((k,), level, np.int32))
    start += size
  index = jnp.concatenate(index)
  levels = jnp.asarray(np.concatenate(levels))
  top_logits = logits[index]
  boxes = box_ops.clip(box_ops.decode(deltas[index], anchors[index]), image_hw)
  big = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)

  n = min(post_nms_top_n, index.shape[0])
  keep = nms_ops.batched_nms(boxes, top_logits, levels, nms_threshold, n, valid=big)
  keep = jnp.pad(keep, (0, post_nms_top_n - n), constant_values=-1)
  valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  out_boxes = jnp.where(valid[:, None], boxes[safe], 0.0)
  out_scores = jnp.where(valid, jax.nn.sigmoid(top_logits[safe]), 0.0)
  return out_boxes, out_scores, valid
