"""The class and box layers every RoI head ends with."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def class_and_box(x: jax.Array, num_classes: int, dtype: Any,
                  param_dtype: Any) -> tuple[jax.Array, jax.Array]:
  """The (C + 1)-way classifier and the class-specific box regressor, called inside a head's
  `nn.compact` method (their parameters are the head's "cls" and "box").

  Args:
    x: [B, R, D] per-RoI features.
    num_classes: C foreground classes.
    dtype: computation dtype; param_dtype: parameter dtype.

  Returns:
    class_logits: [B, R, C + 1] float32 (weights initialised N(0, 0.01), the paper's).
    box_deltas: [B, R, C + 1, 4] float32 (weights N(0, 0.001)).
  """
  zeros = nn.initializers.zeros
  logits = nn.Dense(num_classes + 1, dtype=dtype, param_dtype=param_dtype, name="cls",
                    kernel_init=nn.initializers.normal(0.01), bias_init=zeros)(x)
  deltas = nn.Dense(4 * (num_classes + 1), dtype=dtype, param_dtype=param_dtype, name="box",
                    kernel_init=nn.initializers.normal(0.001), bias_init=zeros)(x)
  deltas = deltas.astype(jnp.float32).reshape(*x.shape[:2], num_classes + 1, 4)
  return logits.astype(jnp.float32), deltas
