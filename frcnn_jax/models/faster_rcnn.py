"""Faster R-CNN network: input normalisation, a backbone, the RPN head and a RoI head.

The module holds parameters and forward passes only; anchors, targets, proposals, losses and
post-processing live in `frcnn_jax.ops` and are joined in `frcnn_jax.detection.detector`.
Call the parts with `model.apply(variables, ..., method=FasterRCNN.<method>)`; `model.init`
(through `__call__`) creates every parameter.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.config.fields import setting
from frcnn_jax.models import backbones  # noqa: F401  pylint: disable=unused-import  # registers
from frcnn_jax.models import conv
from frcnn_jax.models import roi_heads  # noqa: F401  pylint: disable=unused-import  # registers
from frcnn_jax.models import rpn
from frcnn_jax.models.registry import BACKBONES
from frcnn_jax.models.registry import ROI_HEADS
from frcnn_jax.models.registry import strides_of
from frcnn_jax.models.roi_heads.pooling import ROI_OPS
from frcnn_jax.ops import multiscale_roi
from frcnn_jax.ops import roi as roi_ops

INPUT_NORMS = ("caffe", "keras", "torchvision")
CAFFE_MEAN_BGR = (102.9801, 115.9465, 122.7717)   # py-faster-rcnn's PIXEL_MEANS
KERAS_MEAN_BGR = (103.939, 116.779, 123.68)       # keras.applications.vgg16 preprocess_input
TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array, image_hw: jax.Array, input_norm: str) -> jax.Array:
  """uint8 RGB canvases -> float32 network input, zero outside each image's true size.

  Args:
    images: [B, H, W, 3] uint8 RGB, zero-padded canvases.
    image_hw: [B, 2] int true (height, width) of each image inside its canvas.
    input_norm: "caffe" (BGR minus py-faster-rcnn's mean pixel, 0..255 scale), "keras" (BGR
      minus the Keras VGG16 mean pixel) or "torchvision" (RGB / 255, ImageNet mean / std).

  Returns:
    [B, H, W, 3] float32.
  """
  x = images.astype(jnp.float32)
  if input_norm in ("caffe", "keras"):
    mean = CAFFE_MEAN_BGR if input_norm == "caffe" else KERAS_MEAN_BGR
    x = x[..., ::-1] - jnp.asarray(mean, jnp.float32)
  elif input_norm == "torchvision":
    x = (x / 255.0 - jnp.asarray(TORCHVISION_MEAN_RGB)) / jnp.asarray(TORCHVISION_STD_RGB)
  else:
    raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
  height, width = images.shape[1:3]
  inside_rows = jnp.arange(height)[None, :] < image_hw[:, 0:1]
  inside_cols = jnp.arange(width)[None, :] < image_hw[:, 1:2]
  inside = inside_rows[:, :, None] & inside_cols[:, None, :]
  return jnp.where(inside[..., None], x, 0.0)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def feature_levels(features) -> tuple[jax.Array, ...]:
  """A backbone's output as a tuple of levels: its one map, or a multi-level backbone's maps."""
  return features if isinstance(features, tuple) else (features,)


def _backbone_name(name: str) -> str:
  return "" if name in BACKBONES.names() else f"must be a registered backbone {BACKBONES.names()}"


def _roi_head_name(name: str) -> str:
  return "" if name in ROI_HEADS.names() else f"must be a registered RoI head {ROI_HEADS.names()}"


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """`model`: the parts of the network by name (their own keys are `model.<name>`) and the
  settings they share."""
  backbone: str = setting("vgg16", "the backbone; its keys are model.<backbone>",
                          check=_backbone_name)
  roi_head: str = setting("fc", "the RoI head; its keys are model.<roi_head>",
                          check=_roi_head_name)
  pretrained: str = setting("", "converted ImageNet weights of the backbone (each backbone "
                            "names its converter)", role="training")
  input_norm: str = setting("caffe", "the pretrained weights' own: caffe (BGR - "
                            "py-faster-rcnn's mean pixel) | keras (BGR - the Keras VGG16 mean "
                            "pixel) | torchvision (RGB mean/std)", choices=INPUT_NORMS)
  rpn_objectness: str = setting("softmax", "softmax (2k, the paper) | sigmoid (k)",
                                choices=rpn.OBJECTNESS_MODES)
  roi_op: str = setting("roi_pool", "roi_pool | roi_align", choices=ROI_OPS)
  roi_pool_coordinates: str = setting("torchvision", "roi_pool rounds x2 * scale "
                                      "(torchvision) | caffe: (x2 - 1) * scale, the inclusive "
                                      "end pixel", choices=roi_ops.ROI_POOL_COORDINATES)
  roi_size: int = setting(7, "RoI op output side", minimum=1)
  roi_canonical_scale: float = setting(224.0, "multi-level backbones: a RoI of this sqrt(area) "
                                       "is pooled from roi_canonical_level (the FPN paper's "
                                       "224, ImageNet's input size)", above=0.0)
  roi_grad: str = setting("auto", "multi-level backbones: the RoIAlign gradient, dense "
                          "(matmuls) | scatter (autodiff of the gather; faster on CPU) | auto "
                          "(scatter on CPU, else dense); same parameters", role="local",
                          choices=("auto",) + multiscale_roi.GRADIENTS)
  roi_canonical_level: int = setting(4, "multi-level backbones: the level (log2 of its stride) "
                                     "of roi_canonical_scale; smaller RoIs go finer", minimum=0)
  roi_sampling_ratio: int = setting(2, "roi_align samples per bin side")
  roi_aligned: bool = setting(False, "roi_align's half-pixel offset")
  legacy_plus_one: bool = setting(False, "decoded proposals / detections 1 px wider and "
                                  "taller, as py-faster-rcnn's bbox_transform_inv")
  dtype: str = setting("float32", "compute dtype: float32 | bfloat16", role="test",
                       choices=tuple(DTYPES))
  conv_grad: str = setting("auto", "3x3 conv gradients: xla (lax's) | per_tap (weight "
                           "gradients as per-tap matmuls, models/conv.py; faster on CPU) | "
                           "auto (per_tap on CPU, else xla); same parameters", role="local",
                           choices=("auto",) + conv.CONV_GRADS)


class FasterRCNN(nn.Module):
  """Faster R-CNN network: `trunk` (a backbone) shared by the RPN head and `head` (a RoI head).

  Attributes:
    trunk: the backbone module (models/registry.py's contract): features, stride, channels.
    head: the RoI head module: RoI features -> class logits and box deltas.
    input_norm: "caffe", "keras" or "torchvision" (must match the pretrained weights).
    num_anchors: k anchors per location.
    rpn_objectness: "softmax" (2k) or "sigmoid" (k).
    conv_grad: how the RPN's 3x3 convolution computes its gradients, "xla" or "per_tap"
      (models/conv.py); it changes neither the parameters nor, beyond float rounding, the
      results.
    dtype: computation dtype (float32 or bfloat16); parameters stay param_dtype and the
      outputs are float32.
    param_dtype: parameter dtype.
  """
  trunk: nn.Module
  head: nn.Module
  input_norm: str = "caffe"
  num_anchors: int = 9
  rpn_objectness: str = "softmax"
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def stride(self) -> int:
    """The backbone's stride: of its one map, or the one canvases must be multiples of."""
    return self.trunk.stride

  @property
  def strides(self) -> tuple[int, ...]:
    """The stride of each feature level, finest first (one entry for single-map backbones)."""
    return strides_of(self.trunk)

  @property
  def num_classes(self) -> int:
    return self.head.num_classes

  def setup(self):
    self.rpn = rpn.RPNHead(num_anchors=self.num_anchors, channels=self.trunk.out_channels,
                           objectness=self.rpn_objectness, conv_grad=self.conv_grad,
                           dtype=self.dtype, param_dtype=self.param_dtype)

  def features_and_rpn(self, images: jax.Array, image_hw: jax.Array):
    """Normalises the images and runs the trunk and the RPN head.

    Args:
      images: [B, H, W, 3] uint8 RGB canvases.
      image_hw: [B, 2] true image sizes inside the canvases.

    Returns:
      features: [B, h, w, trunk.out_channels] in the compute dtype, (h, w) =
        trunk.output_hw(H, W); for a multi-level backbone the tuple of its levels.
      rpn_logits: [B, A, 2 or 1] float32, A = sum over levels of h * w * k, each level in
        anchor_grid order, finest level first (one RPN head shared by the levels).
      rpn_deltas: [B, A, 4] float32.
    """
    x = normalize_images(images, image_hw, self.input_norm)
    features = self.trunk(x)
    outputs = [self.rpn(level) for level in feature_levels(features)]
    logits = jnp.concatenate([logits for logits, _ in outputs], axis=1)
    deltas = jnp.concatenate([deltas for _, deltas in outputs], axis=1)
    return features, logits, deltas

  def roi_head(self, features, rois: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs the RoI head on `features_and_rpn`'s features and [B, R, 4] rois -> ([B, R, C+1],
    [B, R, C+1, 4]); a multi-level backbone's first `trunk.roi_levels` levels feed it."""
    if isinstance(features, tuple):
      features = features[:self.trunk.roi_levels]
    return self.head(features, rois, train=train)

  def __call__(self, images: jax.Array, image_hw: jax.Array, rois: jax.Array, *,
               train: bool = False):
    """Whole network on given RoIs (used by `init`): see features_and_rpn and roi_head."""
    features, logits, deltas = self.features_and_rpn(images, image_hw)
    class_logits, box_deltas = self.roi_head(features, rois, train=train)
    return logits, deltas, class_logits, box_deltas


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: FasterRCNN, key: jax.Array) -> Any:
  """Initialises every parameter of `model` (image-size independent; one compile per model).

  Returns:
    The `params` collection (a nested dict with "trunk", "rpn", "head").
  """
  size = 2 * max(model.strides + (model.stride,))
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  image_hw = jnp.full((1, 2), size, jnp.int32)
  rois = jnp.asarray([[[0.0, 0.0, size, size]]], jnp.float32)
  return model.init({"params": key}, images, image_hw, rois)["params"]


PARTS = ("trunk", "rpn", "head")


def trainable_mask(model: FasterRCNN, params: Any, parts: tuple[str, ...] = PARTS) -> Any:
  """Bool pytree like `params` for `optax.masked`: True where a parameter is trained.

  False for the backbone's frozen parameters (`model.trunk.trainable`), the RoI head's when it
  has a `trainable` method (res5's frozen batch norm), and for every parameter of a part
  ("trunk", "rpn", "head") not in `parts`: the stages of alternating training train
  the RPN or the head alone.

  Raises:
    ValueError: an unknown part.
  """
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise ValueError(f"parts must be among {PARTS}, got {sorted(unknown)}")
  mask = {part: jax.tree.map(lambda _: True, params[part]) for part in params}
  if "trunk" in params:
    mask["trunk"] = model.trunk.trainable(params["trunk"])
  if "head" in params and hasattr(model.head, "trainable"):
    mask["head"] = model.head.trainable(params["head"])
  for part in PARTS:
    if part not in parts:
      mask[part] = jax.tree.map(lambda _: False, params[part])
  return mask
