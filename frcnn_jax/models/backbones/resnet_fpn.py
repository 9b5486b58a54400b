"""ResNet-50 / 101 with a feature pyramid (Lin et al. 2017): torchvision's `resnet_fpn_backbone`
(`_resnet_fpn_extractor`, returned layers 1 .. 4, `LastLevelMaxPool`), the trunk of
`fasterrcnn_resnet50_fpn` (v1), and its converted weights.

  body: the ResNet stem and layer1 .. layer4 of models/backbones/resnet.py (torchvision's
    names `conv1`, `bn1`, `layer1.0` ...; frozen batch norm), outputs C2 .. C5 at strides
    4, 8, 16, 32;
  fpn (`FPN`): per level a lateral 1x1 conv (`inner_blocks.i`, with bias) of C_i, plus the
    coarser merged map upsampled as `F.interpolate(mode="nearest", size=...)`, then a 3x3
    conv (`layer_blocks.i`, pad 1, with bias): P2 .. P5; P6 = P5[::2, ::2] (max_pool2d with
    kernel 1, stride 2), for the RPN only.

The parameters are the whole trunk's tree {"conv1", "bn1", "layer1.0" .. "layer4.<n-1>",
"fpn": {"inner_blocks.0" .. "inner_blocks.3", "layer_blocks.0" .. "layer_blocks.3"}}, so that
scripts/convert_resnet.py's ImageNet files fill the body and
scripts/convert_torchvision_detector.py's detector files the whole network.
"""

from collections.abc import Sequence
from typing import Any
from typing import ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.config.fields import setting
from frcnn_jax.models import conv
from frcnn_jax.models import pretrained
from frcnn_jax.models.backbones import resnet
from frcnn_jax.models.registry import BACKBONES

NUM_BODY_LAYERS = 5                   # torchvision's trainable_backbone_layers: conv1, layer1 .. 4
STRIDES = (4, 8, 16, 32, 64)          # P2 .. P6
ROI_LEVELS = 4                        # P2 .. P5 feed the RoI pooler (featmap_names '0' .. '3')
FPN_NAME = "fpn"
DETECTOR_MODULES = ("trunk", "rpn", "head")
# torchvision's FeaturePyramidNetwork: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)).
FPN_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# stop_gradient on a frozen FPN conv's parameters, not on its input (the body may train).
_FrozenConv = nn.map_variables(nn.Conv, "params", init=True,
                               trans_in_fn=lambda v: jax.tree.map(jax.lax.stop_gradient, v))


def level_sizes(size: int) -> tuple[int, ...]:
  """Sides of P2 .. P6 for an input side `size` (exact for any size, as torchvision's).

  The stem gives ceil(size / 4); each stride-2 stage (3x3 pad 1 or 1x1 pad 0) and P6's
  kernel-1 stride-2 pool halve rounding up.
  """
  side = resnet.conv_output_size(size, 7, 2, 3)
  side = resnet.conv_output_size(side, 3, 2, 1)
  sides = [side]
  for _ in range(3):
    side = resnet.conv_output_size(side, 3, 2, 1)
    sides.append(side)
  sides.append(resnet.conv_output_size(side, 1, 2, 0))
  return tuple(sides)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output row of PyTorch's `F.interpolate(mode="nearest", size=...)`.

  ATen's `nearest_idx`: the identity when the sizes are equal, dst >> 1 when out = 2 * in, else
  min(floor(dst * scale), in - 1) in float32 with scale = float32(in) / out. For the pyramid's
  sizes (out = 2 * in or 2 * in - 1) this is exactly floor(dst * in / out) = dst >> 1.

  Args:
    in_size: input side (>= 1).
    out_size: output side (>= 1).

  Returns:
    [out_size] int64 indices into the input, computed statically (NumPy).
  """
  dst = np.arange(out_size)
  if out_size == in_size:
    return dst
  if out_size == 2 * in_size:
    return dst >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C] as `F.interpolate(x, size=(H, W), mode="nearest")`.

  Static indices per axis (`nearest_indices`); the pyramid's 2x case is a repeat and a crop,
  not a gather.
  """
  for axis, out_size in ((1, size[0]), (2, size[1])):
    index = nearest_indices(x.shape[axis], out_size)
    if np.array_equal(index, np.arange(out_size)):
      continue
    if np.array_equal(index, np.arange(out_size) >> 1):
      x = jax.lax.slice_in_dim(jnp.repeat(x, 2, axis=axis), 0, out_size, axis=axis)
    else:
      x = jnp.take(x, jnp.asarray(index, jnp.int32), axis=axis)
  return x


