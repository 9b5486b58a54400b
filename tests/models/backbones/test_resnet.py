"""Tests for the ResNet C4 backbone: layout, frozen batch norm, bottleneck, freezing, sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models.backbones import resnet
from frcnn_jax.models.roi_heads import res5
from frcnn_jax.models.roi_heads.pooling import RoIPooler

TINY = dict(width=1 / 32, blocks=(1, 1, 1))
# torchvision's documented parameter counts (weights meta "num_params"), classifier included.
TORCHVISION_NUM_PARAMS = {50: 25_557_032, 101: 44_549_160}
FC_PARAMS = 2048 * 1000 + 1000


def _shapes(tree):
  return {"/".join(str(getattr(e, "key", e)) for e in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _learnable(shapes):
  """Parameter count without batch norm's running statistics (buffers in torch)."""
  return sum(math.prod(s) for name, s in shapes.items() if "running_" not in name)


@pytest.mark.parametrize("depth", [50, 101])
def test_full_resnet_parameters_have_torchvision_names_shapes_and_count(depth):
  trunk = resnet.ResNetC4(depth=depth)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  trunk_shapes = _shapes(jax.eval_shape(trunk.init, jax.random.key(0), images)["params"])
  head = res5.Res5Head(num_classes=20, pooler=RoIPooler("roi_align", 14))
  head_shapes = _shapes(jax.eval_shape(
      head.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4, 4, 1024), jnp.float32),
      jax.ShapeDtypeStruct((1, 2, 4), jnp.float32))["params"])
  blocks = {name.split("/")[0] for name in trunk_shapes if name.startswith("layer")}
  expected = {f"layer{i + 1}.{j}" for i, n in enumerate(resnet.DEPTHS[depth][:3])
              for j in range(n)}
  assert blocks == expected
  assert trunk_shapes["conv1/kernel"] == (7, 7, 3, 64)
  assert trunk_shapes["bn1/running_var"] == (64,)
  assert trunk_shapes["layer1.0/downsample.0/kernel"] == (1, 1, 64, 256)
  assert trunk_shapes["layer2.0/conv2/kernel"] == (3, 3, 128, 128)
  assert trunk_shapes["layer3.0/conv3/kernel"] == (1, 1, 256, 1024)
  assert "layer3.1/downsample.0/kernel" not in trunk_shapes
  assert head_shapes["layer4.0/conv1/kernel"] == (1, 1, 1024, 512)
  assert head_shapes["layer4.0/downsample.0/kernel"] == (1, 1, 1024, 2048)
  assert head_shapes["cls/kernel"] == (2048, 21) and head_shapes["box/kernel"] == (2048, 84)
  layer4 = {k: v for k, v in head_shapes.items() if k.startswith("layer4.")}
  assert {k.split("/")[0] for k in layer4} == {"layer4.0", "layer4.1", "layer4.2"}
  assert (_learnable(trunk_shapes) + _learnable(layer4) + FC_PARAMS
          == TORCHVISION_NUM_PARAMS[depth])
  assert trunk.out_channels == 1024 and head.out_channels == 2048 and trunk.stride == 16


