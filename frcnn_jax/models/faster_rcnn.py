"""Faster R-CNN network: input normalisation, VGG16 trunk, RPN head and RoI head.

The module holds parameters and forward passes only; anchors, targets, proposals, losses and
post-processing live in `frcnn_jax.ops` and are joined in `frcnn_jax.detection.detector`. Call the parts
with `model.apply(variables, ..., method=FasterRCNN.<method>)`; `model.init` (through
`__call__`) creates every parameter.
"""

import functools
from typing import Any
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.models import heads
from frcnn_jax.models import rpn
from frcnn_jax.models import vgg

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


class FasterRCNN(nn.Module):
  """VGG16 Faster R-CNN network.

  Attributes:
    num_classes: C foreground classes.
    width: channel multiplier of the trunk and RPN conv (1.0: VGG16).
    convs_per_block: convolutions per trunk block ((2, 2, 3, 3, 3): VGG16).
    frozen_blocks: leading trunk blocks without gradient (2: conv1, conv2).
    stride: trunk output stride, 16 (VGG16) or 8 (no pool after block 4).
    pool_ceil_mode: the trunk's max pools round up (Caffe, py-faster-rcnn) instead of down.
    input_norm: "caffe", "keras" or "torchvision" (must match the pretrained weights).
    num_anchors: k anchors per location.
    rpn_objectness: "softmax" (2k) or "sigmoid" (k).
    roi_op: "roi_pool" or "roi_align".
    roi_pool_coordinates: roi_pool's RoI rounding, "torchvision" or "caffe" (ops/roi.py).
    roi_size: RoI op output size.
    roi_sampling_ratio: roi_align samples per bin side.
    roi_aligned: roi_align half-pixel offset.
    fc_dim: fc6 / fc7 width.
    dropout: head dropout rate.
    conv_grad: how the trunk's and the RPN's 3x3 convolutions compute their gradients, "xla"
      (lax's) or "per_tap" (models/conv.py: weight gradients as per-tap matmuls, faster on
      CPU); it changes neither the parameters nor, beyond float rounding, the results.
    dtype: computation dtype (float32 or bfloat16); parameters stay param_dtype and the
      outputs are float32.
    param_dtype: parameter dtype.
  """
  num_classes: int
  width: float = 1.0
  convs_per_block: Sequence[int] = vgg.VGG16_CONVS_PER_BLOCK
  frozen_blocks: int = 2
  stride: int = vgg.STRIDE
  pool_ceil_mode: bool = False
  input_norm: str = "caffe"
  num_anchors: int = 9
  rpn_objectness: str = "softmax"
  roi_op: str = "roi_pool"
  roi_pool_coordinates: str = "torchvision"
  roi_size: int = 7
  roi_sampling_ratio: int = 2
  roi_aligned: bool = False
  fc_dim: int = 4096
  dropout: float = 0.5
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.trunk = vgg.VGG16(width=self.width, convs_per_block=tuple(self.convs_per_block),
                           frozen_blocks=self.frozen_blocks, stride=self.stride,
                           pool_ceil_mode=self.pool_ceil_mode, conv_grad=self.conv_grad,
                           **precision)
    self.rpn = rpn.RPNHead(num_anchors=self.num_anchors,
                           channels=vgg.scaled_channels(512, self.width),
                           objectness=self.rpn_objectness, conv_grad=self.conv_grad,
                           **precision)
    self.head = heads.RoIHead(num_classes=self.num_classes, roi_op=self.roi_op,
                              roi_pool_coordinates=self.roi_pool_coordinates,
                              roi_size=self.roi_size, sampling_ratio=self.roi_sampling_ratio,
                              aligned=self.roi_aligned, spatial_scale=1.0 / self.stride,
                              fc_dim=self.fc_dim, dropout=self.dropout, **precision)

  def features_and_rpn(self, images: jax.Array,
                       image_hw: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises the images and runs the trunk and the RPN head.

    Args:
      images: [B, H, W, 3] uint8 RGB canvases.
      image_hw: [B, 2] true image sizes inside the canvases.

    Returns:
      features: [B, h, w, 512 * width] in the compute dtype, h = H // s and w = W // s
        (s = stride; ceil(H / s), ceil(W / s) with pool_ceil_mode).
      rpn_logits: [B, A, 2 or 1] float32, A = h * w * k in anchor_grid order.
      rpn_deltas: [B, A, 4] float32.
    """
    x = normalize_images(images, image_hw, self.input_norm)
    features = self.trunk(x)
    logits, deltas = self.rpn(features)
    return features, logits, deltas

  def roi_head(self, features: jax.Array, rois: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs the RoI head: [B, h, w, C] features, [B, R, 4] rois -> ([B, R, C+1], [B, R, C+1, 4])."""
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
  size = 2 * model.stride
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  image_hw = jnp.full((1, 2), size, jnp.int32)
  rois = jnp.asarray([[[0.0, 0.0, size, size]]], jnp.float32)
  return model.init({"params": key}, images, image_hw, rois)["params"]


PARTS = ("trunk", "rpn", "head")


def trainable_mask(model: FasterRCNN, params: Any, parts: Sequence[str] = PARTS) -> Any:
  """Bool pytree like `params` for `optax.masked`: True where a parameter is trained.

  False for the frozen trunk blocks (`model.frozen_blocks`; all blocks freeze the whole trunk)
  and for every parameter of a part ("trunk", "rpn", "head") not in `parts`: the stages of
  alternating training train the RPN or the head alone.

  Raises:
    ValueError: an unknown part.
  """
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise ValueError(f"parts must be among {PARTS}, got {sorted(unknown)}")
  mask = dict(vgg.trainable_mask(params, model.frozen_blocks))
  for part in PARTS:
    if part not in parts:
      mask[part] = jax.tree.map(lambda _: False, params[part])
  return mask


def load_pretrained(params: Any, path: str, input_norm: str | None = None) -> Any:
  """Merges a converted VGG16 .npz (scripts/convert_vgg16.py) into initialised parameters.

  Args:
    params: the `params` collection from `init_params`.
    path: .npz with "conv1_1/kernel", ..., optional "fc6/kernel", "fc7/..." and the metadata
      "input_norm" (entries without "/" are metadata).
    input_norm: the model's input normalisation; a ValueError if the weights expect another.

  Returns:
    A new params tree: trunk convs (and fc6/fc7 when present) replaced by the file's arrays.

  Raises:
    ValueError: on an input-normalisation mismatch, an unknown layer or a shape mismatch.
  """
  with np.load(path) as data:
    arrays = {name: data[name] for name in data.files if "/" in name}
    expected_norm = str(data["input_norm"]) if "input_norm" in data.files else ""
  if input_norm is not None and expected_norm and expected_norm != input_norm:
    raise ValueError(f"{path} expects model.input_norm={expected_norm!r}, but the model uses "
                     f"{input_norm!r}")
  params = flax.core.unfreeze(params)
  for name, value in arrays.items():
    layer, leaf = name.split("/")
    module = "head" if layer in ("fc6", "fc7") else "trunk"
    if layer not in params[module]:
      raise ValueError(f"{path}: layer {layer!r} does not exist in the model ({module})")
    current = params[module][layer][leaf]
    if current.shape != value.shape:
      raise ValueError(f"{path}: {name} has shape {value.shape}, the model expects "
                       f"{current.shape}")
    params[module][layer][leaf] = jnp.asarray(value, current.dtype)
  return params
