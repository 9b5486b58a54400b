"""Training targets for one image: RPN anchor labels and RoI sampling for the head.

Both functions work on one image with static shapes (padded ground truth plus a validity
mask) and are lifted to a batch with `jax.vmap`. Random subsets are drawn from an explicit
`jax.random` key: every candidate gets a uniform random priority and `lax.top_k` picks the
highest ones, which is an exactly uniform sample without replacement of a static size.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from frcnn_jax.ops import boxes as box_ops


def _check_boxes(name: str, x: jax.Array) -> None:
  if x.ndim != 2 or x.shape[-1] != 4:
    raise ValueError(f"{name} must have shape [N, 4], got {x.shape}.")


def _check_vector(name: str, x: jax.Array, n: int) -> None:
  if x.shape != (n,):
    raise ValueError(f"{name} must have shape [{n}], got {x.shape}.")


def _nonempty_gt(gt_boxes: jax.Array, gt_valid: jax.Array, *others: jax.Array):
  """Pads a zero-size ground-truth axis with one invalid entry (so reductions are defined)."""
  if gt_boxes.shape[0] > 0:
    return (gt_boxes, gt_valid, *others)
  pad = lambda x: jnp.zeros((1, *x.shape[1:]), x.dtype)
  return (pad(gt_boxes), pad(gt_valid), *(pad(o) for o in others))


def _random_subset(key: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Uniform random subset of at most `k` of the True entries of `mask`.

  Args:
    key: PRNG key.
    mask: [N] bool candidates.
    k: static maximum subset size.

  Returns:
    idx: [min(k, N)] int32 indices, the chosen entries first.
    ok: [min(k, N)] bool, True for the chosen entries (the first min(k, sum(mask))).
  """
  k = min(k, mask.shape[0])
  priority = jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0)
  values, idx = jax.lax.top_k(priority, k)
  return idx, values >= 0.0


def anchors_inside(anchors: jax.Array, image_hw: jax.Array, allowed_border: float) -> jax.Array:
  """Anchors that lie inside the image up to `allowed_border` pixels (all when it is < 0).

  Continuous coordinates: inside means x1 >= -b, y1 >= -b, x2 <= W + b, y2 <= H + b, which is
  py-faster-rcnn's test on inclusive pixel boxes (x2_incl < W + b) in this convention.

  Args:
    anchors: [A, 4] xyxy anchors.
    image_hw: [2] true (height, width) of the image.
    allowed_border: static border in pixels; negative disables the test.

  Returns:
    [A] bool.
  """
  if allowed_border < 0:
    return jnp.ones(anchors.shape[:1], bool)
  image_hw = jnp.asarray(image_hw, jnp.float32)
  h, w = image_hw[0], image_hw[1]
  b = allowed_border
  return ((anchors[:, 0] >= -b) & (anchors[:, 1] >= -b)
          & (anchors[:, 2] <= w + b) & (anchors[:, 3] <= h + b))


