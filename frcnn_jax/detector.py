"""Faster R-CNN as pure functions of (params, batch): the training loss and inference.

This is the glue between the Flax network (`frcnn_jax.models.faster_rcnn`) and the static-shape
ops (anchors, targets, losses, proposals, post-processing). Each public function is one jitted
program; `model` and `settings` are static (hashable) arguments. Per-image ops are vmapped over
the batch. `params` is the network's `params` collection (`init_params(model, key)`).

Batch keys used: "image" uint8 [B, H, W, 3], "image_hw" int32 [B, 2], "scale" float32 [B], and
for the loss "gt_boxes" [B, G, 4], "gt_labels" [B, G], "gt_valid" [B, G]; "valid" [B] (optional)
masks the detections of padding examples.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from frcnn_jax.models import faster_rcnn
from frcnn_jax.models import rpn as rpn_module
from frcnn_jax.ops import anchors as anchor_ops
from frcnn_jax.ops import losses
from frcnn_jax.ops import postprocess
from frcnn_jax.ops import proposals as proposal_ops
from frcnn_jax.ops import targets

Batch = dict[str, jax.Array]
LOSS_TERMS = ("rpn_cls", "rpn_box", "det_cls", "det_box")


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
  """Static numbers of the detector (the config's model anchors, rpn.*, roi.* and test.*)."""
  anchor_sizes: tuple[float, ...] = (128.0, 256.0, 512.0)
  anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  anchor_stride: int = 16
  rpn_pre_nms_top_n_train: int = 12000
  rpn_post_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 6000
  rpn_post_nms_top_n_test: int = 300
  rpn_nms_threshold: float = 0.7
  rpn_min_size: float = 16.0
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_positive_iou: float = 0.7
  rpn_negative_iou: float = 0.3
  rpn_allowed_border: float = 0.0
  rpn_box_loss_weight: float = 1.0
  rpn_sigma: float = 3.0
  roi_batch_size_per_image: int = 128
  roi_fg_fraction: float = 0.25
  roi_fg_iou: float = 0.5
  roi_bg_iou_lo: float = 0.0
  roi_box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
  roi_box_loss_weight: float = 1.0
  roi_sigma: float = 1.0
  test_nms_threshold: float = 0.3
  test_score_threshold: float = 0.05
  test_detections_per_image: int = 100

  @property
  def num_anchors(self) -> int:
    return len(self.anchor_sizes) * len(self.anchor_ratios)


def _rpn_and_proposals(params: Any, batch: Batch, model: faster_rcnn.FasterRCNN,
                       settings: DetectorSettings, train: bool):
  """Trunk, RPN and per-image proposals (resized-image frame).

  Returns:
    features [B, h, w, C], rpn_logits [B, A, 2 or 1], rpn_deltas [B, A, 4], anchors [A, 4],
    proposals ([B, R, 4] boxes, [B, R] scores, [B, R] valid).
  """
  if settings.anchor_stride != model.stride:
    raise ValueError(f"anchor_stride {settings.anchor_stride} must equal the trunk stride "
                     f"{model.stride}")
  if settings.num_anchors != model.num_anchors:
    raise ValueError(f"the settings' {settings.num_anchors} anchors per location (sizes x "
                     f"ratios) must equal the model's num_anchors {model.num_anchors}")
  features, logits, deltas = model.apply(
      {"params": params}, batch["image"], batch["image_hw"],
      method=faster_rcnn.FasterRCNN.features_and_rpn)
  feat_h, feat_w = features.shape[1:3]
  anchors = anchor_ops.anchor_grid(feat_h, feat_w, settings.anchor_stride,
                                   settings.anchor_sizes, settings.anchor_ratios)
  if train:
    pre_nms, post_nms = settings.rpn_pre_nms_top_n_train, settings.rpn_post_nms_top_n_train
  else:
    pre_nms, post_nms = settings.rpn_pre_nms_top_n_test, settings.rpn_post_nms_top_n_test
  generate = functools.partial(
      proposal_ops.generate_proposals, pre_nms_top_n=pre_nms, post_nms_top_n=post_nms,
      nms_threshold=settings.rpn_nms_threshold)
  scores = rpn_module.objectness_scores(logits)
  min_size = settings.rpn_min_size * batch["scale"].astype(jnp.float32)
  proposals = jax.vmap(lambda s, d, hw, m: generate(s, d, anchors, hw, min_size=m))(
      scores, deltas, batch["image_hw"], min_size)
  return features, logits, deltas, anchors, proposals


@functools.partial(jax.jit, static_argnames=("model", "settings", "train"))
def loss_fn(params: Any, batch: Batch, key: jax.Array, *, model: faster_rcnn.FasterRCNN,
            settings: DetectorSettings, train: bool = True) -> tuple[jax.Array, dict]:
  """Approximate-joint-training loss of a batch (mean over images).

  Args:
    params: network parameters.
    batch: a Batch with ground truth.
    key: PRNG key for anchor / RoI sampling and dropout.
    model: the network (static).
    settings: detector settings (static).
    train: dropout on (True) or off.

  Returns:
    total: scalar, rpn_cls + rpn_box + det_cls + det_box (box weights already applied).
    terms: {"rpn_cls", "rpn_box", "det_cls", "det_box"} scalars, plus "rpn_positives" and
      "det_foreground": mean sampled positive anchors / foreground RoIs per image.
  """
  rpn_key, roi_key, dropout_key = jax.random.split(key, 3)
  batch_size = batch["image"].shape[0]
  features, logits, deltas, anchors, (props, _, props_valid) = _rpn_and_proposals(
      params, batch, model, settings, train=True)

  rpn_targets = functools.partial(
      targets.rpn_targets, batch_size_per_image=settings.rpn_batch_size_per_image,
      positive_fraction=settings.rpn_positive_fraction, positive_iou=settings.rpn_positive_iou,
      negative_iou=settings.rpn_negative_iou, allowed_border=settings.rpn_allowed_border)
  anchor_labels, anchor_targets = jax.vmap(rpn_targets, in_axes=(None, 0, 0, 0, 0))(
      anchors, batch["gt_boxes"], batch["gt_valid"], batch["image_hw"],
      jax.random.split(rpn_key, batch_size))
  rpn_logits = logits if logits.shape[-1] == 2 else logits[..., 0]
  rpn_loss = functools.partial(losses.rpn_loss, sigma=settings.rpn_sigma,
                               box_loss_weight=settings.rpn_box_loss_weight)
  rpn_cls, rpn_box = jax.vmap(rpn_loss)(rpn_logits, deltas, anchor_labels, anchor_targets)

  sample = functools.partial(
      targets.sample_proposals, batch_size_per_image=settings.roi_batch_size_per_image,
      fg_fraction=settings.roi_fg_fraction, fg_iou=settings.roi_fg_iou,
      bg_iou_lo=settings.roi_bg_iou_lo, weights=settings.roi_box_weights)
  rois, roi_labels, box_targets, box_weights, roi_valid = jax.vmap(sample)(
      jax.lax.stop_gradient(props), props_valid, batch["gt_boxes"], batch["gt_labels"],
      batch["gt_valid"], jax.random.split(roi_key, batch_size))
  class_logits, box_deltas = model.apply(
      {"params": params}, features, rois, train=train, rngs={"dropout": dropout_key},
      method=faster_rcnn.FasterRCNN.roi_head)
  det_loss = functools.partial(losses.detection_loss, sigma=settings.roi_sigma,
                               box_loss_weight=settings.roi_box_loss_weight)
  det_cls, det_box = jax.vmap(det_loss)(class_logits, box_deltas, roi_labels, box_targets,
                                        box_weights, roi_valid)

  terms = {"rpn_cls": rpn_cls.mean(), "rpn_box": rpn_box.mean(),
           "det_cls": det_cls.mean(), "det_box": det_box.mean()}
  total = sum(terms[name] for name in LOSS_TERMS)
  terms["rpn_positives"] = (anchor_labels == 1).sum(axis=1).mean().astype(jnp.float32)
  terms["det_foreground"] = (roi_labels >= 1).sum(axis=1).mean().astype(jnp.float32)
  return total, terms


def _batch_valid(batch: Batch) -> jax.Array:
  return batch.get("valid", jnp.ones(batch["image"].shape[:1], bool)).astype(bool)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def proposals(params: Any, batch: Batch, *, model: faster_rcnn.FasterRCNN,
              settings: DetectorSettings) -> dict[str, jax.Array]:
  """RPN proposals with the test settings, for inspection and visualisation.

  Returns:
    {"boxes": [B, R, 4] xyxy in original-image pixels, "scores": [B, R] objectness,
     "valid": [B, R] bool}, R = rpn_post_nms_top_n_test, by descending score.
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
    D = test_detections_per_image; padding examples (batch "valid" False) have no detections.
  """
  features, _, _, _, (rois, _, rois_valid) = _rpn_and_proposals(
      params, batch, model, settings, train=False)
  class_logits, box_deltas = model.apply(
      {"params": params}, features, rois, train=False, method=faster_rcnn.FasterRCNN.roi_head)
  class_scores = jax.nn.softmax(class_logits, axis=-1)
  detect = functools.partial(
      postprocess.detections, weights=settings.roi_box_weights,
      score_threshold=settings.test_score_threshold, nms_threshold=settings.test_nms_threshold,
      max_detections=settings.test_detections_per_image)
  boxes, scores, labels, valid = jax.vmap(detect)(class_scores, box_deltas, rois, rois_valid,
                                                  batch["image_hw"])
  valid = valid & _batch_valid(batch)[:, None]
  scale = batch["scale"].astype(jnp.float32)[:, None, None]
  return {"boxes": jnp.where(valid[..., None], boxes / scale, 0.0),
          "scores": jnp.where(valid, scores, 0.0),
          "labels": jnp.where(valid, labels, 0).astype(jnp.int32), "valid": valid}
