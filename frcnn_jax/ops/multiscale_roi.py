"""Multi-scale RoIAlign for one image (FPN), equal to `torchvision.ops.MultiScaleRoIAlign`.

An FPN pools each RoI from one pyramid level, picked by its size (Lin et al. 2017, eq. 1):
level k = floor(k0 + log2(sqrt(area) / 224) + 1e-6), clamped to the pyramid's levels
(torchvision's `LevelMapper`). `roi_levels` is that mapping; `multiscale_roi_align` pools each
RoI with `frcnn_jax.ops.roi.roi_align` on its level. NHWC features of one image, `[R, 4]` xyxy
RoIs in image pixels, `[R, oh, ow, C]` out; lift to a batch with `jax.vmap`.

Formulations:
- The level is a count of area thresholds passed, sum_k (area >= T_k), with T_k the smallest
  float32 area that torchvision's float32 arithmetic maps to level >= k, found by bisection
  over float32 bit patterns at trace time. The floor makes the level jump where the float32
  pipeline crosses an integer, and a one-ulp change of log2 moves that point: XLA's log2
  (log(x) / log(2)) is an ulp off the correctly rounded one for ~30% of float32 inputs
  (torch's CPU log2 for ~3 in 100000), enough to put a few of the float32 areas just below
  each jump on the other level. The thresholds use a correctly rounded log2 (torch's CPU
  LevelMapper agrees on every area tried), need no transcendental function on the device and
  give the same levels on every backend.
- Forward: one gather pass. The levels' `[H_l * W_l, C]` tables are concatenated and each RoI's
  bilinear taps are computed with its level's (H, W, scale) and offset into the concatenation,
  so the fused row-gather loop of roi_align runs once over `[R, oh, ow, C]`, with roi_align's
  arithmetic: each output row is bit-identical to roi_align on the RoI's level (L roi_aligns
  selected afterwards would do L times the work).
- Gradient: per level, roi_align's dense transpose dF_l = Ay_l^T (dY_l) Ax_l with dY_l the
  cotangent's rows of the RoIs on level l (no XLA scatter; see ops/roi.py). It costs
  R * ow * C * H_l * (oh + W_l) multiply-adds per level, i.e. all R RoIs on every level (which
  RoIs sit on a level is data-dependent): ~4/3 of one dense roi_align gradient on the finest
  level, the same as autodiff of the L roi_aligns' selection.
"""

import functools
import itertools
import math
from collections.abc import Sequence
from numbers import Integral
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from frcnn_jax.ops import roi

Array = jax.Array

GRADIENTS = ("dense", "scatter")
LEVEL_EPS = 1e-6    # torchvision's LevelMapper eps (not exposed by MultiScaleRoIAlign either)
_F32 = np.float32


def _float32_level(area: np.float32, canonical_scale, canonical_level: int) -> float:
  """torchvision's LevelMapper before the clamp, in float32 with a correctly rounded log2."""
  q = np.sqrt(_F32(area)) / _F32(canonical_scale)
  log2 = _F32(math.log2(float(q))) if q > 0 else _F32(-np.inf)
  return math.floor((_F32(canonical_level) + log2) + _F32(LEVEL_EPS))


@functools.cache
def _area_thresholds(k_min: int, k_max: int, canonical_scale, canonical_level: int):
  """T_k for k in k_min+1..k_max: the smallest float32 area mapped to level >= k.

  The float32 pipeline is monotone in the area (so is every rounding step), so level >= k iff
  area >= T_k. Non-negative float32s order as their bit patterns: bisect those, 0 to +inf.
  """
  thresholds = []
  for k in range(k_min + 1, k_max + 1):
    lo, hi = 0, int(np.array(np.inf, _F32).view(np.int32))   # level(lo) < k <= level(hi)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      area = np.array(mid, np.int32).view(_F32)
      if _float32_level(area, canonical_scale, canonical_level) >= k:
        hi = mid
      else:
        lo = mid
    thresholds.append(float(np.array(hi, np.int32).view(_F32)))
  return tuple(thresholds)


