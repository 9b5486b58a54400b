"""RoI feature extraction for one image: RoI max pooling (Caffe) and RoIAlign (bilinear).

Both equal `torchvision.ops.roi_pool` / `torchvision.ops.roi_align` (float32 arithmetic in the
same order as torchvision's C++ CPU kernels), take NHWC features `[H, W, C]` of one image and
`[R, 4]` xyxy RoIs in image pixels, and return `[R, oh, ow, C]`; lift to a batch with
`jax.vmap`. `output_size`, `spatial_scale`, `sampling_ratio` and `aligned` are static. Gradients
flow to the features only (as in torchvision); a RoI with a non-finite coordinate gives NaN.
Features and RoIs may be NumPy or JAX arrays, inside or outside jit.

roi_pool's `coordinates="caffe"` rounds the RoI's inclusive end pixel (x2 - 1) instead of x2:
Caffe's ROIPoolingLayer (caffe-fast-rcnn) is torchvision's arithmetic on py-faster-rcnn's
inclusive pixel boxes, whose x2 is ours minus one (the VOC conversion of docs/conventions.md).

Formulations (chosen by timing the alternatives on XLA:CPU; scripts/bench_ops.py times the ops):
- Both ops end in one elementwise loop over `[R, oh, ow, C]` whose operands are a fixed number of
  row gathers of a `[N, C]` table (`table.at[idx].get()`): XLA fuses such gathers into the loop,
  so nothing of size `[R, oh, ow, K, C]` is materialised (gather-then-reduce would be).
- roi_align: the bilinear weights factor over y and x, so bin (ph, pw) is the sum of
  (2s) x (2s) weighted feature rows (s = sampling_ratio). Its gradient is the transpose written
  as two dense matmuls, dF = Ay^T (dY) Ax with Ay `[R, oh, H]`, Ax `[R, ow, W]` (exact, and what
  the MXU/tensor cores want; XLA's scatter is slower on CPU). The same dense form as the
  forward costs R*oh*H*W*C MACs (1.1 G for 128 RoIs on 38x63x512), far more than the gather
  form on CPU; on a TPU, where gathers are slow, it would be the better forward.
- roi_pool: max is idempotent, so a bin's maximum is the max of a few overlapping window maxima.
  A table holds, for window sizes (a^i rows) x (b^j columns), the window max at every position;
  a bin of L rows uses the largest window w <= L and ceil(L / w) windows per axis. The ratios
  a, b are picked statically from the shapes (small table vs. few lookups). The gradient goes to
  the first maximum in row-major order, as in torchvision's argmax.
"""

import functools
import math
from numbers import Real

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

ROI_POOL_COORDINATES = ("torchvision", "caffe")
_MAX_COORD = float(2**29)     # keeps int32 bin arithmetic from overflowing on absurd RoIs
_TABLE_BUDGET_BYTES = 24 * 2**20
_RATIOS = range(2, 9)


def _output_hw(output_size) -> tuple[int, int]:
  size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
  if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
    raise ValueError(f"output_size must be a positive int or (oh, ow), got {output_size!r}.")
  return size


def _check(features: Array, rois: Array, spatial_scale) -> Array:
  if features.ndim != 3:
    raise ValueError(f"features must be [H, W, C] (one image; use jax.vmap for a batch), "
                     f"got shape {features.shape}.")
  if rois.ndim != 2 or rois.shape[-1] != 4:
    raise ValueError(f"rois must be [R, 4] xyxy boxes, got shape {rois.shape}.")
  if not isinstance(spatial_scale, Real) or not 0 < spatial_scale < math.inf:
    raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale!r}.")
  return lax.stop_gradient(jnp.asarray(rois, jnp.float32))


def _div(x: Array, d) -> Array:
  """x / d rounded like IEEE division. XLA rewrites x / broadcast(d) as x * (1 / d), which is
  off by an ulp and moves floor/ceil bin edges (3 / 7 * 7 -> 3.0000002); a divisor that depends
  on x elementwise (the select, which changes nothing: NaN / 1 is NaN) is not a broadcast,
  also under vmap."""
  return x / jnp.where(jnp.isnan(x), 1.0, d).astype(x.dtype)


