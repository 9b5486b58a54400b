"""Tests for frcnn_jax.ops.roi against NumPy loop ports of torchvision's C++ CPU kernels."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import roi

F32 = np.float32

# Jitted entry points (static configuration), so each test compiles once instead of
# dispatching every primitive eagerly.
align = jax.jit(roi.roi_align, static_argnums=(2, 3, 4, 5))
pool = jax.jit(roi.roi_pool, static_argnums=(2, 3))


# ------------------------------------------------------------------ NumPy loop references
# Line by line after torchvision/csrc/ops/cpu/roi_align_kernel.cpp and roi_pool_kernel.cpp
# (roi_align_forward_kernel_impl, roi_pool_forward_kernel_impl), float32 scalars throughout,
# features [H, W, C] instead of NCHW. Each returns the output and, for the gradient, the taps.


def _bilinear_taps(h, w, y, x):
  """torchvision's bilinear_interpolate / pre_calc: [(row, col, weight)] of one sample."""
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return []
  y, x = max(y, F32(0)), max(x, F32(0))
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = F32(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = F32(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - F32(y_low), x - F32(x_low)
  hy, hx = F32(1) - ly, F32(1) - lx
  return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx),
          (y_high, x_high, ly * lx)]


def ref_roi_align(features, rois, oh, ow, scale, sampling_ratio, aligned):
  """Returns out [R, oh, ow, C] and taps[r][ph][pw] = [(row, col, weight / count)]."""
  f = np.asarray(features, F32)
  h, w, c = f.shape
  out = np.zeros((len(rois), oh, ow, c), F32)
  taps = []
  offset = F32(0.5) if aligned else F32(0)
  for r, (x1, y1, x2, y2) in enumerate(np.asarray(rois, F32)):
    start_w, start_h = x1 * F32(scale) - offset, y1 * F32(scale) - offset
    end_w, end_h = x2 * F32(scale) - offset, y2 * F32(scale) - offset
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:
      roi_w, roi_h = max(roi_w, F32(1)), max(roi_h, F32(1))
    bin_h, bin_w = roi_h / F32(oh), roi_w / F32(ow)
    grid = sampling_ratio
    count = F32(max(grid * grid, 1))
    taps.append([])
    for ph in range(oh):
      taps[-1].append([])
      for pw in range(ow):
        val = np.zeros(c, F32)
        bin_taps = []
        for iy in range(grid):
          y = start_h + F32(ph) * bin_h + F32(iy + 0.5) * bin_h / F32(grid)
          for ix in range(grid):
            x = start_w + F32(pw) * bin_w + F32(ix + 0.5) * bin_w / F32(grid)
            for row, col, wt in _bilinear_taps(h, w, y, x):
              val += wt * f[row, col]
              bin_taps.append((row, col, wt / count))
        out[r, ph, pw] = val / count
        taps[-1][-1].append(bin_taps)
  return out, taps


def _std_round(v):
  return int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))


def ref_roi_pool(features, rois, oh, ow, scale):
  """Returns out [R, oh, ow, C] and argmax [R, oh, ow, C] (flat h * W + w, -1 if empty)."""
  f = np.asarray(features, F32)
  h, w, c = f.shape
  out = np.zeros((len(rois), oh, ow, c), F32)
  argmax = np.full((len(rois), oh, ow, c), -1, np.int64)
  for r, (x1, y1, x2, y2) in enumerate(np.asarray(rois, F32)):
    start_w, start_h = _std_round(x1 * F32(scale)), _std_round(y1 * F32(scale))
    end_w, end_h = _std_round(x2 * F32(scale)), _std_round(y2 * F32(scale))
    roi_w, roi_h = max(end_w - start_w + 1, 1), max(end_h - start_h + 1, 1)
    bin_h, bin_w = F32(roi_h) / F32(oh), F32(roi_w) / F32(ow)
    for ph in range(oh):
      hstart = min(max(int(np.floor(F32(ph) * bin_h)) + start_h, 0), h)
      hend = min(max(int(np.ceil(F32(ph + 1) * bin_h)) + start_h, 0), h)
      for pw in range(ow):
        wstart = min(max(int(np.floor(F32(pw) * bin_w)) + start_w, 0), w)
        wend = min(max(int(np.ceil(F32(pw + 1) * bin_w)) + start_w, 0), w)
        if hend <= hstart or wend <= wstart:
          continue
        for ch in range(c):
          maxval, maxidx = -np.finfo(F32).max, -1
          for yy in range(hstart, hend):
            for xx in range(wstart, wend):
              if f[yy, xx, ch] > maxval:
                maxval, maxidx = f[yy, xx, ch], yy * w + xx
          out[r, ph, pw, ch], argmax[r, ph, pw, ch] = maxval, maxidx
  return out, argmax


