"""Tests for scripts/convert_torchvision_detector.py and `ResNetFPN.load_pretrained` on whole
torchvision `fasterrcnn_resnet50_fpn` state dicts built here."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models import rpn
from frcnn_jax.models.backbones import resnet
from frcnn_jax.models.backbones import resnet_fpn
from frcnn_jax.models.roi_heads import fc
from frcnn_jax.models.roi_heads.pooling import RoIPooler

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_torchvision_detector.py"
_spec = importlib.util.spec_from_file_location("convert_torchvision_detector", _SCRIPT)
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

TV_NUM_CLASSES = 3   # torchvision's num_classes counts the background
NUM_CLASSES = 2      # ours: foreground classes
ANCHORS = 3          # torchvision's per location: one size per level x 3 aspect ratios
FPN_CHANNELS = 256
DIM = 1024


@pytest.fixture(scope="module")
def detector():
  """A seeded fasterrcnn_resnet50_fpn (eval mode) with non-trivial batch norm and biases."""
  torch.manual_seed(0)
  net = torchvision.models.detection.fasterrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=TV_NUM_CLASSES)
  gen = torch.Generator().manual_seed(1)
  for key, value in net.state_dict().items():
    if key.endswith("running_var"):
      value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
    elif key.endswith(("bias", "running_mean")):
      value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
  return net.eval()


@pytest.fixture(scope="module")
def state(detector):
  return {k: v.numpy() for k, v in detector.state_dict().items()}


def _names(tree, prefix=""):
  return {prefix + "/".join(str(getattr(e, "key", e)) for e in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _network(num_classes=NUM_CLASSES, **trunk_kw):
  """(trunk, rpn head, fc head, the network's params as shapes: "trunk", "rpn", "head")."""
  trunk = resnet_fpn.ResNetFPN(**trunk_kw)
  rpn_head = rpn.RPNHead(num_anchors=ANCHORS, channels=FPN_CHANNELS, objectness="sigmoid")
  head = fc.FCHead(dim=DIM, dropout=0.0, num_classes=num_classes,
                   pooler=RoIPooler("roi_pool", 7, spatial_scale=1.0))
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  init = lambda module, *args: jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  params = {"trunk": init(trunk, shape(1, 64, 64, 3)),
            "rpn": init(rpn_head, shape(1, 8, 8, FPN_CHANNELS)),
            "head": init(head, shape(1, 7, 7, FPN_CHANNELS), shape(1, 1, 4))}
  return trunk, rpn_head, head, params


def test_state_dict_maps_one_to_one_onto_the_network(state):
  arrays = convert.convert_detector(state)
  _, _, _, params = _network()
  expected = {}
  for module in ("trunk", "rpn", "head"):
    expected.update({k: v.shape for k, v in _names(params[module], module + "/").items()})
  assert {k: v.shape for k, v in arrays.items()} == expected
  assert all(v.dtype == np.float32 for v in arrays.values())
  num_arrays = sum(1 for k in state if not k.endswith("num_batches_tracked"))
  assert len(arrays) == num_arrays
  np.testing.assert_array_equal(arrays["trunk/layer3.5/conv2/kernel"],
                                state["backbone.body.layer3.5.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arrays["trunk/fpn/layer_blocks.2/bias"],
                                state["backbone.fpn.layer_blocks.2.0.bias"])
  np.testing.assert_array_equal(arrays["rpn/deltas/kernel"][0, 0],
                                state["rpn.head.bbox_pred.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(arrays["head/box/kernel"],
                                state["roi_heads.box_predictor.bbox_pred.weight"].T)


def test_fc6_permutation_makes_fc_head_equal_torchvisions_box_head(detector, state):
  arrays = convert.convert_detector(state)
  _, _, head, _ = _network()
  params = {k[len("head/"):]: v for k, v in arrays.items() if k.startswith("head/")}
  tree = {}
  for name, value in params.items():
    layer, leaf = name.split("/")
    tree.setdefault(layer, {})[leaf] = jnp.asarray(value)
  pooled = torch.randn(5, FPN_CHANNELS, 7, 7, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    scores, deltas = detector.roi_heads.box_predictor(detector.roi_heads.box_head(pooled))
  # Each RoI's 7 x 7 map as one image, pooled by a 7 x 7 roi_pool of the whole map: identity.
  features = jnp.asarray(pooled.permute(0, 2, 3, 1).numpy())
  rois = jnp.tile(jnp.asarray([[[0.0, 0.0, 6.0, 6.0]]]), (5, 1, 1))
  logits, box = jax.jit(head.apply)({"params": tree}, features, rois)
  np.testing.assert_allclose(np.asarray(logits[:, 0]), scores.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(box[:, 0]), deltas.numpy().reshape(5, NUM_CLASSES + 1, 4),
                             rtol=1e-4, atol=1e-5)


def test_rpn_head_outputs_in_torchvisions_anchor_order(detector, state):
  arrays = convert.convert_detector(state)
  _, rpn_head, _, _ = _network()
  tree = {}
  for name, value in arrays.items():
    if name.startswith("rpn/"):
      _, layer, leaf = name.split("/")
      tree.setdefault(layer, {})[leaf] = jnp.asarray(value)
  x = torch.randn(1, FPN_CHANNELS, 5, 6, generator=torch.Generator().manual_seed(4))
  with torch.no_grad():
    (ref_logits,), (ref_deltas,) = detector.rpn.head([x])
  logits, deltas = jax.jit(rpn_head.apply)({"params": tree},
                                           jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  # torchvision's permute_and_flatten: (row, col, anchor) then the 1 or 4 values.
  ref_logits = ref_logits.permute(0, 2, 3, 1).reshape(1, -1, 1).numpy()
  ref_deltas = ref_deltas.view(1, ANCHORS, 4, 5, 6).permute(0, 3, 4, 1, 2).reshape(1, -1, 4)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(deltas), ref_deltas.numpy(), rtol=1e-4, atol=1e-5)


def test_bn_eps_folds_into_the_frozen_batch_norm(state):
  arrays = convert.convert_detector(state, bn_eps=0.0)
  p = {leaf: arrays[f"trunk/layer2.0/bn2/{leaf}"] for leaf in convert.BN_LEAVES}
  x = np.random.default_rng(0).normal(size=(3, p["weight"].shape[0])).astype(np.float32)
  ours = resnet.FrozenBatchNorm().apply({"params": p}, jnp.asarray(x))
  t = {leaf: state[f"backbone.body.layer2.0.bn2.{leaf}"] for leaf in convert.BN_LEAVES}
  eps0 = (x - t["running_mean"]) / np.sqrt(t["running_var"]) * t["weight"] + t["bias"]
  np.testing.assert_allclose(np.asarray(ours), eps0, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(arrays["trunk/layer2.0/bn2/running_var"], t["running_var"])


def test_not_a_detector_state_dict_is_refused(state):
  resnet50 = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
  with pytest.raises(ValueError, match="'conv1.weight' is not a key of torchvision's"):
    convert.convert_detector(resnet50)
  with pytest.raises(ValueError, match="'rpn.head.conv.1.0.weight' is not a key"):   # v2's RPN
    convert.convert_detector({**state, "rpn.head.conv.1.0.weight": np.zeros((1, 1, 3, 3))})
  with pytest.raises(ValueError, match="roi_heads.mask_head"):
    convert.convert_detector({**state, "roi_heads.mask_head.mask_fcn1.0.weight": np.zeros(1)})
  backbone_only = {k: v for k, v in state.items() if k.startswith("backbone.")}
  with pytest.raises(ValueError, match=r"no \['rpn/conv/kernel'.*'head/box/kernel'\]"):
    convert.convert_detector(backbone_only)
  with pytest.raises(ValueError, match="fc6.weight' has shape .* expected a 2-D array"):
    convert.convert_detector({**state, "roi_heads.box_head.fc6.weight": np.zeros((4, 4, 1, 1))})
  odd = {**state, "roi_heads.box_head.fc6.weight": np.zeros((DIM, FPN_CHANNELS * 50))}
  with pytest.raises(ValueError, match="not C x r x r pooled features"):
    convert.convert_detector(odd)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, detector):
  """(the command line's .npz of the detector's .pth, the .pth)."""
  folder = tmp_path_factory.mktemp("convert")
  torch.save(detector.state_dict(), folder / "frcnn.pth")
  out = folder / "weights" / "frcnn.npz"
  convert.main(["--input", str(folder / "frcnn.pth"), "--output", str(out)])
  return out, folder / "frcnn.pth"


def test_cli_round_trip_loads_every_parameter(converted):
  out, pth = converted
  with np.load(out) as data:
    assert str(data["input_norm"]) == "torchvision" and not bool(data["stride_in_1x1"])
    assert int(data["num_classes"]) == NUM_CLASSES and float(data["bn_eps"]) == 1e-5
    arrays = {k: data[k] for k in data.files if "/" in k}
  trunk, _, _, params = _network()
  loaded = trunk.load_pretrained(params, str(out), "torchvision")
  for module in ("trunk", "rpn", "head"):
    for name, value in _names(loaded[module], module + "/").items():
      np.testing.assert_array_equal(np.asarray(value), arrays[name], err_msg=name)
  with pytest.raises(SystemExit):   # no overwrite without --overwrite
    convert.main(["--input", str(pth), "--output", str(out), "--bn_eps", "0"])
  other = out.parent / "eps0.npz"
  convert.main(["--input", str(pth), "--output", str(other), "--bn_eps", "0"])
  with np.load(other) as data:
    assert float(data["bn_eps"]) == 0.0
    assert not np.array_equal(data["trunk/bn1/weight"], arrays["trunk/bn1/weight"])


def test_load_pretrained_names_the_misfit(converted):
  path = str(converted[0])
  trunk, _, _, params = _network(num_classes=5)
  with pytest.raises(ValueError, match=r"head/cls/kernel has shape \(1024, 3\), the model "
                     r"expects \(1024, 6\).*the file's 2 classes \(torchvision's num_classes=3"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, _, _, params = _network(depth=101)
  with pytest.raises(ValueError, match=r"the file has no layer3\.\d+/.*depth=101"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, _, _, params = _network(fpn_channels=128)
  with pytest.raises(ValueError, match=r"trunk/fpn/inner_blocks.0/kernel has shape"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, _, _, params = _network()
  params["rpn"] = jax.eval_shape(
      rpn.RPNHead(num_anchors=ANCHORS, channels=FPN_CHANNELS).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 8, 8, FPN_CHANNELS), jnp.float32))["params"]   # softmax: 2k
  with pytest.raises(ValueError, match=r"rpn/objectness/kernel has shape.*sigmoid"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, _, _, params = _network()
  del params["head"]["fc7"]
  with pytest.raises(ValueError, match=r"head/fc7/kernel does not exist.*TwoMLPHead"):
    trunk.load_pretrained(params, path, "torchvision")
  with pytest.raises(ValueError, match="input_norm='torchvision'"):
    trunk.load_pretrained(params, path, "caffe")
