"""The ResNet-50 / ResNet-101 C4 backbone (He et al. 2016; Detectron2's R50-C4): the stem and
res2 .. res4 at stride 16, frozen batch norm everywhere, and its converted ImageNet weights.

The layers are torchvision's `resnet50` / `resnet101` (`torchvision/models/resnet.py`, the
"v1.5" bottleneck with the stride on its 3x3 convolution):

  conv1 7x7/2 pad 3, 64 -> bn1 -> ReLU -> 3x3/2 pad 1 max pool          (the stem)
  layer1 .. layer3 (res2 .. res4): 3, 4, 6 (R50) or 3, 4, 23 (R101) bottlenecks of
  64, 128, 256 planes (outputs 4x: 256, 512, 1024), the first of layer2 / layer3 with stride 2

layer4 (res5) is the RoI head `res5` (models/roi_heads/res5.py). Every batch norm is
torchvision's `FrozenBatchNorm2d`: a fixed affine transform of its four buffers. Parameters are
named after torchvision's state dict (`conv1`, `bn1`, `layer1.0` / `conv1`, `downsample.0` ...),
so `scripts/convert_resnet.py` maps a state dict one to one.
"""

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.config.fields import setting
from frcnn_jax.models import conv
from frcnn_jax.models import pretrained
from frcnn_jax.models.registry import BACKBONES

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}   # bottlenecks of layer1 .. layer4
PLANES = (64, 128, 256, 512)                      # bottleneck widths of layer1 .. layer4
EXPANSION = 4                                     # a bottleneck's output is 4x its planes
STEM_CHANNELS = 64
BN_EPS = 1e-5                                     # torchvision's FrozenBatchNorm2d default
STRIDE = 16
NUM_STAGES = 4                                    # stem, layer1, layer2, layer3
HEAD_LAYER = "layer4"                             # res5: the RoI head's layers
_LAYER_NAME = re.compile(r"^layer(\d+)\.\d+$")
_BN_NAME = re.compile(r"^(bn\d+|downsample\.1)$")
# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu") of every convolution.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled_channels(base: int, width: float) -> int:
  """Channel count of a layer with `base` channels in ResNet under the width multiplier."""
  return max(1, int(round(base * width)))


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
  """A convolution's (or torchvision's floor-mode max pool's) output side."""
  return (size + 2 * pad - kernel) // stride + 1


def feature_size(size: int) -> int:
  """Side of layer3 (res4) for an input side `size`: ceil(size / 16).

  conv1 7x7/2 pad 3, the 3x3/2 pad 1 pool and the stride-2 3x3 (pad 1) / 1x1 convolutions of
  layer2 and layer3 each give ceil(size / 2).
  """
  size = conv_output_size(size, 7, 2, 3)
  size = conv_output_size(size, 3, 2, 1)
  for _ in range(2):
    size = conv_output_size(size, 3, 2, 1)
  return size


def check_stride_in_1x1(path: str, meta: dict[str, Any], model_value: bool, keys: str) -> None:
  """A converted file's "stride_in_1x1" (when it says) must be the model's.

  Raises:
    ValueError: naming the config `keys` to set to the file's value.
  """
  if "stride_in_1x1" in meta and bool(meta["stride_in_1x1"]) != model_value:
    raise ValueError(f"{path} was trained with stride_in_1x1={bool(meta['stride_in_1x1'])}, "
                     f"but the model uses stride_in_1x1={model_value} (set {keys} to the "
                     "file's)")


def stage_number(path: Any) -> int:
  """The body stage of a trunk parameter path: the stem (conv1, bn1) is 1, layer{i}.* is
  i + 1."""
  match = _LAYER_NAME.match(str(getattr(path[0], "key", path[0])))
  return int(match.group(1)) + 1 if match else 1


def is_frozen_bn(path: Any) -> bool:
  """Whether a parameter path (of `tree_map_with_path`) lies in a FrozenBatchNorm."""
  return any(_BN_NAME.match(str(getattr(entry, "key", entry))) for entry in path)