def ref_caffe_roi_pool(features, rois, oh, ow, scale):
  """Line by line after caffe-fast-rcnn's ROIPoolingLayer::Forward_cpu (one image, float32).

  `rois` are py-faster-rcnn's [x1, y1, x2, y2] inclusive pixel boxes (no batch index).
  """
  f = np.asarray(features, F32)
  height, width, channels = f.shape
  top = np.full((len(rois), oh, ow, channels), -np.finfo(F32).max, F32)
  for n, roi_ in enumerate(np.asarray(rois, F32)):
    roi_start_w = _std_round(roi_[0] * F32(scale))
    roi_start_h = _std_round(roi_[1] * F32(scale))
    roi_end_w = _std_round(roi_[2] * F32(scale))
    roi_end_h = _std_round(roi_[3] * F32(scale))
    roi_height = max(roi_end_h - roi_start_h + 1, 1)
    roi_width = max(roi_end_w - roi_start_w + 1, 1)
    bin_size_h = F32(roi_height) / F32(oh)
    bin_size_w = F32(roi_width) / F32(ow)
    for c in range(channels):
      for ph in range(oh):
        for pw in range(ow):
          hstart = int(np.floor(F32(ph) * bin_size_h))
          wstart = int(np.floor(F32(pw) * bin_size_w))
          hend = int(np.ceil(F32(ph + 1) * bin_size_h))
          wend = int(np.ceil(F32(pw + 1) * bin_size_w))
          hstart = min(max(hstart + roi_start_h, 0), height)
          hend = min(max(hend + roi_start_h, 0), height)
          wstart = min(max(wstart + roi_start_w, 0), width)
          wend = min(max(wend + roi_start_w, 0), width)
          is_empty = (hend <= hstart) or (wend <= wstart)
          if is_empty:
            top[n, ph, pw, c] = 0
          for hh in range(hstart, hend):
            for ww in range(wstart, wend):
              if f[hh, ww, c] > top[n, ph, pw, c]:
                top[n, ph, pw, c] = f[hh, ww, c]
  return top


# ------------------------------------------------------------------------------- inputs


def random_rois(rng, n, img_h, img_w):
  """xyxy RoIs in image pixels: inside, partly/wholly outside, tiny, zero-size, inverted."""
  cx = rng.uniform(-0.3, 1.3, n) * img_w
  cy = rng.uniform(-0.3, 1.3, n) * img_h
  bw = np.exp(rng.uniform(np.log(0.5), np.log(1.5 * img_w), n))
  bh = np.exp(rng.uniform(np.log(0.5), np.log(1.5 * img_h), n))
  boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
  kind = rng.integers(0, 8, n)
  boxes[kind == 0, 2:] = boxes[kind == 0, :2]                      # zero size
  boxes[kind == 1, 2:] = boxes[kind == 1, :2] + rng.uniform(0, 3, (np.sum(kind == 1), 2))
  boxes[kind == 2] = boxes[kind == 2][:, [2, 3, 0, 1]]             # inverted
  boxes[kind == 3] = np.round(boxes[kind == 3] / 8) * 8            # on the cell grid
  return boxes.astype(F32)


def random_features(rng, h, w, c):
  return rng.standard_normal((h, w, c)).astype(F32)


# ---------------------------------------------------------------------------------- align

ALIGN_CASES = [  # (sampling_ratio, aligned, spatial_scale, output_size)
    (1, False, 1 / 16, 7), (2, False, 1 / 16, (2, 3)), (3, False, 1 / 8, (3, 5)),
    (4, False, 1 / 8, 1), (1, True, 1 / 8, (5, 2)), (2, True, 1 / 16, 7),
    (3, True, 1 / 16, (4, 4)), (4, True, 1 / 8, (2, 3)),
]