def _check_rois(rois) -> Array:
  rois = jnp.asarray(rois)
  if rois.ndim != 2 or rois.shape[-1] != 4:
    raise ValueError(f"rois must be [R, 4] xyxy boxes (one image; use jax.vmap for a batch), "
                     f"got shape {rois.shape}.")
  return lax.stop_gradient(rois.astype(jnp.float32))


def _check_mapping(k_min, k_max, canonical_scale, canonical_level) -> None:
  if not all(isinstance(k, Integral) for k in (k_min, k_max, canonical_level)):
    raise ValueError(f"k_min, k_max and canonical_level must be ints, got {k_min!r}, "
                     f"{k_max!r}, {canonical_level!r}.")
  if k_min > k_max:
    raise ValueError(f"k_min must be <= k_max, got {k_min} > {k_max}.")
  if not isinstance(canonical_scale, Real) or not 0 < canonical_scale < math.inf:
    raise ValueError(f"canonical_scale must be a positive number, got {canonical_scale!r}.")


def _levels(rois: Array, k_min: int, k_max: int, canonical_scale, canonical_level: int):
  x1, y1, x2, y2 = (rois[:, k] for k in range(4))
  area = (x2 - x1) * (y2 - y1)     # torchvision's box_area, float32
  level = jnp.zeros(area.shape, jnp.int32)
  for t in _area_thresholds(int(k_min), int(k_max), canonical_scale, int(canonical_level)):
    level = level + (area >= _F32(t)).astype(jnp.int32)
  return level


def roi_levels(rois: Array, k_min: int, k_max: int, canonical_scale=224,
               canonical_level: int = 4) -> Array:
  """FPN level of each RoI, equal to torchvision's `LevelMapper` (eq. 1 of the FPN paper).

  level = clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6),
  k_min, k_max) - k_min with area = (x2 - x1) * (y2 - y1), in float32 arithmetic as torchvision
  (with a correctly rounded log2; torchvision's CPU kernel agreed on every area tried, other
  log2s can move an area within a few ulps of a level change by one level). A RoI whose
  sqrt(area) is canonical_scale * 2^j exactly lands on level canonical_level + j. An area of
  0 maps to k_min and +inf to k_max. A negative area (a RoI inverted along one axis) or a NaN
  coordinate maps to k_min: torchvision's mapper gives NaN there, which matches no level,
  so MultiScaleRoIAlign leaves such a RoI's row at 0 (its boxes must satisfy x1 < x2, y1 < y2).

  Args:
    rois: [R, 4] xyxy boxes in image pixels (NumPy or JAX; no gradient).
    k_min: static int, the finest pyramid level (2 for P2, stride 4).
    k_max: static int >= k_min, the coarsest level (5 for P5, stride 32).
    canonical_scale: static positive number: RoIs of sqrt(area) canonical_scale map to
      canonical_level.
    canonical_level: static int.

  Returns:
    int32 [R] in 0..k_max - k_min (an index into the pyramid, finest first).

  Raises:
    ValueError: rois not [R, 4]; non-int levels, k_min > k_max or a bad canonical_scale.
  """
  _check_mapping(k_min, k_max, canonical_scale, canonical_level)
  return _levels(_check_rois(rois), k_min, k_max, canonical_scale, canonical_level)


def _pick(level: Array, values, dtype) -> Array:
  """values[level] for a static per-level tuple, as selects (no gather to count or fuse)."""
  out = jnp.full(level.shape, values[0], dtype)
  for l, v in enumerate(values[1:], 1):
    out = jnp.where(level == l, jnp.asarray(v, dtype), out)
  return out


