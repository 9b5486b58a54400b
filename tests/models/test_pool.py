"""Tests for frcnn_jax/models/pool.py: values and gradient equal lax's max pool bit for bit."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models import pool
from frcnn_jax.models.backbones import vgg16 as vgg

SHAPES = [(2, 6, 8, 3), (3, 7, 5, 4), (2, 9, 10, 2), (1, 1, 3, 2)]
DTYPES = [jnp.float32, jnp.bfloat16]


def _lax_pool(x, ceil_mode):
  """The reference: lax's reduce-window max, as vgg.max_pool_2x2 was written before pool.py."""
  pad = [(0, n % 2 if ceil_mode else 0) for n in x.shape[1:3]]
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding=pad)


def _tied(shape, seed, dtype, nan_fraction=0.0):
  """Small integers, a third of them -0.0 and some ReLU'd: most windows hold equal maxima."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-2, 3, size=shape).astype(np.float32)
  x[rng.random(shape) < 0.3] = -0.0
  x[:, ::3] = np.maximum(x[:, ::3], 0)
  x[rng.random(shape) < nan_fraction] = np.nan
  return jnp.asarray(x, dtype)


def _grad(pool_fn, x, ceil_mode, seed):
  """Input gradient of a random linear functional of the pooled output ([B, H, W, C])."""
  out_shape = jax.eval_shape(lambda x: _lax_pool(x, ceil_mode), x).shape
  w = jnp.asarray(np.random.default_rng(seed).normal(size=out_shape), x.dtype)
  return jax.jit(jax.grad(lambda x: jnp.sum(pool_fn(x, ceil_mode) * w).astype(jnp.float32)))(x)


def _bits(a):
  a = np.asarray(a)
  return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _numpy_pool(x, ceil_mode):
  """Loop reference: the forward and the input position each output's gradient goes to.

  Args:
    x: [B, H, W, C] float array without NaNs.
    ceil_mode: windows clipped to the input (ceil) or trailing odd row / column dropped.

  Returns:
    ([B, h, w, C] maxima, [B, h, w, C, 2] (row, column) of the first maximum of each window in
    row-major order, which is where lax's gradient goes).
  """
  b, height, width, c = x.shape
  h, w = ((height + 1) // 2, (width + 1) // 2) if ceil_mode else (height // 2, width // 2)
  out = np.zeros((b, h, w, c), x.dtype)
  winner = np.zeros((b, h, w, c, 2), np.int64)
  for n in range(b):
    for i in range(h):
      for j in range(w):
        for k in range(c):
          best = None
          for r in range(2 * i, min(2 * i + 2, height)):
            for s in range(2 * j, min(2 * j + 2, width)):
              if best is None or x[n, r, s, k] > best:
                best, winner[n, i, j, k] = x[n, r, s, k], (r, s)
          out[n, i, j, k] = best
  return out, winner


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradient_equal_lax_bitwise(shape, ceil_mode, dtype):
  x = _tied(shape, sum(shape), dtype)
  got, want = pool.max_pool_2x2(x, ceil_mode), _lax_pool(x, ceil_mode)
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_array_equal(_bits(got), _bits(want))
  got_grad, want_grad = _grad(pool.max_pool_2x2, x, ceil_mode, 1), _grad(_lax_pool, x,
                                                                        ceil_mode, 1)
  assert got_grad.dtype == want_grad.dtype
  np.testing.assert_array_equal(_bits(got_grad), _bits(want_grad))


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_nans_are_routed_as_lax_routes_them(ceil_mode):
  x = _tied((2, 9, 7, 8), 5, jnp.float32, nan_fraction=0.2)
  got, want = pool.max_pool_2x2(x, ceil_mode), _lax_pool(x, ceil_mode)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(_bits(_grad(pool.max_pool_2x2, x, ceil_mode, 2)),
                                _bits(_grad(_lax_pool, x, ceil_mode, 2)))


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_a_numpy_loop(shape, ceil_mode):
  x = np.asarray(_tied(shape, 7, jnp.float32))
  want, winner = _numpy_pool(x, ceil_mode)
  np.testing.assert_array_equal(pool.max_pool_2x2(jnp.asarray(x), ceil_mode), want)
  dy = np.random.default_rng(3).normal(size=want.shape).astype(np.float32)
  want_grad = np.zeros_like(x)
  for n, i, j, k in np.ndindex(*want.shape):
    want_grad[n, winner[n, i, j, k, 0], winner[n, i, j, k, 1], k] += dy[n, i, j, k]
  _, vjp = jax.vjp(lambda x: pool.max_pool_2x2(x, ceil_mode), jnp.asarray(x))
  np.testing.assert_array_equal(vjp(jnp.asarray(dy))[0], want_grad)


def test_all_ties_route_to_the_top_left():
  x = jnp.zeros((1, 4, 4, 1))
  grad = jax.grad(lambda x: jnp.sum(pool.max_pool_2x2(x)))(x)
  np.testing.assert_array_equal(grad[0, :, :, 0], np.tile([[1, 0], [0, 0]], (2, 2)))


def test_vgg_uses_it():
  x = _tied((1, 7, 6, 3), 11, jnp.float32)
  np.testing.assert_array_equal(_bits(_grad(vgg.max_pool_2x2, x, True, 4)),
                                _bits(_grad(pool.max_pool_2x2, x, True, 4)))


def test_jit_traces_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def value_and_grad(x):
    return jax.value_and_grad(lambda x: jnp.sum(jnp.sin(pool.max_pool_2x2(x, True))))(x)
  for seed in range(3):
    jax.block_until_ready(value_and_grad(_tied((2, 7, 6, 3), seed, jnp.float32)))


def test_vmap_equals_a_loop():
  xs = _tied((3, 2, 7, 6, 3), 9, jnp.float32)

  def value_and_grad(x):
    return jax.value_and_grad(lambda x: jnp.sum(jnp.sin(pool.max_pool_2x2(x, True))))(x)
  batched = jax.vmap(value_and_grad)(xs)
  for v in range(xs.shape[0]):
    for got, want in zip(batched, value_and_grad(xs[v])):
      np.testing.assert_array_equal(got[v], want)
