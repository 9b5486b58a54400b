"""Tests for frcnn_jax/models/vgg.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models import vgg


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
  mask = vgg.trainable_mask(params, 2)
  assert mask == {"trunk": {"conv1_1": {"kernel": False, "bias": False},
                            "conv2_2": {"kernel": False}, "conv3_1": {"kernel": True}},
                  "rpn": {"conv": {"kernel": True}}, "head": {"fc6": {"kernel": True}}}
  assert all(jax.tree_util.tree_leaves(vgg.trainable_mask(params, 0)))


def test_wrong_number_of_blocks_is_an_error():
  with pytest.raises(ValueError, match="convs_per_block"):
    vgg.VGG16(convs_per_block=(1, 1, 1)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
