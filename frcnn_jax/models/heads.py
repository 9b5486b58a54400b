"""The Fast R-CNN RoI head: RoI pooling, fc6/fc7 and the class / box-regression layers."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.ops import roi as roi_ops

ROI_OPS = ("roi_pool", "roi_align")


class RoIHead(nn.Module):
  """RoI features -> flatten (HWC) -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> outputs.

  Attributes:
    num_classes: C, foreground classes (the classifier has C + 1 outputs, 0 is background).
    roi_op: "roi_pool" (Caffe max pooling, the paper) or "roi_align".
    roi_pool_coordinates: how roi_pool rounds RoIs to cells: "torchvision" (round x2 * scale)
      or "caffe" (round (x2 - 1) * scale, the inclusive end pixel); see ops/roi.py.
    roi_size: output size of the RoI op (7 for VGG16).
    sampling_ratio: roi_align's samples per bin side.
    aligned: roi_align's half-pixel offset.
    spatial_scale: feature-map size / image size (1/16).
    fc_dim: width of fc6 and fc7 (4096).
    dropout: dropout rate after fc6 and fc7.
    dtype: computation dtype of the fc layers; outputs are float32.
    param_dtype: parameter dtype.
  """
  num_classes: int
  roi_op: str = "roi_pool"
  roi_pool_coordinates: str = "torchvision"
  roi_size: int = 7
  sampling_ratio: int = 2
  aligned: bool = False
  spatial_scale: float = 1.0 / 16.0
  fc_dim: int = 4096
  dropout: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _roi_features(self, features: jax.Array, rois: jax.Array) -> jax.Array:
    """[H, W, C] features, [R, 4] rois -> [R, roi_size, roi_size, C] float32."""
    features = features.astype(jnp.float32)
    size = (self.roi_size, self.roi_size)
    if self.roi_op == "roi_pool":
      return roi_ops.roi_pool(features, rois, size, self.spatial_scale,
                              coordinates=self.roi_pool_coordinates)
    if self.roi_op == "roi_align":
      return roi_ops.roi_align(features, rois, size, self.spatial_scale,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned)
    raise ValueError(f"roi_op must be one of {ROI_OPS}, got {self.roi_op!r}")

  @nn.compact
  def __call__(self, features: jax.Array, rois: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Classifies and refines RoIs.

    Args:
      features: [B, H, W, C] trunk features.
      rois: [B, R, 4] xyxy boxes in image pixels (float32).
      train: enables dropout (needs the "dropout" rng).

    Returns:
      class_logits: [B, R, C + 1] float32.
      box_deltas: [B, R, C + 1, 4] float32 class-specific deltas (normalised by the box weights).
    """
    x = jax.vmap(self._roi_features)(features, rois.astype(jnp.float32))
    batch, num_rois = rois.shape[:2]
    x = x.reshape(batch, num_rois, -1).astype(self.dtype)
    dense = lambda features, name, **kw: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    for name in ("fc6", "fc7"):
      x = nn.relu(dense(self.fc_dim, name)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    zeros = nn.initializers.zeros
    logits = dense(self.num_classes + 1, "cls", kernel_init=nn.initializers.normal(0.01),
                   bias_init=zeros)(x)
    deltas = dense(4 * (self.num_classes + 1), "box", kernel_init=nn.initializers.normal(0.001),
                   bias_init=zeros)(x)
    deltas = deltas.astype(jnp.float32).reshape(batch, num_rois, self.num_classes + 1, 4)
    return logits.astype(jnp.float32), deltas
