"""Tests for frcnn_jax/models/backbones/vgg16.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models.backbones import vgg16 as vgg


@pytest.mark.parametrize("hw", [(64, 64), (70, 53), (33, 95)])
def test_output_shape_is_floor_stride_16(hw):
  trunk = vgg.VGG16(width=1 / 16, convs_per_block=(1, 1, 1, 1, 1))
  x = jnp.zeros((2, *hw, 3))
  y, _ = jax.eval_shape(lambda: trunk.init_with_output(jax.random.key(0), x))
  assert y.shape == (2, hw[0] // 16, hw[1] // 16, 32)
  assert trunk.out_channels == 32


@pytest.mark.parametrize("hw", [(64, 64), (70, 53)])
def test_stride_8_drops_the_last_pool_and_keeps_the_parameters(hw):
  x = jnp.zeros((1, *hw, 3))
  y, params = jax.eval_shape(lambda: vgg.VGG16(width=1 / 16, stride=8).init_with_output(
      jax.random.key(0), x))
  assert y.shape == (1, hw[0] // 8, hw[1] // 8, 32)
  stride_16 = jax.eval_shape(lambda: vgg.VGG16(width=1 / 16).init(jax.random.key(0), x))
  assert jax.tree_util.tree_map(lambda a: a.shape, params) == jax.tree_util.tree_map(
      lambda a: a.shape, stride_16)


@pytest.mark.parametrize("stride", [16, 8])
def test_pool_output_size_is_the_trunk_output_size(stride):
  rng = np.random.default_rng(stride)
  for hw in [(600, 1000), (1000, 600), *[tuple(int(v) for v in rng.integers(16, 200, 2))
                                         for _ in range(6)]]:
    for ceil in (False, True):
      trunk = vgg.VGG16(width=1 / 16, convs_per_block=(1, 1, 1, 1, 1), stride=stride,
                        pool_ceil_mode=ceil)
      y = jax.eval_shape(lambda: trunk.init_with_output(jax.random.key(0),
                                                        jnp.zeros((1, *hw, 3))))[0]
      want = [vgg.pool_output_size(n, stride, ceil) for n in hw]
      assert y.shape[1:3] == tuple(want), (hw, ceil)
      assert want == ([-(-n // stride) for n in hw] if ceil else [n // stride for n in hw])
  assert vgg.pool_output_size(600, 16, True) == 38 and vgg.pool_output_size(1000, 16, True) == 63
  assert vgg.pool_output_size(600) == 37 and vgg.pool_output_size(1000) == 62


def _caffe_max_pool(x):
  """caffe-fast-rcnn PoolingLayer::Forward_cpu, MAX, kernel 2, stride 2, pad 0 ([H, W, C])."""
  height, width, _ = x.shape
  pooled_height = int(np.ceil(float(height - 2) / 2)) + 1
  pooled_width = int(np.ceil(float(width - 2) / 2)) + 1
  top = np.full((pooled_height, pooled_width, x.shape[2]), -np.finfo(np.float32).max, np.float32)
  for ph in range(pooled_height):
    for pw in range(pooled_width):
      hstart, wstart = ph * 2, pw * 2
      hend, wend = min(hstart + 2, height), min(wstart + 2, width)
      for h in range(max(hstart, 0), hend):
        for w in range(max(wstart, 0), wend):
          top[ph, pw] = np.maximum(top[ph, pw], x[h, w])
  return top


def _conv3x3(x, kernel, bias):
  h, w, _ = x.shape
  p = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = sum(np.einsum("hwc,cd->hwd", p[i:i + h, j:j + w], kernel[i, j])
            for i in range(3) for j in range(3))
  return out + bias


@pytest.mark.parametrize("hw", [(37, 45), (34, 51)])
def test_ceil_mode_matches_caffe_pooling(hw):
  # Conv + ReLU + Caffe's max pooling, block by block in NumPy, on odd sizes at every level.
  trunk = vgg.VGG16(width=1 / 16, convs_per_block=(1, 1, 1, 1, 1), pool_ceil_mode=True)
  rng = np.random.default_rng(hw[0])
  x = rng.normal(size=(1, *hw, 3)).astype(np.float32)
  shapes = jax.eval_shape(trunk.init, jax.random.key(0), x)["params"]
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
  got = np.asarray(jax.jit(trunk.apply)({"params": params}, x))[0]
  want = x[0].astype(np.float64)
  for block in range(1, 6):
    layer = params[f"conv{block}_1"]
    want = np.maximum(_conv3x3(want, layer["kernel"], layer["bias"]), 0)
    if block <= 4:
      want = _caffe_max_pool(want.astype(np.float32)).astype(np.float64)
  assert got.shape == want.shape == (-(-hw[0] // 16), -(-hw[1] // 16), 32)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw", [(3, 5), (4, 6), (1, 7)])
def test_max_pool_2x2_matches_caffe_on_negative_values(hw):
  # Without a ReLU before it, a zero pad would win over negative values; -inf never does.
  x = -1.0 - np.random.default_rng(hw[1]).random((1, *hw, 2)).astype(np.float32)
  ceil = np.asarray(vgg.max_pool_2x2(jnp.asarray(x), ceil_mode=True))
  np.testing.assert_array_equal(ceil[0], _caffe_max_pool(x[0]))
  floor = np.asarray(vgg.max_pool_2x2(jnp.asarray(x)))
  assert floor.shape[1:3] == (hw[0] // 2, hw[1] // 2)
  np.testing.assert_array_equal(floor, ceil[:, :hw[0] // 2, :hw[1] // 2])


def test_unsupported_stride_is_an_error():
  with pytest.raises(ValueError, match="stride must be one of"):
    vgg.VGG16(width=1 / 16, stride=4).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_parameter_names_follow_vgg16():
  params = jax.eval_shape(
      lambda: vgg.VGG16(width=1 / 16).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  names = sorted(params["params"])
  assert names == sorted(f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1)
                         for i in range(1, n + 1))
  assert params["params"]["conv3_1"]["kernel"].shape == (3, 3, 8, 16)
  assert params["params"]["conv5_3"]["kernel"].shape == (3, 3, 32, 32)


def test_full_vgg16_channels():
  params = jax.eval_shape(lambda: vgg.VGG16().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  sizes = [params["params"][f"conv{b}_1"]["kernel"].shape[-1] for b in range(1, 6)]
  assert sizes == [64, 128, 256, 512, 512]
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
  assert count == 14_714_688     # torchvision's vgg16().features


def test_frozen_blocks_get_no_gradient():
  trunk = vgg.VGG16(width=1 / 16, convs_per_block=(1, 1, 1, 1, 1), frozen_blocks=2)
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
  shapes = jax.eval_shape(trunk.init, jax.random.key(0), x)["params"]
  params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.1, np.float32), shapes)
  grads = jax.jit(jax.grad(lambda p: (trunk.apply({"params": p}, x) ** 2).sum()))(params)
  for name, g in grads.items():
    total = sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree_util.tree_leaves(g))
    assert (total == 0.0) == (name in ("conv1_1", "conv2_1")), name


def test_trainable_mask():
  params = {"trunk": {"conv1_1": {"kernel": 0, "bias": 0}, "conv2_2": {"kernel": 0},
                      "conv3_1": {"kernel": 0}},
            "rpn": {"conv": {"kernel": 0}}, "head": {"fc6": {"kernel": 0}}}
  mask = vgg.VGG16(frozen_blocks=2).trainable(params)
  assert mask == {"trunk": {"conv1_1": {"kernel": False, "bias": False},
                            "conv2_2": {"kernel": False}, "conv3_1": {"kernel": True}},
                  "rpn": {"conv": {"kernel": True}}, "head": {"fc6": {"kernel": True}}}
  assert all(jax.tree_util.tree_leaves(vgg.VGG16(frozen_blocks=0).trainable(params)))


def test_wrong_number_of_blocks_is_an_error():
  with pytest.raises(ValueError, match="convs_per_block"):
    vgg.VGG16(convs_per_block=(1, 1, 1)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
