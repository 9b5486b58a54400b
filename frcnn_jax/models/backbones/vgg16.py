"""The VGG16 backbone (the paper's): conv1_1 .. conv5_3 at stride 16 (or 8), frozen blocks,
and its converted ImageNet weights.

Parameters are named after the Caffe/torchvision layers (`conv1_1` ... `conv5_3`) so that
`scripts/convert_vgg16.py` maps pretrained weights one to one; its weight files may also hold
fc6 / fc7, which go to the RoI head of the same layer names (`model.roi_head = "fc"`).
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.config.fields import setting
from frcnn_jax.models import conv
from frcnn_jax.models import pool
from frcnn_jax.models import pretrained
from frcnn_jax.models.registry import BACKBONES

BASE_CHANNELS = (64, 128, 256, 512, 512)
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
STRIDE = 16
STRIDES = (8, 16)
_CONV_NAME = re.compile(r"^conv(\d+)_(\d+)$")


def scaled_channels(base: int, width: float) -> int:
  """Channel count of a layer with `base` channels in VGG16 under the width multiplier."""
  return max(1, int(round(base * width)))


def pool_output_size(size: int, stride: int = STRIDE, ceil_mode: bool = False) -> int:
  """Side of the trunk output for an input side `size`: log2(stride) 2x2/2 max pools.

  Floor mode (torchvision, Flax VALID) drops a trailing odd row or column at every pool;
  Caffe (py-faster-rcnn) rounds up, so a 600 x 1000 image gives 37 x 62 (floor) or 38 x 63
  (ceil) conv5_3 cells.
  """
  for _ in range(stride.bit_length() - 1):
    size = (size + 1) // 2 if ceil_mode else size // 2
  return size


def max_pool_2x2(x: jax.Array, ceil_mode: bool = False) -> jax.Array:
  """2x2 max pooling with stride 2 over [B, H, W, C]; ceil mode pads odd sides with -inf.

  Values and gradient equal `nn.max_pool`'s bit for bit; the gradient avoids lax's
  select-and-scatter, slow on CPU (`pool.max_pool_2x2`).

  Returns:
    [B, h, w, C], h = H // 2 (floor) or ceil(H / 2) (ceil: the last window holds one row,
    as Caffe's window clipped to the input), w alike.
  """
  return pool.max_pool_2x2(x, ceil_mode)


@BACKBONES.register("vgg16")
class VGG16(nn.Module):
  """VGG16 conv1_1 .. conv5_3 with ReLU and 2x2/2 max pools after blocks 1-4 (no pool5).

  The pools round down (`pool_ceil_mode=False`, torchvision) or up (`pool_ceil_mode=True`,
  Caffe's PoolingLayer as in py-faster-rcnn): with an odd input side the last window then
  covers one row or column only, the cells beyond the input are ignored (padding with -inf,
  as Caffe clips the window to the input).

  With `stride=8` the pool after block 4 is dropped too, so block 5 runs at 1/8 resolution
  (finer anchors for small objects, at four times block 5's cost; no longer VGG16's layout, so
  pretrained block 5 weights see features of a different scale).

  Attributes (the first five are the config section `model.vgg16`):
    width: channel multiplier (1.0 is VGG16; 1/16 gives a tiny test trunk).
    convs_per_block: number of 3x3 convolutions in each of the five blocks.
    frozen_blocks: the first this many blocks get no gradient (stop_gradient on their output)
      and are neither updated nor decayed (`trainable`).
    stride: output stride, 16 (VGG16) or 8.
    pool_ceil_mode: round the pooled sizes up (Caffe) instead of down.
    conv_grad: how the convolutions' gradients are computed, "xla" (lax's) or "per_tap"
      (`conv.conv_general_dilated`: faster weight gradients on CPU; the same parameters).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  width: float = setting(1.0, "channel multiplier (1.0: VGG16)", above=0.0)
  convs_per_block: tuple[int, ...] = setting(
      VGG16_CONVS_PER_BLOCK, "3x3 convolutions in each of the five blocks (fewer for tiny "
      "test trunks)", minimum=1,
      check=lambda v: "" if len(v) == len(BASE_CHANNELS) else "must have 5 entries")
  frozen_blocks: int = setting(2, "leading blocks without gradient (conv1, conv2 in the "
                               "paper)", role="training", minimum=0, maximum=5)
  stride: int = setting(STRIDE, "output stride: 16 (VGG16) or 8 (no pool after block 4)",
                        choices=STRIDES)
  pool_ceil_mode: bool = setting(False, "max pools round up as Caffe's (600 x 1000 -> 38 x 63 "
                                 "conv5 cells, not 37 x 62)")
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  input_norms = ("caffe", "keras", "torchvision")   # of the converters' weight sources
  all_frozen = {"frozen_blocks": 5}                 # the settings that freeze every block
  pretrained_hint = ("convert ImageNet VGG16 weights into it: python scripts/convert_vgg16.py "
                     "--input VGG16.v2.caffemodel --output FILE (or a Keras .h5 / torchvision "
                     ".pth)")

  @property
  def out_channels(self) -> int:
    return scaled_channels(BASE_CHANNELS[-1], self.width)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] normalised images.

    Returns:
      [B, h, w, 512 * width] conv5_3 features after ReLU, h = pool_output_size(H, stride,
      pool_ceil_mode) (H // stride in floor mode, ceil(H / stride) in ceil mode), w alike.
    """
    if len(self.convs_per_block) != len(BASE_CHANNELS):
      raise ValueError(
          f"convs_per_block must have {len(BASE_CHANNELS)} entries, got {self.convs_per_block}")
    if self.stride not in STRIDES:
      raise ValueError(f"stride must be one of {STRIDES}, got {self.stride}")
    num_pools = self.stride.bit_length() - 1
    conv_fn = conv.conv_function(self.conv_grad)
    x = x.astype(self.dtype)
    for block, (num_convs, base) in enumerate(zip(self.convs_per_block, BASE_CHANNELS), 1):
      for i in range(1, num_convs + 1):
        x = nn.Conv(scaled_channels(base, self.width), (3, 3), padding=1, dtype=self.dtype,
                    param_dtype=self.param_dtype, conv_general_dilated=conv_fn,
                    name=f"conv{block}_{i}")(x)
        x = nn.relu(x)
      if block <= num_pools:
        x = max_pool_2x2(x, self.pool_ceil_mode)
      if block == self.frozen_blocks:
        x = jax.lax.stop_gradient(x)
    return x

  def output_hw(self, height: int, width: int) -> tuple[int, int]:
    """The conv5_3 map of an H x W input (`pool_output_size` of each side)."""
    return (pool_output_size(height, self.stride, self.pool_ceil_mode),
            pool_output_size(width, self.stride, self.pool_ceil_mode))

  def trainable(self, params: Any) -> Any:
    """Bool pytree like `params` (this trunk's): False for the frozen blocks' parameters.

    A leaf is frozen when a key on its path is `conv{b}_{i}` with b <= frozen_blocks.
    """
    return pretrained.trainable_below(params, _CONV_NAME, self.frozen_blocks)

  def load_pretrained(self, params: Any, path: str, input_norm: str) -> Any:
    """Merges a converted VGG16 .npz (scripts/convert_vgg16.py) into the network's parameters.

    Args:
      params: the whole network's `params` ("trunk", "rpn", "head").
      path: .npz with "conv1_1/kernel", ..., optional "fc6/kernel", "fc7/..." (for the RoI
        head's layers of those names) and metadata entries without "/" ("input_norm": the
        normalisation the weights were trained with).
      input_norm: the model's `model.input_norm`.

    Returns:
      A new params tree with the file's arrays in place.

    Raises:
      ValueError: another input normalisation, a layer the network does not have, or a
        shape that differs.
    """
    return pretrained.merge_npz(params, path, input_norm, backbone="vgg16",
                                fit="model.vgg16.width / model.fc.dim")