def rpn_targets(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    image_hw: jax.Array,
    key: jax.Array,
    *,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    positive_iou: float = 0.7,
    negative_iou: float = 0.3,
    allowed_border: float = 0.0,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> tuple[jax.Array, jax.Array]:
  """Labels anchors and samples a minibatch of them for the RPN loss (one image).

  Before sampling, an anchor inside the image (see `anchors_inside`) is
    * positive if its IoU with some valid ground-truth box is >= `positive_iou`, or if it is
      a best anchor of some valid ground-truth box g (IoU equal to g's maximum over the
      inside anchors, ties included, and that maximum > 0);
    * negative if it is not positive and its maximum IoU is < `negative_iou` (every inside
      anchor when there is no valid ground truth);
    * ignored otherwise. Anchors outside the image are ignored.
  Then at most int(positive_fraction * batch_size_per_image) positives are kept (uniform
  random subset), negatives fill the minibatch up to `batch_size_per_image` (uniform random
  subset), and every other anchor becomes -1.

  Args:
    anchors: [A, 4] xyxy anchors.
    gt_boxes: [G, 4] xyxy ground-truth boxes (padded).
    gt_valid: [G] bool, False for padding.
    image_hw: [2] true (resized) image height and width, not the padded canvas.
    key: PRNG key for the sampling.
    batch_size_per_image: static number of sampled anchors.
    positive_fraction: static maximum fraction of positives in the sample.
    positive_iou: IoU at or above which an anchor is positive.
    negative_iou: IoU below which an anchor is negative.
    allowed_border: static; anchors crossing the border by more pixels are ignored (< 0 keeps
      all anchors).
    weights: box coder weights for `encode`.

  Returns:
    labels: [A] int32, 1 positive, 0 negative, -1 ignored or not sampled.
    box_targets: [A, 4] encoded matched ground truth for positives, 0 elsewhere.
  """
  _check_boxes("anchors", anchors)
  _check_boxes("gt_boxes", gt_boxes)
  _check_vector("gt_valid", gt_valid, gt_boxes.shape[0])
  if not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}.")
  if negative_iou > positive_iou:
    raise ValueError(f"negative_iou ({negative_iou}) must not exceed positive_iou "
                     f"({positive_iou}).")
  anchors = jax.lax.stop_gradient(jnp.asarray(anchors, jnp.float32))
  gt_boxes, gt_valid = _nonempty_gt(jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32)),
                                    jnp.asarray(gt_valid, bool))
  inside = anchors_inside(anchors, image_hw, allowed_border)

  iou = box_ops.masked_iou(anchors, gt_boxes, gt_valid)          # [A, G], -1 for invalid gt
  iou = jnp.where(inside[:, None], iou, -1.0)
  max_iou = iou.max(axis=1)
  matched = iou.argmax(axis=1)
  gt_best = iou.max(axis=0)                                      # [G] over inside anchors
  is_best = ((iou == gt_best[None, :]) & (gt_best[None, :] > 0.0) & gt_valid[None, :]).any(1)
  positive = inside & ((max_iou >= positive_iou) | is_best)
  negative = inside & ~positive & (max_iou < negative_iou)

  num_pos = int(positive_fraction * batch_size_per_image)
  key_pos, key_neg = jax.random.split(key)
  pos_idx, pos_ok = _random_subset(key_pos, positive, num_pos)
  neg_idx, neg_ok = _random_subset(key_neg, negative, batch_size_per_image)
  neg_ok &= jnp.arange(neg_ok.shape[0]) < batch_size_per_image - pos_ok.sum()
  labels = jnp.full(anchors.shape[:1], -1, jnp.int32)
  labels = labels.at[neg_idx].set(jnp.where(neg_ok, 0, labels[neg_idx]))
  labels = labels.at[pos_idx].set(jnp.where(pos_ok, 1, labels[pos_idx]))

  encoded = box_ops.encode(gt_boxes[matched], anchors, weights)
  box_targets = jnp.where((labels == 1)[:, None], encoded, 0.0)
  return labels, box_targets


