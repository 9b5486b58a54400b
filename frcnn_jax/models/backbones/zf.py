"""The ZF backbone (the paper's smaller net, py-faster-rcnn's ZF): conv1 .. conv5 at stride 16
with Caffe's LRN and padded 3x3 max pools, and its converted ImageNet weights.

The layers are those of py-faster-rcnn's `models/pascal_voc/ZF/faster_rcnn_end2end/train.prototxt`:

  conv1 7x7/2 pad 3, 96 -> ReLU -> norm1 LRN -> pool1 3x3/2 pad 1 max
  conv2 5x5/2 pad 2, 256 -> ReLU -> norm2 LRN -> pool2 3x3/2 pad 1 max
  conv3, conv4 3x3/1 pad 1, 384 -> ReLU;  conv5 3x3/1 pad 1, 256 -> ReLU

(LRN: local_size 3, alpha 5e-5, beta 0.75, WITHIN_CHANNEL; `frcnn_jax/ops/lrn.py`). Caffe rounds
a pooled size up and drops a last window that would start in the padding; a convolution rounds
down. So conv5 is not H / 16 cells: a 600 x 1000 image gives 39 x 64 (38 x 63 with the pools
rounding down). The anchor spacing and the RoI scale stay 1/16, as py-faster-rcnn's
`feat_stride: 16` and `spatial_scale: 0.0625`. Parameters are named after the caffemodel's layers
so that `scripts/convert_zf.py` maps ZF.v2.caffemodel one to one; its fc6 / fc7 go to the RoI
head's layers of those names (`model.roi_head = "fc"`, `model.roi_size = 6`).
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.config.fields import setting
from frcnn_jax.models import conv
from frcnn_jax.models import pretrained
from frcnn_jax.models.registry import BACKBONES
from frcnn_jax.ops import lrn

BASE_CHANNELS = (96, 256, 384, 384, 256)               # num_output of conv1 .. conv5
CONVS = ((7, 2, 3), (5, 2, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))   # (kernel, stride, pad)
NORMED = 2                                             # conv1, conv2: LRN then pool
LRN_SIZE, LRN_ALPHA, LRN_BETA = 3, 5e-5, 0.75          # norm1, norm2 (WITHIN_CHANNEL)
POOL_KERNEL, POOL_STRIDE, POOL_PAD = 3, 2, 1           # pool1, pool2 (MAX)
STRIDE = 16
NUM_LAYERS = len(BASE_CHANNELS)
_CONV_NAME = re.compile(r"^conv(\d+)$")


def scaled_channels(base: int, width: float) -> int:
  """Channel count of a layer with `base` channels in ZF under the width multiplier."""
  return max(1, int(round(base * width)))


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
  """Caffe's (and lax's) convolution output side: floor((size + 2 pad - kernel) / stride) + 1."""
  return (size + 2 * pad - kernel) // stride + 1


def pool_output_size(size: int, ceil_mode: bool = True, kernel: int = POOL_KERNEL,
                     stride: int = POOL_STRIDE, pad: int = POOL_PAD) -> int:
  """Max pooling output side.

  Caffe (`PoolingLayer::Reshape`, ceil_mode): ceil((size + 2 pad - kernel) / stride) + 1, one
  less when the last window would start at or past size + pad (in the padding). Floor mode:
  floor((size + 2 pad - kernel) / stride) + 1 (lax's VALID pooling of the padded input).
  """
  span = size + 2 * pad - kernel
  if not ceil_mode:
    return span // stride + 1
  out = -(-span // stride) + 1
  if pad and (out - 1) * stride >= size + pad:
    out -= 1
  return out


def feature_size(size: int, ceil_mode: bool = True) -> int:
  """Side of conv5 for an input side `size` (the layer arithmetic of the module docstring)."""
  for index, (kernel, stride, pad) in enumerate(CONVS, 1):
    size = conv_output_size(size, kernel, stride, pad)
    if index <= NORMED:
      size = pool_output_size(size, ceil_mode)
  return size


def max_pool(x: jax.Array, ceil_mode: bool = True) -> jax.Array:
  """pool1 / pool2: 3x3 max pooling, stride 2, pad 1, over [B, H, W, C].

  The padding is -inf, so a window counts its cells inside the input only (Caffe clips each
  window to the input); among equal maxima the gradient goes to the first in row-major order,
  as Caffe's strict `>` keeps the first.

  Returns:
    [B, h, w, C], h = pool_output_size(H, ceil_mode), w alike.
  """
  pads = [(0, 0)]
  for size in x.shape[1:3]:
    out = pool_output_size(size, ceil_mode)
    pads.append((POOL_PAD, (out - 1) * POOL_STRIDE + POOL_KERNEL - size - POOL_PAD))
  pads.append((0, 0))
  window = (1, POOL_KERNEL, POOL_KERNEL, 1)
  strides = (1, POOL_STRIDE, POOL_STRIDE, 1)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)


@BACKBONES.register("zf")
class ZF(nn.Module):
  """ZF conv1 .. conv5 with ReLU, LRN + max pool after conv1 and conv2 (no pool5).

  Attributes (the first three are the config section `model.zf`):
    width: channel multiplier (1.0 is ZF; 1/16 gives a tiny test trunk).
    frozen_layers: the first this many convolutions get no gradient (stop_gradient on their
      stage's output) and are neither updated nor decayed (`trainable`). py-faster-rcnn's ZF
      end-to-end prototxt trains all five (every conv has lr_mult 1), so the default is 0.
    pool_ceil_mode: round the pooled sizes up as Caffe (True) or down.
    conv_grad: how conv3 .. conv5 compute their gradients, "xla" or "per_tap"
      (`conv.conv_general_dilated`, stride 1 only); conv1 and conv2 (stride 2) use lax's.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  width: float = setting(1.0, "channel multiplier (1.0: ZF)", above=0.0)
  frozen_layers: int = setting(0, "leading convolutions without gradient (0: py-faster-rcnn's "
                               "ZF end-to-end trains conv1 .. conv5)", role="training",
                               minimum=0, maximum=NUM_LAYERS)
  pool_ceil_mode: bool = setting(True, "pool1 / pool2 round up as Caffe's (600 x 1000 -> 39 x "
                                 "64 conv5 cells; false: 38 x 63)")
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  input_norms = ("caffe",)                      # ZF.v2.caffemodel: BGR minus PIXEL_MEANS
  all_frozen = {"frozen_layers": NUM_LAYERS}    # the settings that freeze every conv
  pretrained_hint = ("convert py-faster-rcnn's ImageNet ZF into it: python scripts/convert_zf.py "
                     "--input ZF.v2.caffemodel --output FILE")

  @property
  def stride(self) -> int:
    return STRIDE

  @property
  def out_channels(self) -> int:
    return scaled_channels(BASE_CHANNELS[-1], self.width)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] normalised images (caffe: BGR minus the mean pixel).

    Returns:
      [B, h, w, 256 * width] conv5 features after ReLU, (h, w) = output_hw(H, W).
    """
    conv_fn = conv.conv_function(self.conv_grad)
    x = x.astype(self.dtype)
    for index, ((kernel, stride, pad), base) in enumerate(zip(CONVS, BASE_CHANNELS), 1):
      x = nn.Conv(scaled_channels(base, self.width), (kernel, kernel), strides=stride,
                  padding=pad, dtype=self.dtype, param_dtype=self.param_dtype,
                  conv_general_dilated=conv_fn if stride == 1 else None,
                  name=f"conv{index}")(x)
      x = nn.relu(x)
      if index <= NORMED:
        x = lrn.local_response_norm(x, LRN_SIZE, LRN_ALPHA, LRN_BETA,
                                    norm_region=lrn.WITHIN_CHANNEL)
        x = max_pool(x, self.pool_ceil_mode)
      if index == self.frozen_layers:
        x = jax.lax.stop_gradient(x)
    return x

  def output_hw(self, height: int, width: int) -> tuple[int, int]:
    """The conv5 map of an H x W input (`feature_size` of each side)."""
    return (feature_size(height, self.pool_ceil_mode), feature_size(width, self.pool_ceil_mode))

  def trainable(self, params: Any) -> Any:
    """Bool pytree like `params` (this trunk's): False for the frozen convolutions' parameters.

    A leaf is frozen when a key on its path is `conv{i}` with i <= frozen_layers.
    """
    return pretrained.trainable_below(params, _CONV_NAME, self.frozen_layers)

  def load_pretrained(self, params: Any, path: str, input_norm: str) -> Any:
    """Merges a converted ZF .npz (scripts/convert_zf.py) into the network's parameters.

    Args:
      params: the whole network's `params` ("trunk", "rpn", "head").
      path: .npz with "conv1/kernel", ..., "conv5/bias", optional "fc6/kernel", "fc7/..." (for
        the RoI head's layers of those names) and metadata entries without "/" ("input_norm":
        the normalisation the weights were trained with).
      input_norm: the model's `model.input_norm`.

    Returns:
      A new params tree with the file's arrays in place.

    Raises:
      ValueError: another input normalisation, a layer the network does not have, or a
        shape that differs.
    """
    return pretrained.merge_npz(params, path, input_norm, backbone="zf",
                                fit="model.zf.width / model.fc.dim / model.roi_size=6")
