"""Local response normalisation as Caffe's LRN layer computes it, on NHWC arrays.

Caffe (`src/caffe/layers/lrn_layer.cpp`, LRNParameter in `caffe.proto`) has two regions:

* ACROSS_CHANNELS: y = x * (k + alpha / n * sum of x^2 over the n channels c - (n-1)/2 ..
  c + (n-1)/2)^-beta, channels beyond the ends counting as zero.
* WITHIN_CHANNEL: y = x * (1 + alpha * a)^-beta, where a is an average pooling (AVE, stride 1,
  pad (n-1)/2) of x^2 over an n x n window of the same channel. Caffe's AVE pooling divides by
  the window's size including the padding that lies inside [-pad, size + pad), which with
  stride 1 and this pad is always n * n: a = (zero-padded window sum of x^2) / n^2, also at the
  borders. `k` takes no part here (Caffe's power layer shifts by 1).

ZF (py-faster-rcnn's `models/pascal_voc/ZF`) uses WITHIN_CHANNEL with n = 3, alpha = 5e-5,
beta = 0.75 after conv1 and conv2.
"""

import jax
import jax.numpy as jnp
from jax import lax

ACROSS_CHANNELS = "across_channels"
WITHIN_CHANNEL = "within_channel"
NORM_REGIONS = (ACROSS_CHANNELS, WITHIN_CHANNEL)


def _window_sum(v: jax.Array, axis: int, size: int) -> jax.Array:
  """Sum over a centred window of `size` along `axis`, zero beyond the ends (same shape).

  Shifted slices of a zero-padded copy: elementwise adds only, cheap to differentiate.
  """
  pad = (size - 1) // 2
  widths = [(0, 0)] * v.ndim
  widths[axis] = (pad, pad)
  padded = jnp.pad(v, widths)
  n = v.shape[axis]
  total = lax.slice_in_dim(padded, 0, n, axis=axis)
  for start in range(1, size):
    total = total + lax.slice_in_dim(padded, start, start + n, axis=axis)
  return total


def local_response_norm(x: jax.Array, local_size: int = 5, alpha: float = 1.0,
                        beta: float = 0.75, k: float = 1.0,
                        norm_region: str = ACROSS_CHANNELS) -> jax.Array:
  """Caffe's LRN layer (defaults: Caffe's LRNParameter defaults).

  Computed in float32 (or the input's wider float type) and returned in x's dtype; each
  position depends on its own image only, so a batch equals the images one at a time.

  Args:
    x: [..., H, W, C] floating point (NHWC, or one HWC image).
    local_size: n, the window side (channels for ACROSS_CHANNELS); odd, as Caffe requires.
    alpha: scale of the summed squares.
    beta: exponent.
    k: ACROSS_CHANNELS' additive constant (> 0); unused by WITHIN_CHANNEL.
    norm_region: "across_channels" or "within_channel".

  Returns:
    y with x's shape and dtype: ACROSS_CHANNELS x * (k + alpha / n * S_c)^-beta, WITHIN_CHANNEL
    x * (1 + alpha / n^2 * S_hw)^-beta, S the zero-padded window sums of x^2.

  Raises:
    ValueError: an even or non-positive local_size, k <= 0 for ACROSS_CHANNELS, an unknown
      norm_region, or x with fewer than 3 dimensions.
  """
  if norm_region not in NORM_REGIONS:
    raise ValueError(f"norm_region must be one of {NORM_REGIONS}, got {norm_region!r}")
  if local_size < 1 or local_size % 2 == 0:
    raise ValueError(f"local_size must be odd and positive (as Caffe's LRN), got {local_size}")
  if norm_region == ACROSS_CHANNELS and k <= 0:
    raise ValueError(f"k must be > 0 for across_channels, got {k}")
  if x.ndim < 3:
    raise ValueError(f"x must be [..., H, W, C], got shape {x.shape}")
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(compute)
  squares = xf * xf
  if norm_region == ACROSS_CHANNELS:
    scale = k + (alpha / local_size) * _window_sum(squares, x.ndim - 1, local_size)
  else:
    summed = _window_sum(_window_sum(squares, x.ndim - 3, local_size), x.ndim - 2, local_size)
    scale = 1.0 + (alpha / (local_size * local_size)) * summed
  return (xf * scale ** (-beta)).astype(x.dtype)
