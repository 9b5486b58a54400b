"""The Fast R-CNN head of the paper: RoI pooling, fc6 / fc7 and the class / box layers."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.config.fields import setting
from frcnn_jax.models.registry import ROI_HEADS
from frcnn_jax.models.roi_heads import predictors
from frcnn_jax.models.roi_heads.pooling import MultiScaleRoIPooler
from frcnn_jax.models.roi_heads.pooling import RoIPooler


@ROI_HEADS.register("fc")
class FCHead(nn.Module):
  """RoI features -> flatten (HWC) -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> outputs.

  Attributes:
    dim: width of fc6 and fc7 (`model.fc.dim`).
    dropout: dropout rate after fc6 and fc7 (`model.fc.dropout`).
    dropout_scale_train: inverted dropout (True) or Caffe's `scale_train: false` (False).
    num_classes: C, foreground classes (the classifier has C + 1 outputs, 0 is background).
    pooler: the RoI feature extraction (of one map, or of a multi-level backbone's levels).
    dtype: computation dtype of the fc layers; outputs are float32.
    param_dtype: parameter dtype.
  """
  dim: int = setting(4096, "width of fc6 and fc7", minimum=1)
  dropout: float = setting(0.5, "dropout rate after fc6 and fc7 (a later command keeps the "
                           "run's)", role="training", minimum=0.0, maximum=1.0)
  dropout_scale_train: bool = setting(
      True, "dropout scales kept units by 1 / (1 - rate) in training (torchvision, Caffe's "
      "default) | false: unscaled in training and times (1 - rate) at test, Caffe's "
      "scale_train: false (py-faster-rcnn's ZF)")
  num_classes: int = 20
  pooler: RoIPooler | MultiScaleRoIPooler = RoIPooler()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, rois: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Classifies and refines RoIs.

    Args:
      features: [B, H, W, C] trunk features (a tuple of levels for a MultiScaleRoIPooler).
      rois: [B, R, 4] xyxy boxes in image pixels (float32).
      train: enables dropout (needs the "dropout" rng).

    Returns:
      class_logits: [B, R, C + 1] float32.
      box_deltas: [B, R, C + 1, 4] float32 class-specific deltas (normalised by the box weights).
    """
    with jax.named_scope("roi_features"):   # a stage of frcnn_jax/benchmarking/hlo.py
      x = jax.vmap(self.pooler)(features, rois.astype(jnp.float32))
    batch, num_rois = rois.shape[:2]
    x = x.reshape(batch, num_rois, -1).astype(self.dtype)
    dense = lambda features, name, **kw: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    for name in ("fc6", "fc7"):
      x = nn.relu(dense(self.dim, name)(x))
      x = self._dropout(x, train)
    return predictors.class_and_box(x, self.num_classes, self.dtype, self.param_dtype)

  def _dropout(self, x: jax.Array, train: bool) -> jax.Array:
    if self.dropout_scale_train:
      return nn.Dropout(self.dropout, deterministic=not train)(x)
    key = self.make_rng("dropout") if train and self.dropout > 0.0 else None
    return unscaled_dropout(x, self.dropout, key)


def unscaled_dropout(x: jax.Array, rate: float, key: jax.Array | None = None) -> jax.Array:
  """Caffe's dropout with `scale_train: false`.

  Args:
    x: any array.
    rate: the probability of dropping a unit.
    key: a PRNG key in training (units dropped with probability `rate`, the others kept as they
      are); None at test time (every unit times 1 - rate).

  Returns:
    An array like `x`.
  """
  if key is None:
    return x * jnp.asarray(1.0 - rate, x.dtype)
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x, jnp.zeros_like(x))
