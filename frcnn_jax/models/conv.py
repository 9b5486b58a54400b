"""2D convolution computed as matmuls where XLA:CPU's convolution kernels are slow.

XLA:CPU lowers the weight gradient of a convolution (the contraction of the input with the
output gradient over batch and space) to a slow convolution kernel: on VGG16's conv3 layers it
takes several times the forward's time (benchmarks/RESULTS.md, the per-layer section).
`conv_general_dilated` computes the same forward convolution with `jax.custom_vjp`; its backward
pass gives the input gradient as lax's own (the transpose of the forward convolution, so it
equals lax's exactly) and the weight gradient as one matmul per kernel tap,

  dW[ky, kx] = sum over (b, i, j) of x_pad[b, i + ky, j + kx, :]^T dy[b, i, j, :]   [Cin, Cout],

which XLA:CPU runs at matmul speed. The weight gradient equals lax's up to float rounding. On
small maps lax's own weight gradient is the faster one (scripts/bench_conv.py times both per
layer; benchmarks/RESULTS.md), so layers whose output map has fewer than `PER_TAP_MIN_POSITIONS`
positions (Ho * Wo, whatever the batch) keep lax's gradients.

A 1x1 convolution without padding has a single tap: `pointwise` computes it as one matmul
over the channels (of every SH-th row and SW-th column), and autodiff makes both of its
gradients matmuls too. XLA:CPU runs that at matmul speed, faster than its convolution kernels
on every map size measured (ResNet's trunk maps and the res5 head's batches of RoIs;
`scripts/bench_conv.py --parts pointwise`, benchmarks/RESULTS.md), so it has no threshold.

`conv_general_dilated` takes `lax.conv_general_dilated`'s arguments, so it plugs into Flax:
`nn.Conv(..., conv_general_dilated=conv.conv_general_dilated)`. It supports what the
backbones, the RPN and the res5 head use (NHWC inputs, HWIO kernels, any window strides,
non-negative padding, no dilation, no feature or batch groups) and raises a ValueError for
anything else.
"""

import functools
from typing import Any
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]

