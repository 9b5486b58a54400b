"""Tests for scripts/convert_resnet.py and `ResNetC4.load_pretrained` on state dicts built here."""

import importlib.util
import pathlib

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models.backbones import resnet
from frcnn_jax.models.roi_heads import res5
from frcnn_jax.models.roi_heads.pooling import RoIPooler

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_resnet.py"
_spec = importlib.util.spec_from_file_location("convert_resnet", _SCRIPT)
convert_resnet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_resnet)

WIDTH = 1 / 32
BLOCKS = (1, 2, 1, 1)     # layer1 .. layer4 of the small net the tests build


def _bn(rng, prefix, channels):
  return {f"{prefix}.weight": rng.normal(1.0, 0.1, channels),
          f"{prefix}.bias": rng.normal(0.0, 0.1, channels),
          f"{prefix}.running_mean": rng.normal(0.0, 0.1, channels),
          f"{prefix}.running_var": rng.uniform(0.5, 1.5, channels),
          f"{prefix}.num_batches_tracked": np.asarray(7)}


def torchvision_state_dict(seed=0, width=WIDTH, blocks=BLOCKS):
  """torchvision's resnet key names and [out, in, kh, kw] shapes, at a reduced width."""
  rng = np.random.default_rng(seed)
  c = lambda base: resnet.scaled_channels(base, width)
  conv = lambda cout, cin, k: rng.normal(0.0, 0.3, (cout, cin, k, k))
  state = {"conv1.weight": conv(c(64), 3, 7), **_bn(rng, "bn1", c(64))}
  cin = c(64)
  for stage, (n, planes) in enumerate(zip(blocks, resnet.PLANES), 1):
    for j in range(n):
      p = f"layer{stage}.{j}"
      cout = c(planes * 4)
      state.update({f"{p}.conv1.weight": conv(c(planes), cin, 1), **_bn(rng, f"{p}.bn1", c(planes)),
                    f"{p}.conv2.weight": conv(c(planes), c(planes), 3),
                    **_bn(rng, f"{p}.bn2", c(planes)),
                    f"{p}.conv3.weight": conv(cout, c(planes), 1), **_bn(rng, f"{p}.bn3", cout)})
      if j == 0:
        state.update({f"{p}.downsample.0.weight": conv(cout, cin, 1),
                      **_bn(rng, f"{p}.downsample.1", cout)})
      cin = cout
  state.update({"fc.weight": rng.normal(size=(1000, cin)), "fc.bias": np.zeros(1000)})
  return {k: np.asarray(v, np.float32 if v.ndim else np.int64) for k, v in state.items()}


