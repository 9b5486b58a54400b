"""Tests for frcnn_jax/models/conv.py: the per-tap-gradient convolution equals lax's."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from frcnn_jax.benchmarking import backbones
from frcnn_jax.config import build as builders
from frcnn_jax.config import defaults
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models import conv
from frcnn_jax.models import faster_rcnn
from tests import test_benchmark
from tests.models import tiny

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def always_per_tap(monkeypatch):
  """Tiny test maps are below the size threshold: use the per-tap gradients everywhere."""
  monkeypatch.setattr(conv, "PER_TAP_MIN_POSITIONS", 0)


def _random(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _conv_grads(conv_fn, x, kernel, bias, cotangent):
  """d(sum(nn.Conv(x) * cotangent)) / d(x, kernel, bias) for a 3x3 padding-1 nn.Conv."""
  layer = nn.Conv(kernel.shape[-1], kernel.shape[:2], padding=1, dtype=x.dtype,
                  conv_general_dilated=conv_fn)
  params = {"params": {"kernel": kernel, "bias": bias}}

  def loss(x, params):
    return jnp.sum(layer.apply(params, x).astype(jnp.float32) * cotangent)
  dx, dparams = jax.grad(loss, argnums=(0, 1))(x, params)
  return dx, dparams["params"]["kernel"], dparams["params"]["bias"]


@pytest.mark.parametrize("padding,kernel_hw", [
    (((1, 1), (1, 1)), (3, 3)), ("SAME", (3, 3)), ("VALID", (3, 3)), (((1, 0), (0, 1)), (1, 1)),
    (((0, 1), (1, 0)), (3, 2)), (((2, 3), (0, 4)), (3, 3))])
def test_forward_and_gradients_equal_lax(padding, kernel_hw):
  x = _random((2, 7, 9, 5), 0)
  kernel = _random((*kernel_hw, 5, 6), 1)
  run = lambda fn, x, k: fn(x, k, (1, 1), padding, dimension_numbers=NHWC)
  ours = run(conv.conv_general_dilated, x, kernel)
  want = run(lax.conv_general_dilated, x, kernel)
  np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
  cotangent = _random(want.shape, 2)
  grads = lambda fn: jax.grad(lambda x, k: jnp.sum(run(fn, x, k) * cotangent), (0, 1))(x, kernel)
  (dx, dw), (want_dx, want_dw) = grads(conv.conv_general_dilated), grads(lax.conv_general_dilated)
  np.testing.assert_array_equal(dx, want_dx)   # lax's own input gradient
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding,kernel_hw,strides", [
    (((1, 1), (1, 1)), (3, 3), (2, 2)), ("VALID", (3, 3), (2, 1)),
    (((3, 3), (3, 3)), (7, 7), (2, 2)), (((0, 1), (2, 0)), (3, 2), (3, 2))])
def test_strided_forward_and_gradients_equal_lax(padding, kernel_hw, strides):
  """ResNet's stride-2 3x3 and 1x1 convolutions (odd sizes: the last rows fall off)."""
  x = _random((2, 9, 11, 5), 0)
  kernel = _random((*kernel_hw, 5, 6), 1)
  run = lambda fn, x, k: fn(x, k, strides, padding, dimension_numbers=NHWC)
  want = run(lax.conv_general_dilated, x, kernel)
  np.testing.assert_allclose(run(conv.conv_general_dilated, x, kernel), want, rtol=1e-6,
                             atol=1e-6)
  cotangent = _random(want.shape, 2)
  grads = lambda fn: jax.grad(lambda x, k: jnp.sum(run(fn, x, k) * cotangent), (0, 1))(x, kernel)
  (dx, dw), (want_dx, want_dw) = grads(conv.conv_general_dilated), grads(lax.conv_general_dilated)
  np.testing.assert_array_equal(dx, want_dx)   # lax's own input gradient
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_nn_conv_gradients_equal_lax(batch):
  x = _random((batch, 7, 9, 5), 0)
  kernel, bias = _random((3, 3, 5, 6), 1), _random((6,), 2)
  cotangent = _random((batch, 7, 9, 6), 3)
  got = _conv_grads(conv.conv_general_dilated, x, kernel, bias, cotangent)
  want = _conv_grads(None, x, kernel, bias, cotangent)
  for name, g, w in zip(("dx", "dW", "db"), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def _pointwise_numpy(x, kernel, strides):
  """A 1x1 convolution without padding as loops over the output cells."""
  b, h, w, _ = x.shape
  sh, sw = strides
  out = np.zeros((b, -(-h // sh), -(-w // sw), kernel.shape[-1]))
  for n in range(b):
    for i in range(out.shape[1]):
      for j in range(out.shape[2]):
        out[n, i, j] = x[n, i * sh, j * sw] @ kernel[0, 0]
  return out


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 0), (0, 0))])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (2, 1), (3, 2)])
def test_pointwise_equals_lax_and_numpy(padding, strides):
  """1x1 convolutions are one matmul (odd sizes: the strided last rows fall off)."""
  x = _random((2, 9, 11, 5), 0)
  kernel = _random((1, 1, 5, 6), 1)
  run = lambda fn, x, k: fn(x, k, strides, padding, dimension_numbers=NHWC)
  want = run(lax.conv_general_dilated, x, kernel)
  got = run(conv.conv_general_dilated, x, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, _pointwise_numpy(np.float64(x), np.float64(kernel), strides),
                             rtol=1e-5, atol=1e-5)
  cotangent = _random(want.shape, 2)
  grads = lambda fn: jax.grad(lambda x, k: jnp.sum(run(fn, x, k) * cotangent), (0, 1))(x, kernel)
  for got, want, name in zip(grads(conv.conv_general_dilated), grads(lax.conv_general_dilated),
                             ("dx", "dW")):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_pointwise_is_a_matmul_whatever_the_map(monkeypatch):
  """No threshold for 1x1 kernels: the forward and both gradients are matmuls, no conv."""
  monkeypatch.setattr(conv, "PER_TAP_MIN_POSITIONS", 10**6)
  fn = lambda x, k: jnp.sum(conv.conv_general_dilated(x, k, (2, 2), "SAME",
                                                       dimension_numbers=NHWC) ** 2)
  args = jnp.zeros((3, 4, 5, 8)), jnp.zeros((1, 1, 8, 16))
  jaxpr = str(jax.make_jaxpr(jax.value_and_grad(fn, (0, 1)))(*args))
  assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
  padded = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), ((1, 0), (0, 0)),
                                                  dimension_numbers=NHWC)
  assert "conv_general_dilated" in str(jax.make_jaxpr(padded)(*args))