PER_TAP_MIN_POSITIONS = 256
CONV_GRADS = ("xla", "per_tap")

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def forward(x: jax.Array, kernel: jax.Array, padding: Padding, precision: Any = None,
            strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """Convolution with explicit padding (lax's own).

  Args:
    x: [B, H, W, Cin] input.
    kernel: [KH, KW, Cin, Cout] kernel.
    padding: ((top, bottom), (left, right)) zero padding.
    precision: lax precision of the convolution.
    strides: (SH, SW) window strides.

  Returns:
    [B, Ho, Wo, Cout], Ho = (H + top + bottom - KH) // SH + 1, Wo alike; dtype of x.
  """
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def weight_grad(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], padding: Padding,
                precision: Any = None, strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """Gradient of `forward` with respect to its kernel, one matmul per tap.

  Each tap contracts dy with the shifted input window over (B, Ho, Wo). dy is transposed to
  [Cout, B, Ho, Wo] once, so every matmul has its contracted dimension minor on the left
  (XLA:CPU's matmul wants it there and would otherwise transpose each of the KH * KW windows).
  Products accumulate in float32 (as lax's convolutions do on CPU) and the result is cast to
  x's dtype.

  Args:
    x: [B, H, W, Cin] forward input.
    dy: [B, Ho, Wo, Cout] output gradient.
    kernel_hw: (KH, KW).
    padding: the forward convolution's padding.
    precision: lax precision of the matmuls.
    strides: the forward convolution's (SH, SW); tap (ky, kx) reads every SH-th row from ky.

  Returns:
    [KH, KW, Cin, Cout] kernel gradient, dtype of x.
  """
  kh, kw = kernel_hw
  sh, sw = strides
  out_h, out_w = dy.shape[1:3]
  x_pad = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  dy_t = jnp.transpose(dy, (3, 0, 1, 2))
  contract = (((1, 2, 3), (0, 1, 2)), ((), ()))
  window = lambda ky, kx: x_pad[:, ky:ky + sh * (out_h - 1) + 1:sh,
                                kx:kx + sw * (out_w - 1) + 1:sw, :]
  taps = [[lax.dot_general(dy_t, window(ky, kx), contract,
                           precision=precision, preferred_element_type=jnp.float32)
           for kx in range(kw)] for ky in range(kh)]
  return jnp.swapaxes(jnp.stack([jnp.stack(row) for row in taps]), 2, 3).astype(x.dtype)


def pointwise(x: jax.Array, kernel: jax.Array, precision: Any = None,
              strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """A 1x1 convolution without padding as one matmul over the channels.

  Args:
    x: [B, H, W, Cin] input.
    kernel: [1, 1, Cin, Cout] kernel.
    precision: lax precision of the matmul.
    strides: (SH, SW); the output reads every SH-th row and SW-th column from the first.

  Returns:
    [B, ceil(H / SH), ceil(W / SW), Cout], as `forward` with zero padding (products
    accumulate in float32 and are cast to x's dtype).
  """
  sh, sw = strides
  x = x[:, ::sh, ::sw, :]
  # A 2D matmul: on the 4D operand XLA:CPU's gradient transposes run several times slower.
  y = lax.dot_general(x.reshape(-1, x.shape[-1]), kernel[0, 0], (((1,), (0,)), ((), ())),
                      precision=precision, preferred_element_type=jnp.float32)
  return y.reshape(*x.shape[:3], -1).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_per_tap(x: jax.Array, kernel: jax.Array, padding: Padding, precision: Any = None,
                 strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """`forward` whose backward uses lax's input gradient and the per-tap `weight_grad`.

  Args:
    x: [B, H, W, Cin] input.
    kernel: [KH, KW, Cin, Cout] kernel, the dtype of x.
    padding: ((top, bottom), (left, right)), each >= 0.
    precision: lax precision (hashable: None, a lax.Precision or a pair of them).
    strides: (SH, SW) window strides.

  Returns:
    [B, Ho, Wo, Cout] as `forward`.
  """
  return forward(x, kernel, padding, precision, strides)


def _conv_per_tap_fwd(x, kernel, padding, precision, strides):
  return forward(x, kernel, padding, precision, strides), (x, kernel)


def _conv_per_tap_bwd(padding, precision, strides, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: forward(x, kernel, padding, precision, strides), x)
  return input_vjp(dy)[0], weight_grad(x, dy, kernel.shape[:2], padding, precision, strides)


conv_per_tap.defvjp(_conv_per_tap_fwd, _conv_per_tap_bwd)


def uses_per_tap(out_hw: Sequence[int], min_positions: int | None = None) -> bool:
  """Whether a layer with output map `out_hw` (Ho, Wo) gets the per-tap weight gradient (at
  least `min_positions` positions; None: PER_TAP_MIN_POSITIONS)."""
  if min_positions is None:
    min_positions = PER_TAP_MIN_POSITIONS
  return out_hw[0] * out_hw[1] >= min_positions


def _all_ones(name: str, values: Sequence[int] | None) -> None:
  if values is not None and any(v != 1 for v in values):
    raise ValueError(f"per-tap conv: {name} must be 1, got {tuple(values)}")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, *,
                         min_positions: int | None = None) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated` (2D, NHWC / HWIO) with per-tap weight gradients.

  Args:
    lhs: [B, H, W, Cin] input.
    rhs: [KH, KW, Cin, Cout] kernel.
    window_strides: (SH, SW), positive.
    padding: "SAME", "VALID" or ((top, bottom), (left, right)), each side >= 0.
    lhs_dilation: None or all ones.
    rhs_dilation: None or all ones.
    dimension_numbers: NHWC / HWIO / NHWC, as a `lax.ConvDimensionNumbers` (what `nn.Conv`
      passes) or ("NHWC", "HWIO", "NHWC").
    feature_group_count: 1.
    batch_group_count: 1.
    precision: as lax's.
    preferred_element_type: None or the input dtype.
    min_positions: layers with fewer output positions Ho * Wo keep lax's gradients (None:
      PER_TAP_MIN_POSITIONS; 0: every layer gets the per-tap ones, as the res5 RoI head's
      7 x 7 maps, which come in batches of RoIs).

  Returns:
    [B, Ho, Wo, Cout], equal to `lax.conv_general_dilated` with the same arguments (up to
    float rounding for 1x1 kernels without padding, which are `pointwise` matmuls whatever
    the map size). Otherwise its gradients are `conv_per_tap`'s when
    `uses_per_tap((Ho, Wo), min_positions)`, else lax's.

  Raises:
    ValueError: an argument this convolution does not support.
  """
  if lhs.ndim != 4 or rhs.ndim != 4:
    raise ValueError(f"per-tap conv: 2D convolutions only, got input {lhs.shape} and "
                     f"kernel {rhs.shape}")
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
    raise ValueError(f"per-tap conv: dimension_numbers must be NHWC / HWIO / NHWC, got "
                     f"{dimension_numbers}")
  strides = tuple(int(v) for v in window_strides)
  if len(strides) != 2 or any(v < 1 for v in strides):
    raise ValueError(f"per-tap conv: window_strides must be two positive ints, got "
                     f"{tuple(window_strides)}")
  _all_ones("lhs_dilation", lhs_dilation)
  _all_ones("rhs_dilation", rhs_dilation)
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError(f"per-tap conv: feature_group_count and batch_group_count must be 1, got "
                     f"{feature_group_count} and {batch_group_count}")
  if preferred_element_type is not None and jnp.dtype(preferred_element_type) != lhs.dtype:
    raise ValueError(f"per-tap conv: preferred_element_type must be None or the input dtype "
                     f"{lhs.dtype}, got {preferred_element_type}")
  if lhs.dtype != rhs.dtype:
    raise ValueError(f"per-tap conv: input and kernel dtypes differ ({lhs.dtype}, {rhs.dtype})")
  kernel_hw = rhs.shape[:2]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], kernel_hw, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
    raise ValueError(f"per-tap conv: padding must be two non-negative (lo, hi) pairs, got "
                     f"{padding}")
  if isinstance(precision, list):
    precision = tuple(precision)
  if tuple(kernel_hw) == (1, 1) and pads == ((0, 0), (0, 0)):
    return pointwise(lhs, rhs, precision, strides)
  out_hw = [(size + lo + hi - k) // s + 1
            for size, (lo, hi), k, s in zip(lhs.shape[1:3], pads, kernel_hw, strides)]
  if not uses_per_tap(out_hw, min_positions):
    return forward(lhs, rhs, pads, precision, strides)
  return conv_per_tap(lhs, rhs, pads, precision, strides)


def conv_function(conv_grad: str, min_positions: int | None = None) -> Any:
  """The `conv_general_dilated` for `nn.Conv` that computes gradients the `conv_grad` way.

  Args:
    conv_grad: "xla" (lax's own gradients) or "per_tap" (`conv_general_dilated` above).
    min_positions: `conv_general_dilated`'s.

  Returns:
    None (nn.Conv then uses lax.conv_general_dilated) or `conv_general_dilated`.

  Raises:
    ValueError: an unknown conv_grad.
  """
  if conv_grad not in CONV_GRADS:
    raise ValueError(f"conv_grad must be one of {CONV_GRADS}, got {conv_grad!r}")
  if conv_grad != "per_tap":
    return None
  return _per_tap_conv(min_positions)


@functools.cache
def _per_tap_conv(min_positions: int | None) -> Any:
  """One function object per threshold, so modules built twice compare (and hash) equal."""
  if min_positions is None:
    return conv_general_dilated
  return functools.partial(conv_general_dilated, min_positions=min_positions)