@pytest.mark.parametrize("sampling_ratio,aligned,scale,output_size", ALIGN_CASES)
def test_roi_align_matches_reference(sampling_ratio, aligned, scale, output_size):
  rng = np.random.default_rng(sampling_ratio * 10 + aligned)
  h, w, c = 9, 12, 3
  feats = random_features(rng, h, w, c)
  rois = random_rois(rng, 150, h / scale, w / scale)
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  want, _ = ref_roi_align(feats, rois, oh, ow, scale, sampling_ratio, aligned)
  got = align(jnp.asarray(feats), jnp.asarray(rois), output_size, scale,
                      sampling_ratio, aligned)
  assert got.shape == (len(rois), oh, ow, c)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_roi_align_constant_map():
  feats = jnp.full((10, 14, 2), 3.5, jnp.float32)
  inside = jnp.array([[16.0, 16.0, 150.0, 120.0], [0.0, 0.0, 13 * 16.0, 9 * 16.0]])
  out = align(feats, inside, 4, 1 / 16)
  np.testing.assert_allclose(np.asarray(out), 3.5, rtol=1e-6)
  outside = jnp.array([[-400.0, -400.0, -100.0, -100.0], [500.0, 500.0, 900.0, 900.0]])
  np.testing.assert_array_equal(np.asarray(align(feats, outside, 3, 1 / 16)), 0.0)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_linear_ramp_closed_form(aligned):
  # Bilinear interpolation is exact on F = a*y + b*x + d, so a bin is the ramp at the mean of
  # its samples: y = start + (p + 0.5) * bin (samples inside [0, H-1] x [0, W-1]).
  h, w, a, b, d = 12, 16, 0.75, -0.5, 2.0
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  feats = jnp.asarray((a * yy + b * xx + d)[..., None], jnp.float32)
  box = np.array([40.0, 24.0, 112.0, 88.0])  # cells [5, 14] x [3, 11]: samples inside
  oh, ow, off = 4, 5, 0.5 if aligned else 0.0
  x1, y1, x2, y2 = box / 8 - off
  ys = y1 + (np.arange(oh) + 0.5) * (y2 - y1) / oh
  xs = x1 + (np.arange(ow) + 0.5) * (x2 - x1) / ow
  want = a * ys[:, None] + b * xs[None, :] + d
  for s in (1, 2, 3):
    out = align(feats, jnp.asarray(box[None]), (oh, ow), 1 / 8, s, aligned)
    np.testing.assert_allclose(np.asarray(out)[0, ..., 0], want, rtol=1e-5, atol=1e-5)


def test_roi_align_hand_computed_sample():
  # One bin, one sample at the RoI centre (2.25, 1.5): bilinear of the 2x2 block.
  feats = jnp.arange(20.0).reshape(4, 5, 1)   # F[y, x] = 5y + x
  out = align(feats, jnp.array([[1.0, 2.0, 2.0, 2.5]]), 1, 1.0, 1, True)
  # aligned: y = 2.25 - 0.5 = 1.75, x = 1.5 - 0.5 = 1.0 -> 5 * 1.75 + 1.0 = 9.75
  np.testing.assert_allclose(float(out[0, 0, 0, 0]), 9.75, rtol=1e-6)
  # A sample at or beyond the last row uses it: y = 3.6 - 0.5 = 3.1 >= H - 1 -> F[3, x].
  out = align(feats, jnp.array([[0.0, 3.6, 2.0, 3.6]]), 1, 1.0, 1, True)
  np.testing.assert_allclose(float(out[0, 0, 0, 0]), 15.0 + 0.5, rtol=1e-6)


def test_roi_align_gradient_is_the_bilinear_weights():
  rng = np.random.default_rng(7)
  h, w, c = 7, 9, 2
  feats = random_features(rng, h, w, c)
  rois = random_rois(rng, 40, h * 8, w * 8)
  cot = rng.standard_normal((40, 3, 2, c)).astype(F32)
  _, taps = ref_roi_align(feats, rois, 3, 2, 1 / 8, 2, False)
  want = np.zeros_like(feats)
  for r, rows in enumerate(taps):
    for ph, cols in enumerate(rows):
      for pw, bin_taps in enumerate(cols):
        for yy, xx, wt in bin_taps:
          want[yy, xx] += wt * cot[r, ph, pw]
  loss = lambda f: jnp.sum(align(f, jnp.asarray(rois), (3, 2), 1 / 8) * cot)
  grad = jax.jit(jax.grad(loss))(jnp.asarray(feats))
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-5)
  # Finite differences along a random direction (the op is linear in the features).
  v = rng.standard_normal(feats.shape).astype(F32)
  fd = (loss(feats + 1e-2 * v) - loss(feats - 1e-2 * v)) / 2e-2
  np.testing.assert_allclose(float(fd), float(np.sum(grad * v)), rtol=2e-3, atol=2e-3)
  assert not np.any(np.asarray(jax.grad(
      lambda b: jnp.sum(align(jnp.asarray(feats), b, 2, 1 / 8)))(jnp.asarray(rois))))


# ----------------------------------------------------------------------------------- pool