def nest(arrays):
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}} of jnp arrays."""
  out = {}
  for name, value in arrays.items():
    node = out
    *keys, leaf = name.split("/")
    for key in keys:
      node = node.setdefault(key, {})
    node[leaf] = jnp.asarray(value)
  return out


def _model_params(width=WIDTH, blocks=BLOCKS, **kw):
  trunk = resnet.ResNetC4(width=width, blocks=blocks[:3], **kw)
  head = res5.Res5Head(width=width, blocks=blocks[3], num_classes=2,
                       pooler=RoIPooler("roi_align", 4), **kw)
  features = jnp.zeros((1, 2, 2, trunk.out_channels))
  params = {"trunk": trunk.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"],
            "rpn": {},
            "head": head.init(jax.random.key(1), features, jnp.zeros((1, 1, 4)))["params"]}
  return trunk, params


def _names(tree):
  return {"/".join(str(getattr(e, "key", e)) for e in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_torchvision_state_dict_maps_onto_the_parameters_one_to_one(tmp_path):
  state = torchvision_state_dict()
  np.savez(tmp_path / "state.npz", **state)
  out = tmp_path / "r50.npz"
  convert_resnet.main(["--input", str(tmp_path / "state.npz"), "--output", str(out)])
  trunk, params = _model_params()
  with np.load(out) as data:
    arrays = {k: data[k] for k in data.files if "/" in k}
    assert str(data["input_norm"]) == "torchvision" and not bool(data["stride_in_1x1"])
  expected = {**_names(params["trunk"]),
              **{k: v for k, v in _names(params["head"]).items() if k.startswith("layer4.")}}
  assert {k: v.shape for k, v in arrays.items()} == expected
  np.testing.assert_array_equal(arrays["layer1.0/conv2/kernel"],
                                state["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
  loaded = trunk.load_pretrained(params, str(out), "torchvision")
  np.testing.assert_array_equal(loaded["trunk"]["layer2.1"]["bn3"]["running_var"],
                                state["layer2.1.bn3.running_var"])
  np.testing.assert_array_equal(loaded["head"]["layer4.0"]["downsample.0"]["kernel"],
                                state["layer4.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["head"]["cls"]["kernel"], params["head"]["cls"]["kernel"])
  with pytest.raises(SystemExit):   # no overwrite without --overwrite
    convert_resnet.main(["--input", str(tmp_path / "state.npz"), "--output", str(out)])


def test_load_pretrained_names_the_misfit(tmp_path):
  path = str(tmp_path / "r50.npz")
  convert_resnet.save(convert_resnet.convert_torchvision(torchvision_state_dict()),
                      "torchvision", False, path)
  trunk, params = _model_params(width=1 / 16)
  with pytest.raises(ValueError, match=r"conv1/kernel has shape .*resnet_c4"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, params = _model_params(blocks=(1, 1, 1, 1))
  with pytest.raises(ValueError, match=r"layer2.1/conv1/kernel does not exist.*blocks=\(1, 1, 1\)"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, params = _model_params(blocks=(1, 2, 2, 1))
  with pytest.raises(ValueError, match=r"the file has no layer3.1/"):
    trunk.load_pretrained(params, path, "torchvision")
  trunk, params = _model_params()
  with pytest.raises(ValueError, match="input_norm='torchvision'"):
    trunk.load_pretrained(params, path, "keras")
  trunk, params = _model_params(stride_in_1x1=True)
  with pytest.raises(ValueError, match="stride_in_1x1"):
    trunk.load_pretrained(params, path, "torchvision")
  with pytest.raises(ValueError, match="not a torchvision ResNet state dict key"):
    convert_resnet.convert_torchvision({"features.0.weight": np.zeros((1, 1, 1, 1))})


def _keras_file(path, state):
  """Writes Keras ResNet50 layer names (conv1_conv, conv2_block1_1_conv ...) from `state`."""
  rng = np.random.default_rng(5)
  layers = {}
  for key in state:
    if not key.endswith(".running_var"):
      continue
    prefix = key[:-len(".running_var")]
    parts = prefix.split(".")
    if prefix == "bn1":
      base = "conv1"
      conv_key = "conv1.weight"
    else:
      stage, block = int(parts[0][len("layer"):]), int(parts[1])
      index = 0 if parts[2] == "downsample" else int(parts[2][2:])
      base = f"conv{stage + 1}_block{block + 1}_{index}"
      conv_key = f"{'.'.join(parts[:2])}." + (
          "downsample.0" if index == 0 else f"conv{index}") + ".weight"
    kernel = state[conv_key].transpose(2, 3, 1, 0)
    layers[f"{base}_conv"] = {"kernel:0": kernel,
                              "bias:0": rng.normal(0, 0.1, kernel.shape[-1])}
    layers[f"{base}_bn"] = {"gamma:0": state[f"{prefix}.weight"], "beta:0": state[f"{prefix}.bias"],
                            "moving_mean:0": state[f"{prefix}.running_mean"],
                            "moving_variance:0": state[f"{prefix}.running_var"]}
  layers["pool1_pad"] = {}
  layers["probs"] = {"kernel:0": np.zeros((4, 3)), "bias:0": np.zeros(3)}
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n in layers]
    for name, weights in layers.items():
      group = f.create_group(name)
      group.attrs["weight_names"] = [f"{name}/{w}".encode() for w in weights]
      for w, value in weights.items():
        group.create_dataset(f"{name}/{w}", data=np.asarray(value, np.float32))
  return layers


def test_keras_h5_folds_conv_bias_and_eps_into_frozen_batch_norm(tmp_path):
  state = torchvision_state_dict(seed=3)
  layers = _keras_file(tmp_path / "r50.h5", state)
  out = tmp_path / "r50_keras.npz"
  convert_resnet.main(["--input", str(tmp_path / "r50.h5"), "--output", str(out)])
  trunk, params = _model_params(stride_in_1x1=True)
  with np.load(out) as data:
    arrays = {k: data[k] for k in data.files if "/" in k}
    assert str(data["input_norm"]) == "keras" and bool(data["stride_in_1x1"])
  assert set(arrays) == set(convert_resnet.convert_torchvision(state))
  loaded = trunk.load_pretrained(params, str(out), "keras")
  # Keras: bn(conv(x) + b) with eps 1.001e-5 equals ours: frozen_bn(conv(x)) with the fold.
  conv, bn = layers["conv3_block1_2_conv"], layers["conv3_block1_2_bn"]
  y = np.random.default_rng(0).normal(size=(4, conv["kernel:0"].shape[-1]))
  keras = ((y + conv["bias:0"] - bn["moving_mean:0"])
           / np.sqrt(bn["moving_variance:0"] + 1.001e-5) * bn["gamma:0"] + bn["beta:0"])
  ours = resnet.FrozenBatchNorm().apply({"params": loaded["trunk"]["layer2.0"]["bn2"]},
                                        jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(np.asarray(ours), keras, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(loaded["head"]["layer4.0"]["downsample.0"]["kernel"],
                                layers["conv5_block1_0_conv"]["kernel:0"])
  del layers["conv2_block1_1_bn"]
  with pytest.raises(ValueError, match="conv2_block1_1_conv"):
    convert_resnet.convert_keras({k: {w.split(":")[0]: v for w, v in ws.items()}
                                  for k, ws in layers.items()})