def sample_proposals(
    proposals: jax.Array,
    proposals_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    key: jax.Array,
    *,
    batch_size_per_image: int = 128,
    fg_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou_lo: float = 0.0,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Samples RoIs for the detection head and builds their targets (one image).

  The valid ground-truth boxes are appended to the proposals (R + G candidates). A candidate
  is foreground if its maximum IoU with the valid ground truth is >= `fg_iou`, background if
  it lies in [bg_iou_lo, fg_iou). With no valid ground truth every valid candidate is
  background whatever `bg_iou_lo` is. Sampling is without replacement, as in py-faster-rcnn:
  at most round(fg_fraction * S) foreground (uniform random subset), then background fills
  up to S = batch_size_per_image. When fewer candidates exist the remaining slots are unused:
  label -1, roi_valid False, zero box, target and weight; the losses ignore them and
  normalise by the number of valid slots. Foreground slots come first.

  Args:
    proposals: [R, 4] xyxy proposals.
    proposals_valid: [R] bool.
    gt_boxes: [G, 4] xyxy ground truth (padded).
    gt_labels: [G] int32 classes in 1..C.
    gt_valid: [G] bool.
    key: PRNG key for the sampling.
    batch_size_per_image: static number S of sampled RoIs.
    fg_fraction: static maximum foreground fraction.
    fg_iou: IoU at or above which a RoI is foreground.
    bg_iou_lo: lowest IoU of a background RoI.
    weights: box coder weights; (10, 10, 5, 5) normalises targets by (0.1, 0.1, 0.2, 0.2).

  Returns:
    rois: [S, 4] sampled boxes.
    roi_labels: [S] int32, the ground-truth class for foreground, 0 background, -1 unused.
    box_targets: [S, 4] encoded targets of the true class (0 unless foreground).
    box_weights: [S] float32, 1 for foreground, else 0.
    roi_valid: [S] bool, True for used slots.
  """
  _check_boxes("proposals", proposals)
  _check_vector("proposals_valid", proposals_valid, proposals.shape[0])
  _check_boxes("gt_boxes", gt_boxes)
  _check_vector("gt_labels", gt_labels, gt_boxes.shape[0])
  _check_vector("gt_valid", gt_valid, gt_boxes.shape[0])
  if not 0.0 <= fg_fraction <= 1.0:
    raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}.")
  if bg_iou_lo > fg_iou:
    raise ValueError(f"bg_iou_lo ({bg_iou_lo}) must not exceed fg_iou ({fg_iou}).")
  gt_boxes, gt_valid, gt_labels = _nonempty_gt(
      jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32)), jnp.asarray(gt_valid, bool),
      jnp.asarray(gt_labels, jnp.int32))
  boxes = jnp.concatenate([jax.lax.stop_gradient(jnp.asarray(proposals, jnp.float32)),
                           gt_boxes])
  valid = jnp.concatenate([jnp.asarray(proposals_valid, bool), gt_valid])

  iou = box_ops.masked_iou(boxes, gt_boxes, gt_valid)
  max_iou = iou.max(axis=1)
  matched = iou.argmax(axis=1)
  has_gt = gt_valid.any()
  fg = valid & (max_iou >= fg_iou)
  bg = valid & (max_iou < fg_iou) & ((max_iou >= bg_iou_lo) | ~has_gt)

  s = batch_size_per_image
  num_fg = int(round(fg_fraction * s))
  key_fg, key_bg = jax.random.split(key)
  fg_idx, fg_ok = _random_subset(key_fg, fg, num_fg)
  bg_idx, bg_ok = _random_subset(key_bg, bg, s)
  n_fg = fg_ok.sum()
  n_bg = jnp.minimum(bg_ok.sum(), s - n_fg)

  slot = jnp.arange(s)
  fg_slot = jnp.minimum(slot, max(fg_idx.shape[0] - 1, 0))
  bg_slot = jnp.clip(slot - n_fg, 0, bg_idx.shape[0] - 1)
  is_fg = slot < n_fg
  roi_valid = slot < n_fg + n_bg
  if fg_idx.shape[0] > 0:
    index = jnp.where(is_fg, fg_idx[fg_slot], bg_idx[bg_slot])
  else:
    index = bg_idx[bg_slot]

  rois = jnp.where(roi_valid[:, None], boxes[index], 0.0)
  gt_of_roi = matched[index]
  roi_labels = jnp.where(is_fg, gt_labels[gt_of_roi], jnp.where(roi_valid, 0, -1))
  encoded = box_ops.encode(gt_boxes[gt_of_roi], boxes[index], weights)
  box_targets = jnp.where(is_fg[:, None], encoded, 0.0)
  return rois, roi_labels.astype(jnp.int32), box_targets, is_fg.astype(jnp.float32), roi_valid