def test_pointwise_bfloat16_keeps_the_dtype():
  x, kernel = _random((2, 5, 4, 8), 0, jnp.bfloat16), _random((1, 1, 8, 3), 1, jnp.bfloat16)
  got = conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
  want = lax.conv_general_dilated(x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1),
                                  "SAME", dimension_numbers=NHWC)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(got), want, rtol=0.02, atol=0.02)


def test_weight_grad_matches_a_numpy_loop():
  x = np.random.default_rng(0).normal(size=(2, 4, 5, 2))
  dy = np.random.default_rng(1).normal(size=(2, 4, 5, 3))
  x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((3, 3, 2, 3))
  for ky in range(3):
    for kx in range(3):
      for b in range(2):
        for i in range(4):
          for j in range(5):
            want[ky, kx] += np.outer(x_pad[b, i + ky, j + kx], dy[b, i, j])
  got = conv.weight_grad(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32), (3, 3),
                         ((1, 1), (1, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_are_close_and_keep_dtypes():
  x = _random((2, 7, 9, 5), 0, jnp.bfloat16)
  kernel, bias = _random((3, 3, 5, 6), 1), _random((6,), 2)
  cotangent = _random((2, 7, 9, 6), 3)
  got = _conv_grads(conv.conv_general_dilated, x, kernel, bias, cotangent)
  want = _conv_grads(None, x, kernel, bias, cotangent)
  exact = _conv_grads(None, x.astype(jnp.float32), kernel, bias, cotangent)
  for name, g, w, e in zip(("dx", "dW", "db"), got, want, exact):
    assert g.dtype == w.dtype, name
    scale = float(jnp.max(jnp.abs(e)))
    np.testing.assert_allclose(np.float32(g), np.float32(e), atol=0.02 * scale, err_msg=name)
    np.testing.assert_allclose(np.float32(g), np.float32(w), atol=0.02 * scale, err_msg=name)


def test_jit_traces_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def grads(x, kernel):
    return jax.grad(lambda x, k: jnp.sum(
        conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC) ** 2),
                    (0, 1))(x, kernel)
  for seed in range(3):
    jax.block_until_ready(grads(_random((1, 6, 5, 3), seed), _random((3, 3, 3, 4), seed + 10)))


def test_vmap_equals_a_loop():
  xs = _random((3, 2, 6, 5, 3), 0)
  kernel = _random((3, 3, 3, 4), 1)

  def grads(x):
    return jax.grad(lambda x, k: jnp.sum(jnp.sin(conv.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))), (0, 1))(x, kernel)
  batched = jax.vmap(grads)(xs)
  for v in range(xs.shape[0]):
    for got, want in zip(batched, grads(xs[v])):
      np.testing.assert_allclose(got[v], want, rtol=1e-5, atol=1e-5)