def _nan_rows(out: Array, rois: Array) -> Array:
  finite = jnp.all(jnp.isfinite(rois), axis=-1)
  return jnp.where(finite[:, None, None, None], out, jnp.nan).astype(out.dtype)


def _gather_loop(table: Array, terms) -> Array:
  """sum_k w_k * table[i_k] (or max_k when a weight is None) as one fused elementwise loop."""
  acc = None
  for idx, w in terms:
    row = table.at[idx].get(mode="clip")
    if w is None:
      acc = row if acc is None else jnp.maximum(acc, row)
    else:
      row = w[..., None] * row
      acc = row if acc is None else acc + row
  return acc


def _axis_samples(start: Array, length: Array, n: int, s: int, size: int):
  """Bilinear taps along one axis: idx, w [R, n, 2s] (w already divided by s)."""
  bin_size = _div(length, n)[:, None, None]
  p = jnp.arange(n, dtype=jnp.float32)[:, None]
  i = jnp.arange(s, dtype=jnp.float32) + 0.5
  y = (start[:, None, None] + p * bin_size) + _div(i * bin_size, s)
  inside = (y >= -1.0) & (y <= size)
  y = jnp.maximum(y, 0.0)
  low = jnp.minimum(jnp.floor(y), size - 1).astype(jnp.int32)
  snap = low >= size - 1
  high = jnp.where(snap, low, low + 1)
  frac = jnp.where(snap, 0.0, y - low)
  scale = jnp.where(inside, 1.0 / s, 0.0)
  return (jnp.concatenate([low, high], -1),
          jnp.concatenate([(1.0 - frac) * scale, frac * scale], -1))


def _align_taps(rois, h, w, oh, ow, spatial_scale, s, aligned):
  offset = 0.5 if aligned else 0.0
  rois = jnp.nan_to_num(jnp.clip(rois, -_MAX_COORD, _MAX_COORD))
  x1, y1, x2, y2 = [rois[:, k] * spatial_scale - offset for k in range(4)]
  rw, rh = x2 - x1, y2 - y1
  if not aligned:
    rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
  return _axis_samples(y1, rh, oh, s, h) + _axis_samples(x1, rw, ow, s, w)


