"""Tests for frcnn_jax.ops.lrn against NumPy loop ports of Caffe's LRN layer."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import lrn

# ------------------------------------------------------------------ NumPy loop references
# After caffe-fast-rcnn src/caffe/layers/lrn_layer.cpp (LRNLayer::CrossChannelForward_cpu, and
# WithinChannelForward: split -> power 2 -> AVE pooling with pad (n-1)/2 -> power
# (1 + alpha * a)^-beta -> product) and pooling_layer.cpp (PoolingLayer::Forward_cpu, AVE),
# on one [H, W, C] image in float64.


def _caffe_ave_pool(plane, size, pad):
  """PoolingLayer AVE, kernel `size`, stride 1, pad `pad` of one [H, W] plane."""
  height, width = plane.shape
  pooled_h = int(np.ceil((height + 2 * pad - size) / 1)) + 1
  pooled_w = int(np.ceil((width + 2 * pad - size) / 1)) + 1
  if pad:
    pooled_h -= (pooled_h - 1) >= height + pad
    pooled_w -= (pooled_w - 1) >= width + pad
  out = np.zeros((pooled_h, pooled_w))
  for ph in range(pooled_h):
    for pw in range(pooled_w):
      hstart, wstart = ph - pad, pw - pad
      hend, wend = min(hstart + size, height + pad), min(wstart + size, width + pad)
      pool_size = (hend - hstart) * (wend - wstart)
      hstart, wstart = max(hstart, 0), max(wstart, 0)
      hend, wend = min(hend, height), min(wend, width)
      total = 0.0
      for h in range(hstart, hend):
        for w in range(wstart, wend):
          total += plane[h, w]
      out[ph, pw] = total / pool_size
  return out


def caffe_within_channel(x, size, alpha, beta):
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for c in range(x.shape[2]):
    pooled = _caffe_ave_pool(x[:, :, c] ** 2, size, (size - 1) // 2)
    assert pooled.shape == x.shape[:2]
    out[:, :, c] = x[:, :, c] * (1.0 + alpha * pooled) ** (-beta)
  return out


def caffe_across_channels(x, size, alpha, beta, k):
  x = np.asarray(x, np.float64)
  height, width, channels = x.shape
  pre_pad = (size - 1) // 2
  out = np.zeros_like(x)
  for h in range(height):
    for w in range(width):
      for c in range(channels):
        total = 0.0
        for other in range(c - pre_pad, c + pre_pad + 1):
          if 0 <= other < channels:
            total += x[h, w, other] ** 2
        out[h, w, c] = x[h, w, c] * (k + alpha / size * total) ** (-beta)
  return out


# ------------------------------------------------------------------ tests


@functools.partial(jax.jit, static_argnames=("local_size", "alpha", "beta", "k", "norm_region"))
def _lrn(x, **kwargs):
  return lrn.local_response_norm(x, **kwargs)


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 4), (7, 9)])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_within_channel_matches_caffe(hw, size):
  rng = np.random.default_rng(hw[0] * 10 + size)
  x = rng.normal(0, 30, (*hw, 4)).astype(np.float32)
  got = np.asarray(_lrn(jnp.asarray(x), local_size=size, alpha=5e-4, beta=0.75,
                        norm_region="within_channel"))
  np.testing.assert_allclose(got, caffe_within_channel(x, size, 5e-4, 0.75), rtol=2e-6,
                             atol=1e-6)


@pytest.mark.parametrize("channels", [1, 2, 6, 7])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_across_channels_matches_caffe(channels, size):
  rng = np.random.default_rng(channels * 10 + size)
  x = rng.normal(0, 3, (3, 4, channels)).astype(np.float32)
  got = np.asarray(_lrn(jnp.asarray(x), local_size=size, alpha=1e-2, beta=0.75, k=2.0,
                        norm_region="across_channels"))
  np.testing.assert_allclose(got, caffe_across_channels(x, size, 1e-2, 0.75, 2.0), rtol=2e-6,
                             atol=1e-6)


def test_golden_values():
  # WITHIN_CHANNEL, n = 3, alpha = 9 (alpha / n^2 = 1), beta = 1 on the row [1, 2, 3]: the
  # zero-padded sums of squares are 5, 14, 13 (the border's divisor stays 9).
  row = jnp.asarray([[[1.0], [2.0], [3.0]]])
  got = lrn.local_response_norm(row, 3, alpha=9.0, beta=1.0, norm_region="within_channel")
  np.testing.assert_allclose(np.asarray(got).ravel(), [1 / 6, 2 / 15, 3 / 14], rtol=1e-6)
  # 2 x 2 image: every window holds all four pixels, 1 + 4 + 9 + 16 = 30; beta 0.5.
  square = jnp.asarray([[[1.0], [2.0]], [[3.0], [4.0]]])
  got = lrn.local_response_norm(square, 3, alpha=9.0, beta=0.5, norm_region="within_channel")
  np.testing.assert_allclose(np.asarray(got).ravel(), np.arange(1, 5) / np.sqrt(31.0),
                             rtol=1e-6)
  # ACROSS_CHANNELS, n = 3, alpha = 3 (alpha / n = 1), beta = 1, k = 2 on channels [1, 2, 3].
  pixel = jnp.asarray([[[1.0, 2.0, 3.0]]])
  got = lrn.local_response_norm(pixel, 3, alpha=3.0, beta=1.0, k=2.0)
  np.testing.assert_allclose(np.asarray(got).ravel(), [1 / 7, 2 / 16, 3 / 15], rtol=1e-6)
  # ZF's norm1 parameters on a constant interior: 1 + 5e-5 * 100^2 = 1.5, ^-0.75.
  flat = jnp.full((1, 5, 5, 1), 100.0)
  got = lrn.local_response_norm(flat, 3, alpha=5e-5, beta=0.75, norm_region="within_channel")
  assert float(got[0, 2, 2, 0]) == pytest.approx(100.0 * 1.5 ** -0.75, rel=1e-6)


def test_batch_equals_images_one_at_a_time_and_vmap():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0, 20, (3, 6, 5, 4)).astype(np.float32))
  for region in lrn.NORM_REGIONS:
    fn = functools.partial(lrn.local_response_norm, local_size=3, alpha=1e-3, beta=0.75,
                           norm_region=region)
    batched = np.asarray(jax.jit(fn)(x))
    looped = np.stack([np.asarray(fn(x[i])) for i in range(3)])
    mapped = np.asarray(jax.jit(jax.vmap(fn))(x))
    np.testing.assert_allclose(batched, looped, rtol=1e-6)
    np.testing.assert_allclose(mapped, looped, rtol=1e-6)


def test_gradient_is_finite_and_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = rng.normal(0, 10, (1, 4, 5, 3)).astype(np.float32)
  x[0, 0, 0] = 0.0   # zeros and a border

  for region in lrn.NORM_REGIONS:
    loss = jax.jit(lambda v, r=region: jnp.sum(jnp.sin(lrn.local_response_norm(
        v, 3, alpha=1e-2, beta=0.75, norm_region=r))))
    grad = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    assert np.all(np.isfinite(grad))
    # Central differences in float64 through the NumPy reference.
    ref = caffe_within_channel if region == "within_channel" else functools.partial(
        caffe_across_channels, k=1.0)
    f = lambda v, ref=ref: np.sum(np.sin(ref(v[0], 3, 1e-2, 0.75)))
    eps = 1e-4
    for index in [(0, 0, 0, 0), (0, 1, 2, 1), (0, 3, 4, 2)]:
      up, down = x.astype(np.float64), x.astype(np.float64)
      up[index] += eps
      down[index] -= eps
      assert grad[index] == pytest.approx((f(up) - f(down)) / (2 * eps), rel=1e-3, abs=1e-4)


def test_bfloat16_input_keeps_its_dtype():
  x = jnp.asarray(np.random.default_rng(2).normal(0, 5, (2, 3, 3, 4)), jnp.bfloat16)
  y = lrn.local_response_norm(x, 3, alpha=1e-2, norm_region="within_channel")
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  want = lrn.local_response_norm(x.astype(jnp.float32), 3, alpha=1e-2,
                                 norm_region="within_channel")
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=1e-2)


def test_traces_once_for_every_input_of_one_shape():

  @jax.jit
  @chex.assert_max_traces(n=1)
  def zf_norm(v):
    return lrn.local_response_norm(v, 3, alpha=5e-5, beta=0.75, norm_region="within_channel")

  rng = np.random.default_rng(3)
  for _ in range(3):
    zf_norm(jnp.asarray(rng.normal(size=(2, 5, 6, 3)).astype(np.float32))).block_until_ready()


@pytest.mark.parametrize("kwargs,match", [
    ({"local_size": 4}, "odd"), ({"local_size": 0}, "odd"),
    ({"norm_region": "both"}, "norm_region"), ({"k": 0.0}, "k must be")])
def test_bad_arguments_are_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lrn.local_response_norm(jnp.zeros((1, 3, 3, 2)), **kwargs)
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W, C\]"):
    lrn.local_response_norm(jnp.zeros((3, 2)))