def test_frozen_batch_norm_is_torchvisions_formula():
  rng = np.random.default_rng(0)
  params = {name: rng.normal(size=5).astype(np.float32)
            for name in ("weight", "bias", "running_mean")}
  params["running_var"] = rng.uniform(0.0, 2.0, 5).astype(np.float32)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  y = resnet.FrozenBatchNorm().apply({"params": params}, x)
  ref = ((x - params["running_mean"]) / np.sqrt(params["running_var"] + 1e-5)
         * params["weight"] + params["bias"])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def _random_params(tree, seed):
  """Random values for every leaf; variances positive."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = str(getattr(path[-1], "key", path[-1]))
    value = rng.normal(0.0, 0.5, leaf.shape)
    if name == "running_var":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    out.append(jnp.asarray(value, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def _np_conv(x, w, stride, pad):
  """Loop reference: x [H, W, Cin], w [kh, kw, Cin, Cout] -> [Ho, Wo, Cout]."""
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[0] + 2 * pad - kh) // stride + 1
  wo = (x.shape[1] + 2 * pad - kw) // stride + 1
  out = np.zeros((ho, wo, w.shape[3]))
  for i in range(ho):
    for j in range(wo):
      window = xp[i * stride:i * stride + kh, j * stride:j * stride + kw]
      out[i, j] = np.einsum("hwc,hwco->o", window, w)
  return out


def _np_bn(x, p):
  return (x - p["running_mean"]) / np.sqrt(p["running_var"] + 1e-5) * p["weight"] + p["bias"]


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_bottleneck_matches_a_numpy_loop_reference(stride_in_1x1):
  block = resnet.Bottleneck(planes=3, out_planes=8, stride=2, stride_in_1x1=stride_in_1x1)
  x = np.random.default_rng(1).normal(size=(1, 7, 6, 5)).astype(np.float32)
  params = _random_params(block.init(jax.random.key(0), x)["params"], 2)
  y = np.asarray(block.apply({"params": params}, x))
  p = jax.tree.map(np.asarray, params)
  s1, s3 = (2, 1) if stride_in_1x1 else (1, 2)
  relu = lambda v: np.maximum(v, 0.0)
  h = relu(_np_bn(_np_conv(x[0], p["conv1"]["kernel"], s1, 0), p["bn1"]))
  h = relu(_np_bn(_np_conv(h, p["conv2"]["kernel"], s3, 1), p["bn2"]))
  h = _np_bn(_np_conv(h, p["conv3"]["kernel"], 1, 0), p["bn3"])
  short = _np_bn(_np_conv(x[0], p["downsample.0"]["kernel"], 2, 0), p["downsample.1"])
  assert y.shape == (1, 4, 3, 8)
  np.testing.assert_allclose(y[0], relu(h + short), rtol=1e-4, atol=1e-4)


def test_frozen_stages_get_no_gradient_and_are_masked():
  trunk = resnet.ResNetC4(frozen_stages=2, **TINY)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  params = _random_params(trunk.init(jax.random.key(0), x)["params"], 3)
  grads = jax.grad(lambda p: jnp.sum(trunk.apply({"params": p}, x) ** 2))(params)
  mask = trunk.trainable(params)
  flat_grads = _shapes(grads)   # names only
  for name in flat_grads:
    keys = name.split("/")
    grad = grads
    trainable = mask
    for key in keys:
      grad, trainable = grad[key], trainable[key]
    frozen = (keys[0] in ("conv1", "bn1") or keys[0].startswith("layer1.")
              or keys[-2].startswith("bn") or keys[-2] == "downsample.1")
    assert trainable is (not frozen), name
    if frozen:
      assert not np.any(np.asarray(grad)), name
  assert np.any(np.asarray(grads["layer2.0"]["conv2"]["kernel"]))
  assert np.any(np.asarray(grads["layer3.0"]["conv1"]["kernel"]))
  all_frozen = resnet.ResNetC4(**TINY, **resnet.ResNetC4.all_frozen).trainable(params)
  assert not any(jax.tree.leaves(all_frozen))


@pytest.mark.parametrize("hw", [(33, 47), (64, 17), (15, 16)])
def test_output_hw_is_ceil_of_a_sixteenth_for_odd_sizes(hw):
  trunk = resnet.ResNetC4(**TINY)
  x = jnp.zeros((1, *hw, 3))
  out = jax.eval_shape(lambda: trunk.apply(trunk.init(jax.random.key(0), x), x))
  assert out.shape[1:3] == trunk.output_hw(*hw) == tuple(-(-s // 16) for s in hw)
  assert out.shape[3] == trunk.out_channels == 32


def test_trunk_equals_torchvision_resnet50_up_to_layer3():
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  net = torchvision.models.resnet50(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
  state = net.state_dict()
  gen = torch.Generator().manual_seed(1)
  for key, value in state.items():   # non-trivial batch norm statistics
    if key.endswith(("running_mean", "bias")) and value.dtype.is_floating_point:
      value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
    elif key.endswith("running_var"):
      value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
  net.eval()
  x = torch.randn(1, 3, 45, 61, generator=gen)
  with torch.no_grad():
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    ref = net.layer3(net.layer2(net.layer1(h))).permute(0, 2, 3, 1).numpy()
  from tests import test_convert_resnet  # pylint: disable=import-outside-toplevel
  arrays = test_convert_resnet.convert_resnet.convert_torchvision(
      {k: v.numpy() for k, v in state.items()})
  trunk = resnet.ResNetC4(depth=50)
  params = test_convert_resnet.nest({k: v for k, v in arrays.items()
                                     if not k.startswith("layer4.")})
  out = trunk.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-3, atol=1e-3)