class FPN(nn.Module):
  """torchvision's `FeaturePyramidNetwork` (no norm layer) with `LastLevelMaxPool`.

  Attributes:
    channels: output channels of every level (torchvision's out_channels, 256).
    frozen: stop_gradient on its parameters (the inputs still get gradients).
    conv_grad: "xla" or "per_tap" (`conv.conv_function`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  channels: int = 256
  frozen: bool = False
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """Runs the top-down pathway.

    Args:
      features: C2 .. C5 (any number of levels, finest first), [B, h_i, w_i, C_i] each, h_i =
        ceil(h_{i-1} / 2) (any sizes work: the upsampling follows the lateral's size).

    Returns:
      len(features) + 1 maps [B, h_i, w_i, channels] in `dtype`, finest first; the last is
      the coarsest subsampled by 2 (ceil).
    """
    conv_cls = _FrozenConv if self.frozen else nn.Conv
    conv_fn = conv.conv_function(self.conv_grad)

    def conv_layer(x, kernel, name):
      return conv_cls(self.channels, (kernel, kernel), padding=kernel // 2, use_bias=True,
                      kernel_init=FPN_INIT, bias_init=nn.initializers.zeros, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      conv_general_dilated=conv_fn, name=name)(x)

    last = len(features) - 1
    inner = conv_layer(features[last], 1, f"inner_blocks.{last}")
    results = [conv_layer(inner, 3, f"layer_blocks.{last}")]
    for i in range(last - 1, -1, -1):
      lateral = conv_layer(features[i], 1, f"inner_blocks.{i}")
      inner = lateral + upsample_nearest(inner, lateral.shape[1:3])
      results.insert(0, conv_layer(inner, 3, f"layer_blocks.{i}"))
    results.append(results[-1][:, ::2, ::2])   # LastLevelMaxPool: max_pool2d(1, stride 2)
    return tuple(results)


@BACKBONES.register("resnet_fpn")
class ResNetFPN(nn.Module):
  """ResNet stem + layer1 .. layer4 and a feature pyramid: P2 .. P6, strides 4 .. 64.

  Attributes (the first seven are the config section `model.resnet_fpn`):
    depth: 50 or 101 (the blocks per stage, unless `blocks` is given).
    blocks: bottlenecks of layer1 .. layer4; empty: those of `depth` (fewer for tiny tests;
      the weights of a converted file then no longer fit).
    width: channel multiplier of the body (1.0 is ResNet; 1/32 gives a tiny test trunk).
    fpn_channels: channels of every pyramid level (torchvision's 256; not scaled by width).
    trainable_layers: torchvision's trainable_backbone_layers, 0 .. 5: layer4, layer3, layer2,
      layer1 and the stem (conv1) train in that order, the others get no gradient
      (stop_gradient on each frozen stage's output, which may feed the pyramid) and are
      neither updated nor decayed (`trainable`). Batch norm is frozen in every stage.
    freeze_fpn: the pyramid too gets no gradient (alternating training's frozen trunk,
      `all_frozen`); torchvision always trains it.
    stride_in_1x1: `resnet.Bottleneck.stride_in_1x1` (true for Keras' weights).
    conv_grad: "xla" or "per_tap" (`conv.conv_function`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  depth: int = setting(50, "ResNet depth: 50 or 101 (blocks per stage 3, 4, 6, 3 or 3, 4, 23, "
                       "3)", choices=tuple(resnet.DEPTHS))
  blocks: tuple[int, ...] = setting(
      (), "bottlenecks of layer1 .. layer4; empty: those of depth", minimum=1,
      check=lambda v: "" if len(v) in (0, 4) else "must have 0 or 4 entries")
  width: float = setting(1.0, "channel multiplier of the ResNet body (1.0: ResNet)", above=0.0)
  fpn_channels: int = setting(256, "channels of every pyramid level P2 .. P6 (torchvision's "
                              "256)", minimum=1)
  trainable_layers: int = setting(
      3, "torchvision's trainable_backbone_layers, 0 .. 5: how many of layer4, layer3, layer2, "
      "layer1, the stem train (3: layer2 .. layer4); batch norm is always frozen", role="training",
      minimum=0, maximum=NUM_BODY_LAYERS)
  freeze_fpn: bool = setting(False, "the pyramid gets no gradient either (alternating "
                             "training's frozen trunk) | false: it trains (torchvision)",
                             role="training")
  stride_in_1x1: bool = setting(False, "stride on each stage's first 1x1 convolution (the "
                                "original ResNet: Keras' weights) | false: on the 3x3 "
                                "(torchvision's v1.5)")
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  input_norms = ("torchvision", "keras")   # torchvision's state dicts; Keras' ResNet50 (caffe)
  # The whole trunk, pyramid included: alternating training's stages 3 and 4 keep stage 2's.
  all_frozen: ClassVar[dict[str, Any]] = {"trainable_layers": 0, "freeze_fpn": True}
  pretrained_hint = ("convert ImageNet ResNet weights into it: python scripts/convert_resnet.py "
                     "--input resnet50-0676ba61.pth --output FILE; or a whole torchvision "
                     "fasterrcnn_resnet50_fpn: python scripts/convert_torchvision_detector.py "
                     "--input fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --bn_eps 0 --output FILE")

  @property
  def stride(self) -> int:
    """The coarsest ResNet stride: canvases must be multiples of it (torchvision's
    size_divisible)."""
    return STRIDES[3]

  @property
  def strides(self) -> tuple[int, ...]:
    """Strides of P2 .. P6."""
    return STRIDES

  @property
  def roi_levels(self) -> int:
    """P2 .. P5 feed the RoI pooler; P6 only the RPN."""
    return ROI_LEVELS

  @property
  def out_channels(self) -> int:
    return self.fpn_channels

  @property
  def stage_blocks(self) -> tuple[int, ...]:
    """Bottlenecks of layer1 .. layer4."""
    return tuple(self.blocks) if self.blocks else resnet.DEPTHS[self.depth]

  @property
  def frozen_stages(self) -> int:
    """Leading frozen stages of the body: the stem is 1, layer{i} is i + 1."""
    if not 0 <= self.trainable_layers <= NUM_BODY_LAYERS:
      raise ValueError(f"trainable_layers must be in [0, {NUM_BODY_LAYERS}], got "
                       f"{self.trainable_layers}")
    return NUM_BODY_LAYERS - self.trainable_layers

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] normalised images.

    Returns:
      (P2, P3, P4, P5, P6), each [B, h_l, w_l, fpn_channels] in `dtype` with (h_l, w_l) =
      `output_hw(H, W)[l]` (about H / stride_l).

    Raises:
      ValueError: `blocks` without 4 entries or trainable_layers outside [0, 5].
    """
    if len(self.stage_blocks) != 4:
      raise ValueError(f"blocks must have 4 entries (layer1 .. layer4), got {self.blocks}")
    frozen = self.frozen_stages
    x = resnet.stem(x, self.width, self.dtype, self.param_dtype)
    if frozen >= 1:
      x = jax.lax.stop_gradient(x)
    features = []
    for index, num_blocks in enumerate(self.stage_blocks, 1):
      x = resnet.stage(x, index, num_blocks, self.width, 1 if index == 1 else 2,
                       self.stride_in_1x1, self.conv_grad, self.dtype, self.param_dtype)
      if index + 1 <= frozen:   # every frozen output: C2 .. C4 also feed the pyramid
        x = jax.lax.stop_gradient(x)
      features.append(x)
    return FPN(self.fpn_channels, frozen=self.freeze_fpn, conv_grad=self.conv_grad,
               dtype=self.dtype, param_dtype=self.param_dtype, name=FPN_NAME)(features)

  def output_hw(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """(h, w) of P2 .. P6 for an H x W input (`level_sizes` of each side)."""
    return tuple(zip(level_sizes(height), level_sizes(width)))

  def trainable(self, params: Any) -> Any:
    """Bool pytree like `params` (this trunk's): False for batch norm, the frozen stages and,
    with `freeze_fpn`, the pyramid.

    The stem (`conv1`, `bn1`) is stage 1 and `layer{i}.*` stage i + 1; a stage is frozen when
    its number is <= 5 - trainable_layers.
    """
    frozen = self.frozen_stages

    def is_trainable(path, _) -> bool:
      if str(getattr(path[0], "key", path[0])) == FPN_NAME:
        return not self.freeze_fpn
      return not resnet.is_frozen_bn(path) and resnet.stage_number(path) > frozen
    return jax.tree_util.tree_map_with_path(is_trainable, params)

  def load_pretrained(self, params: Any, path: str, input_norm: str) -> Any:
    """Merges a converted .npz into the network's parameters.

    Two kinds of file, told apart by their names:
      * ImageNet ResNet (scripts/convert_resnet.py): "conv1/kernel", "layer1.0/bn1/weight" ..
        "layer4.2/..." fill the body, every one of whose parameters it must have; the pyramid,
        RPN and RoI head keep their initialisation.
      * whole detector (scripts/convert_torchvision_detector.py): "trunk/...", "rpn/...",
        "head/..." fill every parameter of the three (the RPN with sigmoid objectness and 3
        anchors per location; the `fc` head with dim 1024 and the file's classes).

    Args:
      params: the whole network's `params` ("trunk", "rpn", "head").
      path: the .npz; its entries without "/" are metadata ("input_norm": the normalisation
        the weights were trained with; "stride_in_1x1").
      input_norm: the model's `model.input_norm`.

    Returns:
      A new params tree with the file's arrays in place.

    Raises:
      ValueError: another input normalisation or stride_in_1x1, an array the network does not
        have, a shape that differs, or a parameter the file should fill but lacks; the message
        names the array and the settings that must match.
    """
    arrays, meta = pretrained.read_npz(path, input_norm)
    resnet.check_stride_in_1x1(path, meta, self.stride_in_1x1, "model.resnet_fpn.stride_in_1x1")
    file_classes = int(meta["num_classes"]) if "num_classes" in meta else None
    detector = {name.split("/")[0] in DETECTOR_MODULES for name in arrays}
    if len(detector) > 1:
      raise ValueError(f"{path} mixes whole-detector names (trunk/, rpn/, head/) with ImageNet "
                       "ResNet names; convert it again")
    detector = detector == {True}
    fits = {
        "trunk": (f"the file does not fit model.backbone='resnet_fpn' with depth={self.depth}, "
                  f"blocks={tuple(self.blocks)}, width={self.width}, "
                  f"fpn_channels={self.fpn_channels}"),
        "rpn": ("the RPN must be torchvision's: model.rpn_objectness='sigmoid', 3 anchors per "
                "location (anchors.ratios 0.5, 1, 2; one size per level)"),
        "head": ("the RoI head must be torchvision's TwoMLPHead: model.roi_head='fc', "
                 "model.fc.dim=1024, model.roi_size=7"
                 + (f", with the file's {file_classes} classes (torchvision's num_classes="
                    f"{file_classes + 1}: background included)" if file_classes else "")),
    }
    params = flax.core.unfreeze(params)
    filled = {module: set() for module in DETECTOR_MODULES}
    for name, value in arrays.items():
      module, inner = name.split("/", 1) if detector else ("trunk", name)
      if module not in params:
        raise ValueError(f"{path}: {name}: the model has no {module!r} parameters")
      pretrained.set_leaf(params, module, inner, value, path, fits[module], file_name=name)
      filled[module].add(inner)
    if detector:
      for module in DETECTOR_MODULES:
        pretrained.require_filled(params[module], filled[module], module, path, fits[module])
    else:   # an ImageNet body: the pyramid keeps its initialisation
      body = {k: v for k, v in params["trunk"].items() if k != FPN_NAME}
      pretrained.require_filled(body, filled["trunk"], "trunk", path, fits["trunk"])
    return params