def _forward(features, rois, oh, ow, scales, s, aligned, canonical_scale, canonical_level):
  k_min = -round(math.log2(scales[0]))
  level = _levels(rois, k_min, k_min + len(scales) - 1, canonical_scale, canonical_level)
  hs = [f.shape[0] for f in features]
  ws = [f.shape[1] for f in features]
  offsets = np.cumsum([0] + [h * w for h, w in zip(hs, ws)])[:-1].tolist()
  h = _pick(level, hs, jnp.int32)[:, None, None]
  w = _pick(level, ws, jnp.int32)[:, None, None]
  scale = _pick(level, scales, jnp.float32)
  yi, yw, xi, xw = roi._align_taps(rois, h, w, oh, ow, scale, s, aligned)
  row = _pick(level, offsets, jnp.int32)[:, None, None] + yi * w     # [R, oh, 2s] table rows
  c = features[0].shape[-1]
  table = jnp.concatenate([f.reshape(-1, c).astype(jnp.float32) for f in features])
  terms = [(row[:, :, None, a] + xi[:, None, :, b], yw[:, :, None, a] * xw[:, None, :, b])
           for a in range(2 * s) for b in range(2 * s)]
  out = roi._gather_loop(table, terms).astype(features[0].dtype)
  return roi._nan_rows(out, rois), (yi, yw, xi, xw, level)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _multiscale(features, rois, oh, ow, scales, s, aligned, canonical_scale, canonical_level):
  return _forward(features, rois, oh, ow, scales, s, aligned, canonical_scale,
                  canonical_level)[0]


def _multiscale_fwd(features, rois, oh, ow, scales, s, aligned, canonical_scale,
                    canonical_level):
  out, taps = _forward(features, rois, oh, ow, scales, s, aligned, canonical_scale,
                       canonical_level)
  return out, (taps, features, rois)   # features: shapes and dtypes only


def _multiscale_bwd(oh, ow, scales, s, aligned, canonical_scale, canonical_level, res, g):
  del canonical_scale, canonical_level
  (yi, yw, xi, xw, level), features, rois = res
  grads = []
  for l, (f, scale) in enumerate(zip(features, scales)):
    # Rows within level l: taps of RoIs on other levels may point past H_l / W_l (one_hot
    # gives 0 there) or anywhere inside; their cotangent rows are zeroed, NaN included.
    g_l = jnp.where((level == l)[:, None, None, None], g, 0)
    grads.append(roi._roi_align_bwd(oh, ow, scale, s, aligned, ((yi, yw, xi, xw), f, rois),
                                    g_l)[0])
  return tuple(grads), jnp.zeros_like(rois)


_multiscale.defvjp(_multiscale_fwd, _multiscale_bwd)


def _check_scales(spatial_scales, num_levels: int) -> tuple[float, ...]:
  scales = tuple(spatial_scales)
  if len(scales) != num_levels:
    raise ValueError(f"spatial_scales must give one scale per feature level ({num_levels}), "
                     f"got {len(scales)}: {spatial_scales!r}.")
  for s in scales:
    if (not isinstance(s, Real) or isinstance(s, bool) or not 0 < s < math.inf
        or math.frexp(s)[0] != 0.5):
      raise ValueError(f"spatial_scales must be powers of 2 (1/4, 1/8, ...), got {s!r} in "
                       f"{spatial_scales!r}.")
  scales = tuple(float(s) for s in scales)
  if any(b != a / 2 for a, b in itertools.pairwise(scales)):
    raise ValueError(f"spatial_scales must halve from one level to the next, finest first "
                     f"(levels k_min..k_max, as torchvision's LevelMapper indexes them), got "
                     f"{spatial_scales!r}.")
  return scales


