"""Tests for the ResNet-FPN backbone: levels and sizes, freezing, nearest upsampling, ImageNet
weights, and equality with torchvision's `fasterrcnn_resnet50_fpn` trunk."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import train
from frcnn_jax.config import build
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models.backbones import resnet_fpn
from frcnn_jax.models.registry import BACKBONES
from tests import test_convert_resnet
from tests.plugins import common

TINY = {"width": 1 / 32, "blocks": (1, 1, 1, 1), "fpn_channels": 8}
_SCRIPT = (pathlib.Path(__file__).resolve().parents[3] / "scripts"
           / "convert_torchvision_detector.py")


def _converter():
  spec = importlib.util.spec_from_file_location("convert_torchvision_detector", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _names(tree):
  return {"/".join(str(getattr(e, "key", e)) for e in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random_params(tree, seed):
  """Random values for every leaf; variances positive."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = str(getattr(path[-1], "key", path[-1]))
    value = (rng.uniform(0.5, 1.5, leaf.shape) if name == "running_var"
             else rng.normal(0.0, 0.5, leaf.shape))
    out.append(jnp.asarray(value, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def test_registered_with_its_properties_and_tree_layout():
  assert BACKBONES.get("resnet_fpn") is resnet_fpn.ResNetFPN
  trunk = resnet_fpn.ResNetFPN()
  assert (trunk.stride, trunk.strides, trunk.roi_levels, trunk.out_channels) == (
      32, (4, 8, 16, 32, 64), 4, 256)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = {k: v.shape for k, v in _names(
      jax.eval_shape(trunk.init, jax.random.key(0), images)["params"]).items()}
  tops = {name.split("/")[0] for name in shapes}
  assert tops == {"conv1", "bn1", "fpn", *(f"layer{i + 1}.{j}"
                                           for i, n in enumerate((3, 4, 6, 3)) for j in range(n))}
  for i, cin in enumerate((256, 512, 1024, 2048)):
    assert shapes[f"fpn/inner_blocks.{i}/kernel"] == (1, 1, cin, 256)
    assert shapes[f"fpn/layer_blocks.{i}/kernel"] == (3, 3, 256, 256)
    assert shapes[f"fpn/layer_blocks.{i}/bias"] == (256,)
  assert shapes["layer4.0/downsample.0/kernel"] == (1, 1, 1024, 2048)
  assert "layer4.3/conv1/kernel" not in shapes
  deep = _names(jax.eval_shape(resnet_fpn.ResNetFPN(depth=101).init, jax.random.key(0),
                               images)["params"])
  assert "layer3.22/conv3/kernel" in deep and "layer3.23/conv3/kernel" not in deep
  assert resnet_fpn.ResNetFPN.all_frozen == {"trainable_layers": 0, "freeze_fpn": True}


@pytest.mark.parametrize("hw", [(64, 96), (100, 140), (33, 47), (17, 200)])
def test_levels_shapes_and_output_hw_for_any_canvas(hw):
  trunk = resnet_fpn.ResNetFPN(**TINY)
  x = jnp.zeros((2, *hw, 3))
  out = jax.eval_shape(lambda: trunk.apply(trunk.init(jax.random.key(0), x), x))
  assert isinstance(out, tuple) and len(out) == 5
  assert tuple(level.shape[1:3] for level in out) == trunk.output_hw(*hw)
  assert all(level.shape[0] == 2 and level.shape[3] == 8 for level in out)
  ceil = lambda size, n: -(-size // n)
  sides = [hw[0]]
  for _ in range(6):   # conv1, pool, layer2 .. layer4, P6: each halves rounding up
    sides.append(ceil(sides[-1], 2))
  assert [h for h, _ in trunk.output_hw(*hw)] == sides[2:]
  if hw[0] % 32 == 0 and hw[1] % 32 == 0:   # P2 .. P5 exactly 1 / stride; P6 = ceil(P5 / 2)
    assert trunk.output_hw(*hw)[:4] == tuple((hw[0] // s, hw[1] // s) for s in trunk.strides[:4])


def test_fpn_init_is_kaiming_uniform_a1_with_zero_bias():
  fpn = resnet_fpn.FPN(channels=64)
  features = [jnp.zeros((1, 8 // 2**i, 8 // 2**i, 16 * 2**i)) for i in range(4)]
  params = jax.jit(fpn.init)(jax.random.key(0), features)["params"]
  kernel = np.asarray(params["layer_blocks.0"]["kernel"])   # fan_in 3 * 3 * 64
  bound = np.sqrt(3.0 / (3 * 3 * 64))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.05)
  assert params["inner_blocks.3"]["kernel"].shape == (1, 1, 128, 64)
  assert not np.any(np.asarray(params["inner_blocks.3"]["bias"]))


def _tiny_shapes(**kw):
  """The tiny trunk's parameter tree as shapes (no compilation)."""
  trunk = resnet_fpn.ResNetFPN(**{**TINY, **kw})
  return trunk, jax.eval_shape(trunk.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]


@pytest.mark.parametrize("trainable_layers,freeze_fpn", [(3, False), (5, False), (0, True)])
def test_frozen_layers_get_no_gradient_and_are_masked(trainable_layers, freeze_fpn):
  trunk, shapes = _tiny_shapes(trainable_layers=trainable_layers, freeze_fpn=freeze_fpn)
  params = _random_params(shapes, 3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
  loss = lambda p: sum(jnp.sum(level ** 2) for level in trunk.apply({"params": p}, x))
  grads = _names(jax.jit(jax.grad(loss))(params))
  mask = _names(trunk.trainable(params))
  trained = {name for i, name in enumerate(("layer4", "layer3", "layer2", "layer1", "conv1"))
             if i < trainable_layers}
  moved = set()
  for name, grad in grads.items():
    keys = name.split("/")
    if keys[0] == "fpn":
      frozen = freeze_fpn
    else:   # layer1 is frozen at trainable_layers 3 although C2 feeds the pyramid
      frozen = (keys[-2].startswith("bn") or keys[-2] == "downsample.1"
                or keys[0].split(".")[0] not in trained)
    assert mask[name] is (not frozen), name
    if frozen:
      assert not np.any(np.asarray(grad)), name
    elif np.any(np.asarray(grad)):
      moved.add(keys[0])
  assert moved == {top for name, top in ((n, n.split("/")[0]) for n in mask) if mask[name]}


def test_all_frozen_masks_the_whole_trunk():
  trunk, shapes = _tiny_shapes(**resnet_fpn.ResNetFPN.all_frozen)
  assert not any(jax.tree.leaves(trunk.trainable(shapes)))
  trunk, _ = _tiny_shapes(trainable_layers=0)   # torchvision's 0: the pyramid still trains
  mask = trunk.trainable(shapes)
  assert all(jax.tree.leaves(mask["fpn"])) and not any(jax.tree.leaves(mask["layer4.0"]))
  with pytest.raises(ValueError, match="trainable_layers"):
    resnet_fpn.ResNetFPN(trainable_layers=6, **TINY).trainable(shapes)


def _exact_nearest(in_size, out_size):
  """NumPy reference: floor(dst * in / out) in integer arithmetic."""
  return np.arange(out_size) * in_size // out_size


@pytest.mark.parametrize("coarse", [1, 2, 3, 7, 13, 25])
def test_nearest_indices_are_exact_floor_for_pyramid_sizes(coarse):
  for fine in (2 * coarse, 2 * coarse - 1):   # a finer level is twice (or 2x - 1) a coarser
    if fine < 1:
      continue
    index = resnet_fpn.nearest_indices(coarse, fine)
    np.testing.assert_array_equal(index, _exact_nearest(coarse, fine))
    np.testing.assert_array_equal(index, np.arange(fine) >> 1)
  x = np.random.default_rng(0).normal(size=(2, coarse, coarse + 1, 3)).astype(np.float32)
  size = (2 * coarse - 1, 2 * coarse + 2)
  rows, cols = _exact_nearest(coarse, size[0]), _exact_nearest(coarse + 1, size[1])
  np.testing.assert_array_equal(np.asarray(resnet_fpn.upsample_nearest(jnp.asarray(x), size)),
                                x[:, rows][:, :, cols])


def test_nearest_indices_equal_torch_interpolate_for_all_small_sizes():
  torch = pytest.importorskip("torch")
  pairs = [(i, o) for i in range(1, 17) for o in range(1, 17)]
  pairs += [(i, o) for i in range(17, 60) for o in (2 * i - 1, 2 * i, 3 * i - 1)]
  x = torch.arange(60, dtype=torch.float64)[None, None, :, None]
  for in_size, out_size in pairs:
    ref = torch.nn.functional.interpolate(x[:, :, :in_size], size=(out_size, 1),
                                          mode="nearest")[0, 0, :, 0].numpy().astype(np.int64)
    np.testing.assert_array_equal(resnet_fpn.nearest_indices(in_size, out_size), ref,
                                  err_msg=f"{in_size} -> {out_size}")
  x = np.random.default_rng(1).normal(size=(1, 5, 7, 2)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(12, 9),
                                        mode="nearest").permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(np.asarray(resnet_fpn.upsample_nearest(jnp.asarray(x), (12, 9))),
                                ref)


def test_fpn_equals_torchvisions_feature_pyramid_on_odd_sizes():
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  from torchvision.ops import feature_pyramid_network as tv_fpn  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  channels = (4, 8, 16, 32)
  net = torchvision.ops.FeaturePyramidNetwork(list(channels), 6,
                                              extra_blocks=tv_fpn.LastLevelMaxPool()).eval()
  gen = torch.Generator().manual_seed(1)
  for module in net.modules():   # non-zero biases
    if isinstance(module, torch.nn.Conv2d):
      module.bias.data.copy_(torch.randn(module.bias.shape, generator=gen))
  sides = [(25, 35)]
  for _ in range(3):
    sides.append(tuple(-(-s // 2) for s in sides[-1]))
  inputs = [torch.randn(1, c, *hw, generator=gen) for c, hw in zip(channels, sides)]
  with torch.no_grad():
    ref = list(net({str(i): x for i, x in enumerate(inputs)}).values())
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  params = {}
  for key, value in state.items():
    blocks, index, _, leaf = key.split(".")
    params.setdefault(f"{blocks}.{index}", {})[
        "kernel" if leaf == "weight" else "bias"] = jnp.asarray(
            value.transpose(2, 3, 1, 0) if value.ndim == 4 else value)
  out = jax.jit(resnet_fpn.FPN(channels=6).apply)(
      {"params": params}, [jnp.asarray(x.permute(0, 2, 3, 1).numpy()) for x in inputs])
  assert len(out) == len(ref) == 5
  for level, expected in zip(out, ref):
    np.testing.assert_allclose(np.asarray(level), expected.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-5, atol=1e-5)


def _imagenet_file(tmp_path, blocks=(1, 2, 1, 1)):
  """A converted tiny ImageNet ResNet (scripts/convert_resnet.py) with these blocks."""
  convert = test_convert_resnet.convert_resnet
  path = str(tmp_path / f"r50_{len(blocks)}.npz")
  state = test_convert_resnet.torchvision_state_dict(blocks=blocks)
  convert.save(convert.convert_torchvision(state), "torchvision", False, path)
  return path, state


def _network_params(**kw):
  trunk, shapes = _tiny_shapes(**kw)
  return trunk, {"trunk": shapes, "rpn": {}, "head": {}}


def test_load_pretrained_imagenet_fills_the_body_with_layer4_and_keeps_the_fpn(tmp_path):
  path, state = _imagenet_file(tmp_path)
  trunk, params = _network_params(blocks=(1, 2, 1, 1))
  loaded = trunk.load_pretrained(params, path, "torchvision")
  np.testing.assert_array_equal(loaded["trunk"]["layer4.0"]["conv2"]["kernel"],
                                state["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["trunk"]["layer2.1"]["bn3"]["running_var"],
                                state["layer2.1.bn3.running_var"])
  assert loaded["trunk"]["fpn"]["inner_blocks.2"]["kernel"] is (   # left as it was
      params["trunk"]["fpn"]["inner_blocks.2"]["kernel"])


def test_load_pretrained_names_the_misfit(tmp_path):
  path, _ = _imagenet_file(tmp_path)
  trunk, params = _network_params(blocks=(1, 2, 1, 1), width=1 / 16)
  with pytest.raises(ValueError, match=r"conv1/kernel has shape .*resnet_fpn.*width=0.0625"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, params = _network_params()
  with pytest.raises(ValueError, match=r"layer2.1/conv1/kernel does not exist.*blocks=\(1, 1"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, params = _network_params(blocks=(1, 2, 1, 2))
  with pytest.raises(ValueError, match=r"the file has no layer4.1/"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, params = _network_params(blocks=(1, 2, 1, 1))
  with pytest.raises(ValueError, match="input_norm='torchvision'"):
    trunk.load_pretrained(params, path, "keras")
  trunk, params = _network_params(blocks=(1, 2, 1, 1), stride_in_1x1=True)
  with pytest.raises(ValueError, match="stride_in_1x1"):
    trunk.load_pretrained(params, path, "torchvision")
  path3, _ = _imagenet_file(tmp_path, blocks=(1, 2, 1))   # a file without layer4
  trunk, params = _network_params(blocks=(1, 2, 1, 1))
  with pytest.raises(ValueError, match=r"the file has no layer4.0/"):
    trunk.load_pretrained(params, path3, "torchvision")


FPN_RUN = {
    "model.backbone": "resnet_fpn", "model.resnet_fpn.width": 1 / 32,
    "model.resnet_fpn.blocks": (1, 1, 1, 1), "model.resnet_fpn.fpn_channels": 8,
    "model.input_norm": "torchvision", "model.roi_op": "roi_align", "model.roi_size": 4,
    "model.rpn_objectness": "sigmoid", "anchors.style": "torchvision",
    "anchors.sizes": (8, 16, 32, 64, 128), "anchors.ratios": (0.5, 1.0, 2.0),
    "rpn.proposal_style": "torchvision", "rpn.min_size": 1e-3, "rpn.pre_nms_top_n_train": 32,
    "rpn.pre_nms_top_n_test": 32,
}


@pytest.mark.slow
def test_tiny_fpn_detector_trains_and_evaluates(tmp_path):
  """Multi-level features through the whole detector: per-level anchors and proposals, the
  shared RPN head, MultiScaleRoIAlign, training and evaluation."""
  config = config_flags.load_config(common.SHAPES, {**common.TINY, **FPN_RUN})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  common.check_trained(result, config)
  params = result["params"]
  assert params["rpn"]["conv"]["kernel"].shape == (3, 3, 8, 8)   # one head for the 5 levels
  assert params["head"]["fc6"]["kernel"].shape[0] == 4 * 4 * 8


@pytest.mark.parametrize("overrides,message", [
    ({"model.roi_op": "roi_pool"}, "model.roi_op"),
    ({"rpn.proposal_style": "py-faster-rcnn"}, "rpn.proposal_style"),
    ({"anchors.sizes": (32, 64, 128)}, "anchors.sizes"),
])
def test_combinations_that_cannot_work_name_the_key(overrides, message):
  config = config_flags.load_config(common.SHAPES, {**common.TINY, **FPN_RUN, **overrides})
  with pytest.raises(ValueError, match=message):
    build.check(config)