def test_small_maps_keep_lax_gradients_whatever_the_batch(monkeypatch):
  monkeypatch.setattr(conv, "PER_TAP_MIN_POSITIONS", 6 * 5 + 1)
  fn = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)
  jaxpr = lambda b, h: str(jax.make_jaxpr(fn)(jnp.zeros((b, h, 5, 3)), jnp.zeros((3, 3, 3, 4))))
  assert "custom_vjp" not in jaxpr(1, 6) and "custom_vjp" not in jaxpr(8, 6)
  assert "custom_vjp" in jaxpr(1, 7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window_strides=(0, 1)), "window_strides"),
    (dict(rhs_dilation=(2, 2)), "rhs_dilation"),
    (dict(lhs_dilation=(1, 2)), "lhs_dilation"),
    (dict(feature_group_count=2, rhs_shape=(3, 3, 2, 4)), "feature_group_count"),
    (dict(batch_group_count=2), "batch_group_count"),
    (dict(dimension_numbers=("NCHW", "OIHW", "NCHW"), rhs_shape=(4, 4, 3, 3)),
     "dimension_numbers"),
    (dict(padding=((1, 1), (-1, 1))), "padding"),
    (dict(preferred_element_type=jnp.bfloat16), "preferred_element_type"),
])
def test_unsupported_arguments_raise(kwargs, match):
  args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
  rhs_shape = kwargs.pop("rhs_shape", (3, 3, 4, 4))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    conv.conv_general_dilated(jnp.zeros((1, 6, 5, 4)), jnp.zeros(rhs_shape), **args)


def test_unknown_conv_grad_is_an_error():
  with pytest.raises(ValueError, match="conv_grad"):
    conv.conv_function("fast")


def test_faster_rcnn_gradients_equal_with_per_tap_and_xla():
  nets = {mode: tiny.model(frozen_blocks=0, conv_grad=mode) for mode in conv.CONV_GRADS}
  shapes = {mode: jax.eval_shape(lambda key, net=net: faster_rcnn.init_params(net, key),
                                 jax.random.key(0)) for mode, net in nets.items()}
  assert shapes["per_tap"] == shapes["xla"]
  params = tiny.numpy_params(nets["xla"])
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3)), jnp.uint8)
  image_hw = jnp.asarray([[32, 48], [30, 40]], jnp.int32)
  rois = jnp.asarray([[[0, 0, 40, 30], [10, 5, 45, 28]]] * 2, jnp.float32)

  def loss(params, net):
    outputs = net.apply({"params": params}, images, image_hw, rois)
    return sum(jnp.sum(jnp.sin(o)) for o in outputs)
  grads = {mode: jax.jit(jax.grad(loss), static_argnums=1)(params, net)
           for mode, net in nets.items()}
  assert "custom_vjp" in str(jax.make_jaxpr(functools.partial(loss, net=nets["per_tap"]))(params))
  flat = jax.tree_util.tree_leaves_with_path(grads["xla"])
  for (path, want), got in zip(flat, jax.tree.leaves(grads["per_tap"])):
    scale = float(jnp.max(jnp.abs(want))) + 1e-12
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("value,want", [("auto", "per_tap"), ("xla", "xla"),
                                        ("per_tap", "per_tap")])
def test_config_key_builds_the_model(value, want):
  config = defaults.get_config()
  config.model.conv_grad = value
  assert jax.default_backend() == "cpu"
  assert builders.model_from_config(config, 2).conv_grad == want


def test_config_key_rejects_unknown_values():
  config = defaults.get_config()
  config.model.conv_grad = "fast"
  with pytest.raises(ValueError, match="model.conv_grad"):
    builders.model_from_config(config, 2)


def _resnet_c4_config():
  """A tiny ResNet C4 detector: 1x1 convolutions in the trunk, the res5 head and the RPN (the
  FPN's laterals are the same `pointwise`)."""
  args = test_benchmark.TINY_BACKBONES["resnet_c4"]
  return config_flags.load_config(
      args[0].split("=", 1)[1],
      dict(backbones.parse_override(a.removeprefix("--config.")) for a in args[1:]))


def test_resnet_c4_detector_equals_with_per_tap_and_xla():
  config = _resnet_c4_config()
  config.model.pretrained = ""
  nets = {}
  for mode in conv.CONV_GRADS:
    config.model.conv_grad = mode
    nets[mode] = builders.model_from_config(config, 3)
  params = builders.init_params_from_config(config, nets["xla"], jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3)), jnp.uint8)
  image_hw = jnp.asarray([[64, 96], [60, 80]], jnp.int32)
  rois = jnp.asarray([[[0, 0, 40, 30], [10, 5, 85, 58]]] * 2, jnp.float32)

  def loss(params, net):
    return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(
        net.apply({"params": params}, images, image_hw, rois)))
  values = {m: jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, net)
            for m, net in nets.items()}
  jaxpr = str(jax.make_jaxpr(functools.partial(loss, net=nets["per_tap"]))(params))
  assert "dot_general" in jaxpr and "custom_vjp" in jaxpr
  np.testing.assert_allclose(values["per_tap"][0], values["xla"][0], rtol=1e-4)
  flat = jax.tree_util.tree_leaves_with_path(values["xla"][1])
  for (path, want), got in zip(flat, jax.tree.leaves(values["per_tap"][1])):
    scale = float(jnp.max(jnp.abs(want))) + 1e-12
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))
