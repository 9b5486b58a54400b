"""Faster R-CNN as pure functions of (params, batch): the training loss and inference.

This is the glue between the Flax network (`frcnn_jax.models.faster_rcnn`) and the static-shape
ops (anchors, targets, losses, proposals, post-processing). Each public function is one jitted
program; `model` and `settings` are static (hashable) arguments. Per-image ops are vmapped over
the batch. `params` is the network's `params` collection (`init_params(model, key)`).

Batch keys used: "image" uint8 [B, H, W, 3] (or the fields the device resizes it from,
`frcnn_jax.ops.images.batch_images`), "image_hw" int32 [B, 2], "scale" float32 [B], and
for the loss "gt_boxes" [B, G, 4], "gt_labels" [B, G], "gt_valid" [B, G] (and, for the "head"
loss mode, stored "proposals" [B, R, 4] with "proposals_valid" [B, R]); "valid" [B] (optional)
masks the detections of padding examples.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.detection.settings import LOSS_MODES
from frcnn_jax.detection.settings import DetectorSettings
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models import rpn as rpn_module
from frcnn_jax.ops import anchors as anchor_ops
from frcnn_jax.ops import images as image_ops
from frcnn_jax.ops import losses
from frcnn_jax.ops import postprocess
from frcnn_jax.ops import proposals as proposal_ops
from frcnn_jax.ops import targets

Batch = dict[str, jax.Array]
LOSS_TERMS = ("rpn_cls", "rpn_box", "det_cls", "det_box")


def pyramid_anchors(features, canvas_hw: tuple[int, int],
             settings: DetectorSettings) -> tuple[np.ndarray, tuple[int, ...]]:
  """The anchors of every feature level, concatenated finest first, and their count per level.

  Each level has its stride (`settings.strides`) and its share of `anchors.sizes`; the
  torchvision style spaces them by canvas size // feature size instead, as its
  AnchorGenerator (not always the nominal stride: a 13-row P6 of an 800-row canvas has 61).
  """
  levels = faster_rcnn.feature_levels(features)
  if len(levels) != len(settings.strides):
    raise ValueError(f"the settings' {len(settings.strides)} strides {settings.strides} do not "
                     f"fit the backbone's {len(levels)} feature levels")
  grids = []
  for level, stride, sizes in zip(levels, settings.strides,
                                  settings.anchors.per_level(len(levels))):
    feat_h, feat_w = level.shape[1:3]
    if settings.anchors.style == "torchvision":
      stride = (canvas_hw[0] // feat_h, canvas_hw[1] // feat_w)
    grids.append(anchor_ops.anchor_grid(feat_h, feat_w, stride, sizes, settings.anchors.ratios,
                                        style=settings.anchors.style))
  return np.concatenate(grids), tuple(len(grid) for grid in grids)


def _rpn_and_proposals(params: Any, batch: Batch, model: faster_rcnn.FasterRCNN,
                       settings: DetectorSettings, train: bool, proposals: bool = True):
  """Trunk, RPN and per-image proposals (resized-image frame).

  Returns:
    features ([B, h, w, C], or the tuple of a multi-level backbone's levels), rpn_logits
    [B, A, 2 or 1], rpn_deltas [B, A, 4], anchors [A, 4], proposals ([B, R, 4] boxes, [B, R]
    scores, [B, R] valid); (None, None, None) when `proposals` is False (the RPN-only and
    head-only losses generate none).
  """
  if settings.strides != model.strides:
    raise ValueError(f"the settings' strides {settings.strides} must equal the backbone's "
                     f"{model.strides}")
  if settings.anchors.per_cell(len(settings.strides)) != model.num_anchors:
    raise ValueError(f"the settings' {settings.anchors.per_cell(len(settings.strides))} anchors "
                     f"per location (sizes per level x ratios) must equal the model's "
                     f"num_anchors {model.num_anchors}")
  images = image_ops.batch_images(batch)
  features, logits, deltas = model.apply(
      {"params": params}, images, batch["image_hw"],
      method=faster_rcnn.FasterRCNN.features_and_rpn)
  anchors, level_sizes = pyramid_anchors(features, images.shape[1:3], settings)
  if not proposals:
    return features, logits, deltas, anchors, (None, None, None)
  if train:
    pre_nms, post_nms = settings.rpn.pre_nms_top_n_train, settings.rpn.post_nms_top_n_train
  else:
    pre_nms, post_nms = settings.rpn.pre_nms_top_n_test, settings.rpn.post_nms_top_n_test
  min_size = jnp.full(batch["image_hw"].shape[:1], settings.rpn.min_size, jnp.float32)
  if settings.rpn.proposal_style == "torchvision":
    generate = functools.partial(
        proposal_ops.generate_level_proposals, level_sizes=level_sizes, pre_nms_top_n=pre_nms,
        post_nms_top_n=post_nms, nms_threshold=settings.rpn.nms_threshold)
  else:
    generate = functools.partial(
        proposal_ops.generate_proposals, pre_nms_top_n=pre_nms, post_nms_top_n=post_nms,
        nms_threshold=settings.rpn.nms_threshold, legacy_plus_one=settings.legacy_plus_one)
    min_size = min_size * batch["scale"].astype(jnp.float32)   # original-image pixels
  with jax.named_scope("proposals"):   # stages of frcnn_jax/benchmarking/hlo.py
    log_odds = rpn_module.objectness_logits(logits)   # ranks without float32 saturation
    proposals = jax.vmap(lambda s, d, hw, m: generate(s, d, anchors, hw, min_size=m))(
        log_odds, deltas, batch["image_hw"], min_size)
  return features, logits, deltas, anchors, proposals


@functools.partial(jax.jit, static_argnames=("model", "settings", "train"))
def loss_fn(params: Any, batch: Batch, key: jax.Array, *, model: faster_rcnn.FasterRCNN,
            settings: DetectorSettings, train: bool = True) -> tuple[jax.Array, dict]:
  """Approximate-joint-training loss of a batch (mean over images).

  `settings.loss_mode` selects the terms (the paper's 4-step alternating training): "joint"
  all four; "rpn" the RPN terms only (no proposals are generated, the detection terms are
  0); "head" the detection terms only, on RoIs sampled from the batch's stored
  "proposals" [B, R, 4] (resized-image frame) where "proposals_valid" [B, R] (plus the
  ground truth, as always), the RPN terms 0.

  Args:
    params: network parameters.
    batch: a Batch with ground truth.
    key: PRNG key for anchor / RoI sampling and dropout.
    model: the network (static).
    settings: detector settings (static).
    train: dropout on (True) or off.

  Returns:
    total: scalar, rpn_cls + rpn_box + det_cls + det_box, each weighted by `settings.loss`.
    terms: {"rpn_cls", "rpn_box", "det_cls", "det_box"} scalars, plus "rpn_positives" and
      "det_foreground": mean sampled positive anchors / foreground RoIs per image.
  """
  if settings.loss_mode not in LOSS_MODES:
    raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {settings.loss_mode!r}")
  rpn_key, roi_key, dropout_key = jax.random.split(key, 3)
  batch_size = batch["image_hw"].shape[0]
  joint = settings.loss_mode == "joint"
  features, logits, deltas, anchors, (props, _, props_valid) = _rpn_and_proposals(
      params, batch, model, settings, train=True, proposals=joint)
  zeros = jnp.zeros((batch_size,), jnp.float32)
  rpn_cls = rpn_box = det_cls = det_box = zeros
  rpn_positives = det_foreground = zeros
  if settings.loss_mode in ("joint", "rpn"):
    rpn_cls, rpn_box, rpn_positives = _rpn_loss_terms(logits, deltas, anchors, batch, rpn_key,
                                                      settings)
  if settings.loss_mode in ("joint", "head"):
    if settings.loss_mode == "head":   # stored proposals (proposal_store.WithProposals)
      props, props_valid = batch["proposals"], batch["proposals_valid"]
    det_cls, det_box, det_foreground = _head_loss_terms(
        params, features, props, props_valid, batch, roi_key, dropout_key, model, settings,
        train)

  terms = {"rpn_cls": rpn_cls.mean(), "rpn_box": rpn_box.mean(),
           "det_cls": det_cls.mean(), "det_box": det_box.mean()}
  total = sum(terms[name] for name in LOSS_TERMS)
  terms["rpn_positives"] = rpn_positives.mean().astype(jnp.float32)
  terms["det_foreground"] = det_foreground.mean().astype(jnp.float32)
  return total, terms


def _rpn_loss_terms(logits: jax.Array, deltas: jax.Array, anchors: jax.Array, batch: Batch,
                    key: jax.Array, settings: DetectorSettings):
  """Per-image RPN losses: ([B] rpn_cls, [B] rpn_box, [B] sampled positive anchors)."""
  batch_size = logits.shape[0]
  rpn_targets = functools.partial(
      targets.rpn_targets, batch_size_per_image=settings.rpn.batch_size_per_image,
      positive_fraction=settings.rpn.positive_fraction, positive_iou=settings.rpn.positive_iou,
      negative_iou=settings.rpn.negative_iou, allowed_border=settings.rpn.allowed_border)
  with jax.named_scope("rpn_targets"):
    anchor_labels, anchor_targets = jax.vmap(rpn_targets, in_axes=(None, 0, 0, 0, 0))(
        anchors, batch["gt_boxes"], batch["gt_valid"], batch["image_hw"],
        jax.random.split(key, batch_size))
  rpn_logits = logits if logits.shape[-1] == 2 else logits[..., 0]
  rpn_loss = functools.partial(losses.rpn_loss, sigma=settings.rpn.sigma,
                               box_loss_weight=settings.loss.rpn_box)
  with jax.named_scope("losses"):
    rpn_cls, rpn_box = jax.vmap(rpn_loss)(rpn_logits, deltas, anchor_labels, anchor_targets)
  return rpn_cls * settings.loss.rpn_cls, rpn_box, (anchor_labels == 1).sum(axis=1)


def _head_loss_terms(params: Any, features, props: jax.Array, props_valid: jax.Array,
                     batch: Batch, roi_key: jax.Array, dropout_key: jax.Array,
                     model: faster_rcnn.FasterRCNN, settings: DetectorSettings, train: bool):
  """Per-image detection losses on sampled RoIs of `props` [B, R, 4] (resized-image frame).

  Returns:
    ([B] det_cls, [B] det_box, [B] sampled foreground RoIs).
  """
  batch_size = props.shape[0]
  sample = functools.partial(
      targets.sample_proposals, batch_size_per_image=settings.roi.batch_size_per_image,
      fg_fraction=settings.roi.fg_fraction, fg_iou=settings.roi.fg_iou,
      bg_iou_lo=settings.roi.bg_iou_lo, weights=settings.roi.box_weights)
  with jax.named_scope("roi_sampling"):
    rois, roi_labels, box_targets, box_weights, roi_valid = jax.vmap(sample)(
        jax.lax.stop_gradient(props), props_valid, batch["gt_boxes"], batch["gt_labels"],
        batch["gt_valid"], jax.random.split(roi_key, batch_size))
  class_logits, box_deltas = model.apply(
      {"params": params}, features, rois, train=train, rngs={"dropout": dropout_key},
      method=faster_rcnn.FasterRCNN.roi_head)
  det_loss = functools.partial(losses.detection_loss, sigma=settings.roi.sigma,
                               box_loss_weight=settings.loss.det_box)
  with jax.named_scope("losses"):
    det_cls, det_box = jax.vmap(det_loss)(class_logits, box_deltas, roi_labels, box_targets,
                                          box_weights, roi_valid)
  return det_cls * settings.loss.det_cls, det_box, (roi_labels >= 1).sum(axis=1)


def _batch_valid(batch: Batch) -> jax.Array:
  return batch.get("valid", jnp.ones(batch["image_hw"].shape[:1], bool)).astype(bool)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def proposals(params: Any, batch: Batch, *, model: faster_rcnn.FasterRCNN,
              settings: DetectorSettings) -> dict[str, jax.Array]:
  """RPN proposals with the test settings, for inspection and visualisation.

  Returns:
    {"boxes": [B, R, 4] xyxy in original-image pixels, "scores": [B, R] object probability,
     "valid": [B, R] bool}, R = rpn.post_nms_top_n_test, by descending score.
  """
  *_, (boxes, scores, valid) = _rpn_and_proposals(params, batch, model, settings, train=False)
  scale = batch["scale"].astype(jnp.float32)[:, None, None]
  return {"boxes": boxes / scale, "scores": scores,
          "valid": valid & _batch_valid(batch)[:, None]}


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def predict(params: Any, batch: Batch, *, model: faster_rcnn.FasterRCNN,
            settings: DetectorSettings) -> dict[str, jax.Array]:
  """Detections of a batch: images in, detections out, one program.

  Returns:
    {"boxes": [B, D, 4] xyxy in original-image pixels, "scores": [B, D] descending,
     "labels": [B, D] int32 in 1..C (0 where invalid), "valid": [B, D] bool},
    D = test.detections_per_image; padding examples (batch "valid" False) have no detections.
  """
  features, _, _, _, (rois, _, rois_valid) = _rpn_and_proposals(
      params, batch, model, settings, train=False)
  class_logits, box_deltas = model.apply(
      {"params": params}, features, rois, train=False, method=faster_rcnn.FasterRCNN.roi_head)
  class_scores = jax.nn.softmax(class_logits, axis=-1)
  detect = functools.partial(
      postprocess.detections, weights=settings.roi.box_weights,
      score_threshold=settings.test.score_threshold, nms_threshold=settings.test.nms_threshold,
      max_detections=settings.test.detections_per_image, min_size=settings.test.min_size,
      legacy_plus_one=settings.legacy_plus_one)
  with jax.named_scope("postprocess"):
    boxes, scores, labels, valid = jax.vmap(
        lambda *args, s: detect(*args, image_scale=s))(
            class_scores, box_deltas, rois, rois_valid, batch["image_hw"],
            s=batch["scale"].astype(jnp.float32))
  valid = valid & _batch_valid(batch)[:, None]
  scale = batch["scale"].astype(jnp.float32)[:, None, None]
  return {"boxes": jnp.where(valid[..., None], boxes / scale, 0.0),
          "scores": jnp.where(valid, scores, 0.0),
          "labels": jnp.where(valid, labels, 0).astype(jnp.int32), "valid": valid}
