"""The Region Proposal Network head: a 3x3 conv and sibling 1x1 objectness / box-delta convs."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.models import conv as conv_lib

OBJECTNESS_MODES = ("softmax", "sigmoid")


class RPNHead(nn.Module):
  """RPN head; outputs are flattened in `anchor_grid` order (row, column, anchor).

  Attributes:
    num_anchors: k, anchors per feature-map location.
    channels: width of the 3x3 conv (512 in the paper).
    objectness: "softmax" (2 logits per anchor, background then object: the paper) or
      "sigmoid" (1 logit per anchor).
    conv_grad: how the convolutions are lowered, "xla" (lax's) or "per_tap"
      (`conv.conv_general_dilated`: per-tap weight gradients, the 1x1 convs as matmuls).
    dtype: computation dtype of the convolutions; outputs are float32.
    param_dtype: parameter dtype.
  """
  num_anchors: int = 9
  channels: int = 512
  objectness: str = "softmax"
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Computes objectness logits and box deltas.

    Args:
      features: [B, H, W, C] trunk features.

    Returns:
      logits: [B, H*W*k, 2] float32 (softmax) or [B, H*W*k, 1] (sigmoid).
      deltas: [B, H*W*k, 4] float32 (t_x, t_y, t_w, t_h) relative to the anchors.
    """
    if self.objectness not in OBJECTNESS_MODES:
      raise ValueError(f"objectness must be one of {OBJECTNESS_MODES}, got {self.objectness!r}")
    num_logits = 2 if self.objectness == "softmax" else 1
    conv = lambda features, kernel, name: nn.Conv(
        features, kernel, padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
        conv_general_dilated=conv_lib.conv_function(self.conv_grad), name=name)
    x = nn.relu(conv(self.channels, (3, 3), "conv")(features))
    logits = conv(self.num_anchors * num_logits, (1, 1), "objectness")(x)
    deltas = conv(self.num_anchors * 4, (1, 1), "deltas")(x)
    batch = features.shape[0]
    logits = logits.astype(jnp.float32).reshape(batch, -1, num_logits)
    deltas = deltas.astype(jnp.float32).reshape(batch, -1, 4)
    return logits, deltas


def objectness_scores(logits: jax.Array) -> jax.Array:
  """Object probability from RPN logits.

  Args:
    logits: [..., 2] (softmax: background, object) or [..., 1] (sigmoid) float32 logits.

  Returns:
    [...] probability that each anchor holds an object.
  """
  if logits.shape[-1] == 2:
    return jax.nn.softmax(logits, axis=-1)[..., 1]
  return jax.nn.sigmoid(logits[..., 0])


def objectness_logits(logits: jax.Array) -> jax.Array:
  """Object log-odds from RPN logits, for ranking proposals.

  For 2-way softmax, p(object) = sigmoid(object - background) exactly, so the difference
  ranks like the probability without saturating at float32's 1.0 (logits above ~16.6).

  Args:
    logits: [..., 2] (softmax: background, object) or [..., 1] (sigmoid) float32 logits.

  Returns:
    [...] log-odds; sigmoid of it is `objectness_scores(logits)`.
  """
  if logits.shape[-1] == 2:
    return logits[..., 1] - logits[..., 0]
  return logits[..., 0]
