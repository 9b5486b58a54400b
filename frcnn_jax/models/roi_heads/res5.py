"""The res5 RoI head of the ResNet C4 detector (He et al. 2016; Detectron2's Res5ROIHeads).

RoI features of the res4 map (the `model.roi_*` op, RoIAlign 14 x 14 in Detectron2's R50-C4)
go through ResNet's layer4 (res5: bottlenecks of 512 planes, 2048 outputs, the first with
stride 2, so 14 x 14 -> 7 x 7), are averaged over the bins and feed the class and box layers.
Its blocks are named `layer4.0` ... as torchvision's state dict, so the backbone `resnet_c4`
loads their converted ImageNet weights (`ResNetC4.load_pretrained`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.config.fields import setting
from frcnn_jax.models.backbones import resnet
from frcnn_jax.models.registry import ROI_HEADS
from frcnn_jax.models.roi_heads import predictors
from frcnn_jax.models.roi_heads.pooling import MultiScaleRoIPooler
from frcnn_jax.models.roi_heads.pooling import RoIPooler

HEAD_BLOCKS = resnet.DEPTHS[50][3]   # layer4 has 3 bottlenecks in ResNet-50 and ResNet-101


@ROI_HEADS.register("res5")
class Res5Head(nn.Module):
  """RoI features -> layer4 (res5) -> average pool -> class / box layers.

  Attributes:
    width: channel multiplier of layer4 (`model.res5.width`; as the backbone's for its weights).
    blocks: bottlenecks of layer4 (`model.res5.blocks`; 3 in ResNet-50 / 101).
    stride_in_1x1: `resnet.Bottleneck.stride_in_1x1` (`model.res5.stride_in_1x1`).
    num_classes: C, foreground classes (the classifier has C + 1 outputs, 0 is background).
    pooler: the RoI feature extraction (of one map, or of a multi-level backbone's levels).
    conv_grad: "xla" or "per_tap" (`models/conv.py`; the builder passes `model.conv_grad`).
    dtype: computation dtype; outputs are float32.
    param_dtype: parameter dtype.
  """
  width: float = setting(1.0, "channel multiplier of res5 (as the backbone's: 1.0 is ResNet)",
                         above=0.0)
  blocks: int = setting(HEAD_BLOCKS, "bottlenecks of res5 (layer4; 3 in ResNet-50 / 101)",
                        minimum=1)
  stride_in_1x1: bool = setting(False, "stride on each block's first 1x1 convolution (Keras' "
                                "weights; as model.resnet_c4.stride_in_1x1)")
  num_classes: int = 20
  pooler: RoIPooler | MultiScaleRoIPooler = RoIPooler()
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def out_channels(self) -> int:
    """Channels of the pooled res5 features (2048 * width)."""
    return resnet.scaled_channels(resnet.PLANES[3] * resnet.EXPANSION, self.width)

  @nn.compact
  def __call__(self, features: jax.Array, rois: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Classifies and refines RoIs.

    Args:
      features: [B, H, W, C] res4 features (a tuple of levels for a MultiScaleRoIPooler).
      rois: [B, R, 4] xyxy boxes in image pixels (float32).
      train: unused (frozen batch norm behaves alike in training and test).

    Returns:
      class_logits: [B, R, C + 1] float32.
      box_deltas: [B, R, C + 1, 4] float32 class-specific deltas (normalised by the box weights).
    """
    del train
    with jax.named_scope("roi_features"):   # a stage of frcnn_jax/benchmarking/hlo.py
      x = jax.vmap(self.pooler)(features, rois.astype(jnp.float32))
    batch, num_rois = rois.shape[:2]
    x = x.reshape(batch * num_rois, *x.shape[2:]).astype(self.dtype)   # [B * R, s, s, C]
    # With per_tap, every convolution gets the per-tap weight gradient whatever its map size:
    # the 14 x 14 / 7 x 7 maps come in batches of all the RoIs, where lax's weight gradients
    # are the slower ones on the CPU (benchmarks/RESULTS.md).
    x = resnet.stage(x, 4, self.blocks, self.width, 2, self.stride_in_1x1, self.conv_grad,
                     self.dtype, self.param_dtype, per_tap_min_positions=0)
    x = x.astype(jnp.float32).mean(axis=(1, 2)).reshape(batch, num_rois, -1).astype(self.dtype)
    return predictors.class_and_box(x, self.num_classes, self.dtype, self.param_dtype)

  def trainable(self, params: Any) -> Any:
    """Bool pytree like `params` (this head's): False for the frozen batch norms of res5."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not resnet.is_frozen_bn(path),
                                            params)