class FrozenBatchNorm(nn.Module):
  """torchvision's `FrozenBatchNorm2d`: y = (x - mean) / sqrt(var + eps) * weight + bias.

  The four vectors are parameters (`weight`, `bias`, `running_mean`, `running_var`, the state
  dict's names) so that the converted weights load as any other; they pass through
  `stop_gradient` and the backbone's / head's `trainable` masks them, so they never change.

  Attributes:
    eps: added to the variance.
    dtype: computation dtype of the output (the affine itself is computed in float32).
    param_dtype: parameter dtype.
  """
  eps: float = BN_EPS
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., C] -> [..., C] in `dtype`, the affine transform over the last axis."""
    channels = x.shape[-1]
    make = lambda name, init: jax.lax.stop_gradient(
        self.param(name, init, (channels,), self.param_dtype).astype(jnp.float32))
    weight = make("weight", nn.initializers.ones)
    bias = make("bias", nn.initializers.zeros)
    mean = make("running_mean", nn.initializers.zeros)
    var = make("running_var", nn.initializers.ones)
    scale = weight * jax.lax.rsqrt(var + self.eps)
    shift = bias - mean * scale
    return (x * scale.astype(x.dtype) + shift.astype(x.dtype)).astype(self.dtype)


class Bottleneck(nn.Module):
  """torchvision's `Bottleneck` (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (4x planes), plus the shortcut.

  relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + shortcut(x)), the shortcut being x
  or, when the stride or the channels change, `downsample.0` (1x1 conv with the stride) and
  `downsample.1` (frozen batch norm). The convolutions have no bias.

  Attributes:
    planes: width of the 1x1 / 3x3 convolutions (the output has EXPANSION x planes channels).
    stride: of the 3x3 convolution (of conv1 with `stride_in_1x1`) and the shortcut.
    stride_in_1x1: the original ResNet's (v1: MSRA, Keras) stride on the first 1x1
      convolution instead of torchvision's on the 3x3 (Detectron2's STRIDE_IN_1X1).
    out_planes: output channels (EXPANSION * planes unless the width rounds otherwise).
    conv_grad: "xla" or "per_tap" (`conv.conv_function`).
    per_tap_min_positions: with "per_tap", convolutions whose output map has fewer positions
      keep lax's gradients (`conv.conv_general_dilated`'s min_positions; None: its default).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  planes: int
  out_planes: int
  stride: int = 1
  stride_in_1x1: bool = False
  conv_grad: str = "xla"
  per_tap_min_positions: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, Cin] -> [B, ceil(H / stride), ceil(W / stride), out_planes]."""
    conv_fn = conv.conv_function(self.conv_grad, self.per_tap_min_positions)

    def conv_bn(y, features, kernel, stride, name, bn_name):
      y = nn.Conv(features, (kernel, kernel), strides=stride, padding=kernel // 2,
                  use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                  param_dtype=self.param_dtype,
                  conv_general_dilated=conv_fn, name=name)(y)
      return FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=bn_name)(y)

    shortcut = x
    stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    y = nn.relu(conv_bn(x, self.planes, 1, stride_1x1, "conv1", "bn1"))
    y = nn.relu(conv_bn(y, self.planes, 3, stride_3x3, "conv2", "bn2"))
    y = conv_bn(y, self.out_planes, 1, 1, "conv3", "bn3")
    if self.stride != 1 or x.shape[-1] != self.out_planes:
      shortcut = conv_bn(x, self.out_planes, 1, self.stride, "downsample.0", "downsample.1")
    return nn.relu(y + shortcut)


def stem(x: jax.Array, width: float, dtype: Any, param_dtype: Any) -> jax.Array:
  """Runs the stem (conv1 7x7/2 -> bn1 -> ReLU -> 3x3/2 max pool) inside a compact module.

  Must be called from a parent's `nn.compact` method: its layers are the submodules `conv1` and
  `bn1` (torchvision's names), shared by every ResNet trunk.

  Args:
    x: [B, H, W, 3] normalised images.
    width: channel multiplier (64 * width output channels).
    dtype: computation dtype; param_dtype: parameter dtype.

  Returns:
    [B, ceil(H / 4), ceil(W / 4), 64 * width] in `dtype`.
  """
  x = x.astype(dtype)
  x = nn.Conv(scaled_channels(STEM_CHANNELS, width), (7, 7), strides=2, padding=3,
              use_bias=False, kernel_init=CONV_INIT, dtype=dtype, param_dtype=param_dtype,
              name="conv1")(x)
  x = nn.relu(FrozenBatchNorm(dtype=dtype, param_dtype=param_dtype, name="bn1")(x))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def stage(x: jax.Array, index: int, num_blocks: int, width: float, stride: int,
          stride_in_1x1: bool, conv_grad: str, dtype: Any, param_dtype: Any,
          per_tap_min_positions: int | None = None) -> jax.Array:
  """Runs `layer{index}` (num_blocks bottlenecks, the first with `stride`) inside a compact module.

  Must be called from a parent's `nn.compact` method: the blocks are its submodules
  `layer{index}.{j}`.
  """
  planes = scaled_channels(PLANES[index - 1], width)
  out_planes = scaled_channels(PLANES[index - 1] * EXPANSION, width)
  for j in range(num_blocks):
    x = Bottleneck(planes, out_planes, stride if j == 0 else 1, stride_in_1x1=stride_in_1x1,
                   conv_grad=conv_grad, per_tap_min_positions=per_tap_min_positions,
                   dtype=dtype, param_dtype=param_dtype, name=f"layer{index}.{j}")(x)
  return x


@BACKBONES.register("resnet_c4")
class ResNetC4(nn.Module):
  """ResNet stem + layer1 .. layer3 (res2 .. res4): the C4 trunk, stride 16.

  Attributes (the first five are the config section `model.resnet_c4`):
    depth: 50 or 101 (the blocks per stage, unless `blocks` is given).
    blocks: bottlenecks of layer1 .. layer3; empty: those of `depth` (fewer for tiny tests;
      the weights of a converted file then no longer fit).
    width: channel multiplier (1.0 is ResNet; 1/32 gives a tiny test trunk).
    frozen_stages: the stem (1), layer1 (2), layer2 (3), layer3 (4): the first this many get no
      gradient (stop_gradient on their output) and are neither updated nor decayed
      (`trainable`); 2 is Detectron2's FREEZE_AT. Batch norm is frozen in every stage.
    stride_in_1x1: `Bottleneck.stride_in_1x1` (true for Keras' weights, whose files say so).
    conv_grad: "xla" or "per_tap" (`conv.conv_function`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  depth: int = setting(50, "ResNet depth: 50 or 101 (blocks per stage 3, 4, 6 or 3, 4, 23)",
                       choices=tuple(DEPTHS))
  blocks: tuple[int, ...] = setting(
      (), "bottlenecks of layer1 .. layer3 (res2 .. res4); empty: those of depth",
      minimum=1, check=lambda v: "" if len(v) in (0, 3) else "must have 0 or 3 entries")
  width: float = setting(1.0, "channel multiplier (1.0: ResNet)", above=0.0)
  frozen_stages: int = setting(2, "leading stages without gradient: stem, res2, res3, res4 "
                               "(2: Detectron2's FREEZE_AT); batch norm is always frozen",
                               role="training", minimum=0, maximum=NUM_STAGES)
  stride_in_1x1: bool = setting(False, "stride on each stage's first 1x1 convolution (the "
                                "original ResNet: Keras' weights) | false: on the 3x3 "
                                "(torchvision's v1.5)")
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  input_norms = ("torchvision", "keras")   # torchvision's state dicts; Keras' ResNet50 (caffe)
  all_frozen = {"frozen_stages": NUM_STAGES}
  pretrained_hint = ("convert ImageNet ResNet weights into it: python scripts/convert_resnet.py "
                     "--input resnet50-0676ba61.pth (or a Keras resnet50 .h5) --output FILE")

  @property
  def stride(self) -> int:
    return STRIDE

  @property
  def stage_blocks(self) -> tuple[int, ...]:
    """Bottlenecks of layer1 .. layer3."""
    return tuple(self.blocks) if self.blocks else DEPTHS[self.depth][:3]

  @property
  def out_channels(self) -> int:
    return scaled_channels(PLANES[2] * EXPANSION, self.width)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] normalised images.

    Returns:
      [B, ceil(H / 16), ceil(W / 16), 1024 * width] layer3 (res4) features, after ReLU.
    """
    x = stem(x, self.width, self.dtype, self.param_dtype)
    if self.frozen_stages == 1:
      x = jax.lax.stop_gradient(x)
    for index, num_blocks in enumerate(self.stage_blocks, 1):
      x = stage(x, index, num_blocks, self.width, 1 if index == 1 else 2, self.stride_in_1x1,
                self.conv_grad, self.dtype, self.param_dtype)
      if index + 1 == self.frozen_stages:
        x = jax.lax.stop_gradient(x)
    return x

  def output_hw(self, height: int, width: int) -> tuple[int, int]:
    """The layer3 map of an H x W input: (ceil(H / 16), ceil(W / 16))."""
    return feature_size(height), feature_size(width)

  def trainable(self, params: Any) -> Any:
    """Bool pytree like `params` (this trunk's): False for batch norm and the frozen stages.

    The stem (`conv1`, `bn1`) is stage 1 and `layer{i}.*` stage i + 1; a stage is frozen when
    its number is <= frozen_stages.
    """
    def is_trainable(path, _) -> bool:
      return not is_frozen_bn(path) and stage_number(path) > self.frozen_stages
    return jax.tree_util.tree_map_with_path(is_trainable, params)

  def load_pretrained(self, params: Any, path: str, input_norm: str) -> Any:
    """Merges a converted ResNet .npz (scripts/convert_resnet.py) into the network's parameters.

    The trunk takes `conv1`, `bn1`, `layer1.*` .. `layer3.*`; `layer4.*` goes to the RoI head
    when it has those layers (`model.roi_head = "res5"`) and is left out otherwise.

    Args:
      params: the whole network's `params` ("trunk", "rpn", "head").
      path: .npz with "<layer>/<leaf>" or "<block>/<layer>/<leaf>" entries ("conv1/kernel",
        "layer1.0/bn1/running_var", "layer4.2/conv3/kernel" ...) and metadata entries without
        "/" ("input_norm": the normalisation the weights were trained with).
      input_norm: the model's `model.input_norm`.

    Returns:
      A new params tree with the file's arrays in place.

    Raises:
      ValueError: another input normalisation or stride_in_1x1, an array the network does not
        have, a shape
        that differs, or a trunk (or res5 head) parameter the file lacks.
    """
    arrays, meta = pretrained.read_npz(path, input_norm)
    check_stride_in_1x1(path, meta, self.stride_in_1x1, "model.resnet_c4.stride_in_1x1 (and "
                        "model.res5.stride_in_1x1)")
    fit = (f"the file does not fit model.backbone='resnet_c4' with depth={self.depth}, "
           f"blocks={tuple(self.blocks)}, width={self.width}")
    params = flax.core.unfreeze(params)
    head = params.get("head", {})
    has_res5 = any(name.startswith(HEAD_LAYER + ".") for name in head)
    filled = {"trunk": set(), "head": set()}
    for name, value in arrays.items():
      module = "head" if name.startswith(HEAD_LAYER + ".") else "trunk"
      if module == "head" and not has_res5:
        continue
      pretrained.set_leaf(params, module, name, value, path, fit)
      filled[module].add(name)
    pretrained.require_filled(params["trunk"], filled["trunk"], "trunk", path, fit)
    if has_res5:
      pretrained.require_filled({k: v for k, v in head.items() if k.startswith(HEAD_LAYER + ".")},
                                filled["head"], "head", path, fit)
    return params