def _align_forward(features, rois, oh, ow, spatial_scale, s, aligned):
  h, w, c = features.shape
  yi, yw, xi, xw = _align_taps(rois, h, w, oh, ow, spatial_scale, s, aligned)
  table = features.reshape(h * w, c)
  terms = [(yi[:, :, None, a] * w + xi[:, None, :, b], yw[:, :, None, a] * xw[:, None, :, b])
           for a in range(2 * s) for b in range(2 * s)]
  out = _gather_loop(table.astype(jnp.float32), terms).astype(features.dtype)
  return _nan_rows(out, rois), (yi, yw, xi, xw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _roi_align(features, rois, oh, ow, spatial_scale, s, aligned):
  return _align_forward(features, rois, oh, ow, spatial_scale, s, aligned)[0]


def _roi_align_fwd(features, rois, oh, ow, spatial_scale, s, aligned):
  out, taps = _align_forward(features, rois, oh, ow, spatial_scale, s, aligned)
  return out, (taps, features, rois)   # features: shape and dtype only


def _roi_align_bwd(oh, ow, spatial_scale, s, aligned, res, g):
  (yi, yw, xi, xw), features, rois = res
  h, w, _ = features.shape
  ay = jnp.einsum("rpak,rpa->rpk", jax.nn.one_hot(yi, h, dtype=jnp.float32), yw)
  ax = jnp.einsum("rqbk,rqb->rqk", jax.nn.one_hot(xi, w, dtype=jnp.float32), xw)
  g = jnp.where(jnp.all(jnp.isfinite(rois), -1)[:, None, None, None], g, 0).astype(jnp.float32)
  hi = lax.Precision.HIGHEST
  t = jnp.einsum("rph,rpqc->rhqc", ay, g, precision=hi)
  grad = jnp.einsum("rqw,rhqc->hwc", ax, t, precision=hi)
  return grad.astype(features.dtype), jnp.zeros_like(rois)


_roi_align.defvjp(_roi_align_fwd, _roi_align_bwd)


def roi_align(features: Array, rois: Array, output_size, spatial_scale: float,
              sampling_ratio: int = 2, aligned: bool = False) -> Array:
  """RoIAlign (He et al. 2017), equal to `torchvision.ops.roi_align` on one image.

  Each of the oh x ow bins averages sampling_ratio^2 bilinear samples on a regular grid.
  Samples with y < -1 or y > H (x likewise) count as 0; coordinates below 0 clamp to 0 and
  samples at or beyond the last row/column use it. torchvision's adaptive mode
  (sampling_ratio <= 0: ceil(roi size / output size) samples, a data-dependent count) cannot
  have a static shape and is rejected.

  Args:
    features: [H, W, C] feature map (NHWC, one image).
    rois: [R, 4] xyxy boxes in image pixels (no gradient flows to them).
    output_size: int or (oh, ow), static.
    spatial_scale: feature cells per image pixel (1/16 for VGG16 conv5), static.
    sampling_ratio: static int >= 1, samples per bin along each axis.
    aligned: static; True shifts the RoI by -0.5 cell (pixel-centre convention) and lets RoIs
      be smaller than one cell; False (the original RoIAlign) clamps RoI sizes to >= 1 cell.

  Returns:
    [R, oh, ow, C] in the features' dtype (accumulated in float32).
  """
  oh, ow = _output_hw(output_size)
  if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
    raise ValueError(f"sampling_ratio must be an int >= 1 (the adaptive <= 0 mode has "
                     f"data-dependent sample counts), got {sampling_ratio!r}.")
  features = jnp.asarray(features)
  rois = _check(features, jnp.asarray(rois), spatial_scale)
  return _roi_align(features, rois, oh, ow, float(spatial_scale), sampling_ratio, bool(aligned))


def _windows(size: int, ratio: int) -> tuple[int, ...]:
  wins = [1]
  while wins[-1] * ratio <= size:
    wins.append(wins[-1] * ratio)
  return tuple(wins)


def _lookups(size: int, wins: tuple[int, ...]) -> int:
  """Windows needed per axis: a range of L cells uses the largest window w <= L, ceil(L / w)."""
  ends = [min(nxt - 1, size) for nxt in wins[1:] + (size + 1,)]
  return max(-(-end // w) for w, end in zip(wins, ends))


def _choose_ratios(h: int, w: int, c: int, itemsize: int, bins: int) -> tuple[int, int]:
  """Window ratios minimising a cost model measured on XLA:CPU: a table cell costs 4 lookups,
  17x that beyond ~24 MiB (where the table stops fitting a 32 MiB L3 and the build slows)."""
  budget = _TABLE_BUDGET_BYTES // (c * itemsize)
  best = None
  for a in _RATIOS:
    for b in _RATIOS:
      wh, ww = _windows(h, a), _windows(w, b)
      cells = sum(h - x + 1 for x in wh) * sum(w - y + 1 for y in ww)
      cost = 4 * cells + 64 * max(cells - budget, 0) + bins * _lookups(h, wh) * _lookups(w, ww)
      best = min(best or (cost, (a, b)), (cost, (a, b)))
  return best[1]


def _window_max(x, axis, step: int, ratio: int, n: int):
  """Windows of `step * ratio` cells from windows of `step` cells: (value, index or None)."""
  val, idx = x
  out_v = out_i = None
  for i in range(ratio):
    v = lax.slice_in_dim(val, i * step, i * step + n, axis=axis)
    k = None if idx is None else lax.slice_in_dim(idx, i * step, i * step + n, axis=axis)
    if out_v is not None and k is not None:   # first maximum in row-major order (torchvision)
      k = jnp.where((v > out_v) | ((v == out_v) & (k < out_i)), k, out_i)
    out_v, out_i = (v, k) if out_v is None else (jnp.maximum(out_v, v), k)
  return out_v, out_i


def _window_table(features: Array, wh, ww, with_index: bool):
  """Window maxima for every (row window, column window) pair, stacked: [T, C] (and argmax)."""
  h, w, c = features.shape
  idx = None
  if with_index:
    idx = jnp.broadcast_to(jnp.arange(h * w, dtype=jnp.int32).reshape(h, w, 1), (h, w, c))
  rows = (features, idx)
  vals, idxs, offsets = [], [], []
  for k, wy in enumerate(wh):
    if k:
      rows = _window_max(rows, 0, wh[k - 1], wy // wh[k - 1], h - wy + 1)
    cols = rows
    offsets.append([])
    for l, wx in enumerate(ww):
      if l:
        cols = _window_max(cols, 1, ww[l - 1], wx // ww[l - 1], w - wx + 1)
      offsets[-1].append(sum(v.shape[0] for v in vals))
      vals.append(cols[0].reshape(-1, c))
      if with_index:
        idxs.append(cols[1].reshape(-1, c))
  table = jnp.concatenate(vals)
  return table, (jnp.concatenate(idxs) if with_index else None), jnp.asarray(offsets, jnp.int32)


def _pool_bins(start: Array, end: Array, n: int, size: int):
  """Caffe bins [lo, hi) along one axis: [R, n] each, clipped to [0, size]."""
  length = jnp.maximum(end - start + 1, 1)
  bin_size = _div(length.astype(jnp.float32), n)[:, None]
  p = jnp.arange(n, dtype=jnp.float32)
  lo = jnp.floor(p * bin_size).astype(jnp.int32) + start[:, None]
  hi = jnp.ceil((p + 1) * bin_size).astype(jnp.int32) + start[:, None]
  return jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)


def _cover(lo: Array, hi: Array, wins, m: int):
  """Level and the m window starts covering each range [lo, hi) (repeats when fewer needed)."""
  wins = jnp.asarray(wins, jnp.int32)
  level = jnp.sum(jnp.maximum(hi - lo, 1)[..., None] >= wins, -1) - 1
  size = wins[level]
  return level, [jnp.maximum(jnp.minimum(lo + i * size, hi - size), 0) for i in range(m)]


def _round(x: Array) -> Array:
  """std::round: half away from zero (jnp.round rounds half to even)."""
  t = jnp.trunc(x)
  return jnp.where(jnp.abs(x - t) >= 0.5, t + jnp.sign(x), t).astype(jnp.int32)


def _pool_forward(features, rois, oh, ow, spatial_scale, coordinates, ratios, with_index):
  h, w, c = features.shape
  wh, ww = _windows(h, ratios[0]), _windows(w, ratios[1])
  table, index, offsets = _window_table(features, wh, ww, with_index)
  q = jnp.nan_to_num(jnp.clip(rois, -_MAX_COORD, _MAX_COORD))
  if coordinates == "caffe":    # the inclusive end pixel, x2 - 1
    q = q - jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32)
  q = _round(q * spatial_scale)
  hs, he = _pool_bins(q[:, 1], q[:, 3], oh, h)
  ws, we = _pool_bins(q[:, 0], q[:, 2], ow, w)
  ky, ys = _cover(hs, he, wh, _lookups(h, wh))
  kx, xs = _cover(ws, we, ww, _lookups(w, ww))
  base = offsets[ky[:, :, None], kx[:, None, :]]
  stride = (w + 1 - jnp.asarray(ww, jnp.int32))[kx][:, None, :]
  empty = ((he <= hs)[:, :, None] | (we <= ws)[:, None, :])[..., None]
  flat = [base + y[:, :, None] * stride + x[:, None, :] for y in ys for x in xs]
  best = _gather_loop(table, [(i, None) for i in flat])
  out = _nan_rows(jnp.where(empty, 0, best).astype(features.dtype), rois)
  if not with_index:
    return out, None
  # The first maximum in row-major order is the smallest window argmax among windows at max
  # (the barrier stops XLA from recomputing `best` inside this loop for every window).
  best = lax.optimization_barrier(best)
  argmax = jnp.full(best.shape, h * w, jnp.int32)
  for i in flat:
    k = index.at[i].get(mode="clip")
    argmax = jnp.where((table.at[i].get(mode="clip") == best) & (k < argmax), k, argmax)
  dead = empty | ~jnp.all(jnp.isfinite(rois), -1)[:, None, None, None]
  return out, jnp.where(dead, h * w, argmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _roi_pool(features, rois, oh, ow, spatial_scale, coordinates, ratios):
  return _pool_forward(features, rois, oh, ow, spatial_scale, coordinates, ratios, False)[0]


def _roi_pool_fwd(features, rois, oh, ow, spatial_scale, coordinates, ratios):
  out, argmax = _pool_forward(features, rois, oh, ow, spatial_scale, coordinates, ratios, True)
  return out, (argmax, features, rois)   # features: shape and dtype only


def _roi_pool_bwd(oh, ow, spatial_scale, coordinates, ratios, res, g):
  del coordinates
  argmax, features, rois = res
  h, w, c = features.shape
  channel = jnp.broadcast_to(jnp.arange(c), argmax.shape)
  grad = jnp.zeros((h * w, c), g.dtype).at[argmax, channel].add(g, mode="drop")
  return grad.reshape(h, w, c).astype(features.dtype), jnp.zeros_like(rois)


_roi_pool.defvjp(_roi_pool_fwd, _roi_pool_bwd)


def roi_pool(features: Array, rois: Array, output_size, spatial_scale: float,
             coordinates: str = "torchvision") -> Array:
  """RoI max pooling (Fast R-CNN / Caffe), equal to `torchvision.ops.roi_pool` on one image.

  RoI corners are scaled and rounded (half away from zero) to cells; the RoI spans
  max(x2 - x1 + 1, 1) cells (x1, x2 the rounded cells, both included); bin b covers
  [floor(b * size), ceil((b + 1) * size)) + start, clipped to the map; an empty bin gives 0. The gradient goes to the first maximum of each bin
  and channel in row-major order (torchvision's argmax). NaN features propagate (torchvision
  skips them).

  Args:
    features: [H, W, C] feature map (NHWC, one image).
    rois: [R, 4] xyxy boxes in image pixels (no gradient flows to them).
    output_size: int or (oh, ow), static.
    spatial_scale: feature cells per image pixel (1/16 for VGG16 conv5), static.
    coordinates: static; which numbers are rounded to cells. "torchvision": the box as given,
      round(x1 * scale) .. round(x2 * scale) (torchvision, and Caffe's layer fed the same
      numbers). "caffe": the box's inclusive pixels, round(x1 * scale) ..
      round((x2 - 1) * scale), i.e. Caffe's ROIPoolingLayer fed the box in py-faster-rcnn's
      inclusive pixel convention (x2_incl = x2 - 1, docs/conventions.md); y alike.

  Returns:
    [R, oh, ow, C] in the features' dtype.
  """
  oh, ow = _output_hw(output_size)
  if coordinates not in ROI_POOL_COORDINATES:
    raise ValueError(f"coordinates must be one of {ROI_POOL_COORDINATES}, got {coordinates!r}.")
  features = jnp.asarray(features)
  rois = _check(features, jnp.asarray(rois), spatial_scale)
  h, w, c = features.shape
  ratios = _choose_ratios(h, w, c, jnp.dtype(features.dtype).itemsize, rois.shape[0] * oh * ow)
  return _roi_pool(features, rois, oh, ow, float(spatial_scale), coordinates, ratios)