POOL_CASES = [(1 / 16, 7), (1 / 16, (2, 3)), (1 / 8, (3, 5)), (1 / 8, 1), (1 / 8, (6, 4))]


@pytest.mark.parametrize("scale,output_size", POOL_CASES)
def test_roi_pool_matches_reference(scale, output_size):
  rng = np.random.default_rng(int(1 / scale) + 3)
  h, w, c = 11, 13, 3
  feats = random_features(rng, h, w, c)
  rois = random_rois(rng, 150, h / scale, w / scale)
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  want, _ = ref_roi_pool(feats, rois, oh, ow, scale)
  got = pool(jnp.asarray(feats), jnp.asarray(rois), output_size, scale)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("ratios", [(2, 2), (3, 5), (8, 8), (4, 7)])
def test_roi_pool_window_levels_all_exact(ratios):
  # Every table layout (window ratios) must give the same exact answer, incl. big bins.
  rng = np.random.default_rng(sum(ratios))
  h, w, c = 23, 29, 2
  feats = random_features(rng, h, w, c)
  rois = random_rois(rng, 60, h * 4, w * 4)
  want, _ = ref_roi_pool(feats, rois, 3, 2, 1 / 4)
  got = jax.jit(roi._roi_pool, static_argnums=(2, 3, 4, 5, 6))(
      jnp.asarray(feats), jnp.asarray(rois), 3, 2, 0.25, "torchvision", ratios)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_roi_pool_hand_computed():
  feats = jnp.arange(36.0).reshape(6, 6, 1)   # increasing row-major: bin max = bottom-right
  # Cells 0..5 (x2 = 5 -> +1 width = 6), 3x3 output: 2x2 bins.
  out = pool(feats, jnp.array([[0.0, 0.0, 5.0, 5.0]]), 3, 1.0)
  np.testing.assert_array_equal(np.asarray(out)[0, ..., 0], [[7, 9, 11], [19, 21, 23],
                                                             [31, 33, 35]])
  # Width 3 into 2 bins: bin size 1.5 -> [0, 2) and [1, 3) overlap; rounding 1.5 -> 2.
  out = pool(feats, jnp.array([[1.5, 0.4, 3.6, 0.4]]), (1, 2), 1.0)
  np.testing.assert_array_equal(np.asarray(out)[0, 0, :, 0], [3, 4])
  # Wholly outside: every bin empty -> 0.
  out = pool(feats, jnp.array([[10.0, 10.0, 20.0, 20.0]]), 2, 1.0)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("scale,output_size", [(1 / 16, 7), (1 / 8, (3, 5)), (1.0, (2, 3))])
def test_roi_pool_coordinates_match_caffe_layer(scale, output_size):
  rng = np.random.default_rng(int(1 / scale) + 17)
  h, w, c = 11, 13, 2
  feats = random_features(rng, h, w, c)
  rois = random_rois(rng, 120, h / scale, w / scale)
  rois[::3] = np.round(rois[::3])     # integer pixels: x2 - 1 lands on rounding edges
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  caffe_pool = jax.jit(roi.roi_pool, static_argnums=(2, 3, 4))
  inclusive = rois - np.array([0, 0, 1, 1], F32)     # py-faster-rcnn's x2_incl = x2 - 1
  got = caffe_pool(jnp.asarray(feats), jnp.asarray(rois), output_size, scale, "caffe")
  np.testing.assert_array_equal(np.asarray(got),
                                ref_caffe_roi_pool(feats, inclusive, oh, ow, scale))
  # The default rounds the numbers as given: Caffe's layer fed the same numbers.
  got = caffe_pool(jnp.asarray(feats), jnp.asarray(rois), output_size, scale, "torchvision")
  np.testing.assert_array_equal(np.asarray(got), ref_caffe_roi_pool(feats, rois, oh, ow, scale))


def test_roi_pool_caffe_coordinates_by_hand():
  feats = jnp.arange(64.0).reshape(8, 8, 1)   # cell (row, col) holds 8 * row + col
  # At 1/8, x2 = 24: torchvision rounds 24 / 8 = 3, Caffe the last pixel 23 / 8 = 2.875 -> 3;
  # x2 = 20: 2.5 -> 3 vs 19 / 8 = 2.375 -> 2; y2 = 12: 1.5 -> 2 vs 11 / 8 = 1.375 -> 1.
  # One bin: the maximum is the bottom-right cell of the rounded RoI.
  for x2, y2, tv, caffe in ((24.0, 12.0, (2, 3), (1, 3)), (20.0, 12.0, (2, 3), (1, 2))):
    box = jnp.array([[0.0, 0.0, x2, y2]])
    for mode, (row, col) in (("torchvision", tv), ("caffe", caffe)):
      out = roi.roi_pool(feats, box, (1, 1), 1 / 8, coordinates=mode)
      assert float(out[0, 0, 0, 0]) == 8 * row + col, (x2, mode)
  with pytest.raises(ValueError, match="coordinates"):
    roi.roi_pool(feats, jnp.zeros((1, 4)), 2, 1.0, coordinates="inclusive")