def multiscale_roi_align(features: Sequence[Array], rois: Array, output_size,
                         spatial_scales: Sequence[float], sampling_ratio: int = 2,
                         aligned: bool = False, canonical_scale=224,
                         canonical_level: int = 4, gradient: str = "dense") -> Array:
  """RoIAlign from an FPN pyramid, equal to `torchvision.ops.MultiScaleRoIAlign` on one image.

  RoI r is pooled by `roi.roi_align(features[l], rois[r], output_size, spatial_scales[l],
  sampling_ratio, aligned)` on its level l = `roi_levels(rois, k_min, k_max, canonical_scale,
  canonical_level)[r]`, k_min = -log2(spatial_scales[0]), k_max = -log2(spatial_scales[-1])
  (torchvision's MultiScaleRoIAlign(featmap_names, output_size, sampling_ratio) is
  aligned=False; it infers the scales from the feature and image sizes). The forward is one
  gather pass over the levels' concatenated maps; gradients flow to every level's features
  and equal autodiff of sum_l where(level == l, roi_align(features[l], ...), 0). A RoI with a
  non-finite coordinate gives a NaN row (and no gradient), as roi_align. A RoI of negative
  area is pooled on the finest level (see `roi_levels`; torchvision gives it a row of 0).

  Args:
    features: the pyramid, one [H_l, W_l, C] map per level (NHWC, one image), finest first;
      every level has the same C. NumPy or JAX arrays; the output has features[0]'s dtype.
    rois: [R, 4] xyxy boxes in image pixels (no gradient flows to them).
    output_size: int or (oh, ow), static.
    spatial_scales: static, one per level, feature cells per image pixel, finest first,
      powers of 2 halving from level to level (1/4, 1/8, 1/16, 1/32 for P2..P5).
    sampling_ratio: static int >= 1, samples per bin along each axis (torchvision's adaptive
      <= 0 mode has data-dependent sample counts).
    aligned: static; see `roi.roi_align`.
    canonical_scale: static, see `roi_levels`.
    canonical_level: static int, see `roi_levels`.
    gradient: static, how the features' gradient is computed (the same up to float
      rounding): "dense", per level the two matmuls of roi_align's backward (what matrix units
      want; costs all R RoIs on every level, ~R * ow * C * H * W per level), or "scatter",
      autodiff of the gather (a scatter-add of the R * oh * ow * (2s)^2 taps; the faster one
      on the CPU: benchmarks/RESULTS.md).

  Returns:
    [R, oh, ow, C] in features[0]'s dtype (accumulated in float32).

  Raises:
    TypeError: features is an array or not a sequence.
    ValueError: features empty or not [H, W, C] maps with one C; spatial_scales not one power
      of 2 per level, halving; rois not [R, 4]; a bad output_size, sampling_ratio, level
      mapping argument or gradient.
  """
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}.")
  if isinstance(features, (jax.Array, np.ndarray)) or not isinstance(features, Sequence):
    raise TypeError("features must be a sequence of [H, W, C] maps, one per level, got "
                    f"{type(features).__name__}.")
  features = tuple(jnp.asarray(f) for f in features)
  if not features:
    raise ValueError("features must hold at least one level.")
  for l, f in enumerate(features):
    if f.ndim != 3:
      raise ValueError(f"features[{l}] must be [H, W, C] (one image; use jax.vmap for a "
                       f"batch), got shape {f.shape}.")
  channels = [f.shape[-1] for f in features]
  if len(set(channels)) != 1:
    raise ValueError(f"every level must have the same number of channels, got {channels}.")
  scales = _check_scales(spatial_scales, len(features))
  oh, ow = roi._output_hw(output_size)
  if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
    raise ValueError(f"sampling_ratio must be an int >= 1 (the adaptive <= 0 mode has "
                     f"data-dependent sample counts), got {sampling_ratio!r}.")
  k_min = -round(math.log2(scales[0]))
  _check_mapping(k_min, k_min + len(scales) - 1, canonical_scale, canonical_level)
  rois = _check_rois(rois)
  args = (oh, ow, scales, sampling_ratio, bool(aligned), canonical_scale, int(canonical_level))
  if gradient == "scatter":
    return _forward(features, rois, *args)[0]
  return _multiscale(features, rois, *args)
