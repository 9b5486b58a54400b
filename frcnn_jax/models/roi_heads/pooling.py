"""RoI feature extraction as one static callable: the RoI op and its settings, on one
feature map (`RoIPooler`) or on a multi-level backbone's levels (`MultiScaleRoIPooler`)."""

import dataclasses

import jax
import jax.numpy as jnp

from frcnn_jax.ops import multiscale_roi
from frcnn_jax.ops import roi as roi_ops

ROI_OPS = ("roi_pool", "roi_align")


@dataclasses.dataclass(frozen=True)
class RoIPooler:
  """Crops a fixed-size feature map per RoI (`model.roi_*` keys).

  Attributes:
    op: "roi_pool" (Caffe max pooling, the paper) or "roi_align".
    size: output side.
    spatial_scale: feature-map size / image size (1 / the backbone's stride).
    sampling_ratio: roi_align's samples per bin side.
    aligned: roi_align's half-pixel offset.
    pool_coordinates: how roi_pool rounds RoIs to cells, "torchvision" (round x2 * scale) or
      "caffe" (round (x2 - 1) * scale, the inclusive end pixel); see ops/roi.py.
  """
  op: str = "roi_pool"
  size: int = 7
  spatial_scale: float = 1.0 / 16.0
  sampling_ratio: int = 2
  aligned: bool = False
  pool_coordinates: str = "torchvision"

  def __post_init__(self):
    if self.op not in ROI_OPS:
      raise ValueError(f"op must be one of {ROI_OPS}, got {self.op!r}")

  def __call__(self, features: jax.Array, rois: jax.Array) -> jax.Array:
    """[H, W, C] features, [R, 4] rois (image pixels) -> [R, size, size, C] float32."""
    features = features.astype(jnp.float32)
    size = (self.size, self.size)
    if self.op == "roi_pool":
      return roi_ops.roi_pool(features, rois, size, self.spatial_scale,
                              coordinates=self.pool_coordinates)
    return roi_ops.roi_align(features, rois, size, self.spatial_scale,
                             sampling_ratio=self.sampling_ratio, aligned=self.aligned)


@dataclasses.dataclass(frozen=True)
class MultiScaleRoIPooler:
  """RoIAlign on the feature level each RoI's size selects: torchvision's `MultiScaleRoIAlign`
  (the FPN paper's level mapping, eq. 1), for multi-level backbones.

  Attributes:
    size: output side.
    spatial_scales: feature-map size / image size of each level, finest first (powers of 2).
    sampling_ratio: samples per bin side.
    aligned: roi_align's half-pixel offset.
    canonical_scale: a RoI with sqrt(area) of this many pixels goes to `canonical_level`.
    canonical_level: the level (log2 of the stride) of `canonical_scale`.
    gradient: "dense" or "scatter" (`multiscale_roi.multiscale_roi_align`; same results).
  """
  size: int = 7
  spatial_scales: tuple[float, ...] = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
  sampling_ratio: int = 2
  aligned: bool = False
  canonical_scale: float = 224.0
  canonical_level: int = 4
  gradient: str = "dense"

  def __call__(self, features: tuple[jax.Array, ...], rois: jax.Array) -> jax.Array:
    """Levels [H_l, W_l, C], [R, 4] rois (image pixels) -> [R, size, size, C] float32."""
    return multiscale_roi.multiscale_roi_align(
        tuple(level.astype(jnp.float32) for level in features), rois, (self.size, self.size),
        self.spatial_scales, sampling_ratio=self.sampling_ratio, aligned=self.aligned,
        canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
        gradient=self.gradient)