def test_roi_pool_gradient_goes_to_first_argmax():
  rng = np.random.default_rng(11)
  h, w, c = 8, 10, 3
  feats = rng.integers(0, 4, (h, w, c)).astype(F32)   # many ties
  rois = random_rois(rng, 50, h * 8, w * 8)
  cot = rng.standard_normal((50, 3, 4, c)).astype(F32)
  _, argmax = ref_roi_pool(feats, rois, 3, 4, 1 / 8)
  want = np.zeros((h * w, c), F32)
  for idx in np.ndindex(argmax.shape):
    if argmax[idx] >= 0:
      want[argmax[idx], idx[-1]] += cot[idx]
  loss = lambda f: jnp.sum(pool(f, jnp.asarray(rois), (3, 4), 1 / 8) * cot)
  grad = jax.jit(jax.grad(loss))(jnp.asarray(feats))
  np.testing.assert_allclose(np.asarray(grad).reshape(h * w, c), want, rtol=1e-6, atol=1e-6)
  # Finite differences on distinct values: the max is locally linear.
  feats = random_features(rng, h, w, c)
  v = rng.standard_normal(feats.shape).astype(F32)
  grad = jax.jit(jax.grad(loss))(jnp.asarray(feats))
  fd = (loss(feats + 1e-4 * v) - loss(feats - 1e-4 * v)) / 2e-4
  np.testing.assert_allclose(float(fd), float(np.sum(grad * v)), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------- shared


@pytest.mark.parametrize("op", ["align", "pool"])
def test_vmap_equals_loop_and_jit_traces_once(op):
  chex.clear_trace_counter()
  rng = np.random.default_rng(5)
  feats = jnp.asarray(rng.standard_normal((3, 6, 7, 4)).astype(F32))
  rois = jnp.asarray(np.stack([random_rois(rng, 20, 96, 112) for _ in range(3)]))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def batched(f, b):
    fn = (lambda x, y: align(x, y, (3, 2), 1 / 16, 2, True)) if op == "align" else (
        lambda x, y: pool(x, y, (3, 2), 1 / 16))
    return jax.vmap(fn)(f, b)

  out = batched(feats, rois)
  batched(feats + 1.0, rois * 0.9)
  for i in range(3):
    one = (align(feats[i], rois[i], (3, 2), 1 / 16, 2, True) if op == "align" else
           pool(feats[i], rois[i], (3, 2), 1 / 16))
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(one), rtol=1e-6, atol=1e-6)


def test_non_finite_rois_give_nan_rows_and_no_gradient():
  feats = jnp.ones((5, 6, 2))
  rois = jnp.array([[0.0, 0.0, 40.0, 40.0], [jnp.nan, 0.0, 8.0, 8.0], [0.0, 0.0, jnp.inf, 8.0]])
  for fn in (lambda f: align(f, rois, 2, 1 / 8), lambda f: pool(f, rois, 2, 1 / 8)):
    out = np.asarray(fn(feats))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:]))
    grad = jax.jit(jax.grad(lambda f: jnp.sum(jnp.nan_to_num(fn(f)))))(feats)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_empty_roi_set_and_dtype():
  feats = jnp.ones((5, 6, 2), jnp.bfloat16)
  for fn in (align, pool):
    out = fn(feats, jnp.zeros((0, 4)), (2, 3), 1 / 8)
    assert out.shape == (0, 2, 3, 2) and out.dtype == jnp.bfloat16


def test_bad_arguments_raise():
  feats, rois = jnp.ones((4, 4, 2)), jnp.zeros((3, 4))
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi.roi_align(feats, rois, 2, 1.0, sampling_ratio=0)
  with pytest.raises(ValueError, match="output_size"):
    roi.roi_pool(feats, rois, (2, 0), 1.0)
  with pytest.raises(ValueError, match="features"):
    roi.roi_align(feats[None], rois, 2, 1.0)
  with pytest.raises(ValueError, match="rois"):
    roi.roi_pool(feats, jnp.zeros((3, 5)), 2, 1.0)
  with pytest.raises(ValueError, match="spatial_scale"):
    roi.roi_pool(feats, rois, 2, 0.0)
