"""Tests for scripts/convert_vgg16.py: torchvision and Keras VGG16 weights -> frcnn_jax .npz."""

import importlib.util
import pathlib

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models import faster_rcnn
from tests.models import tiny

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_vgg16.py"
_spec = importlib.util.spec_from_file_location("convert_vgg16", _SCRIPT)
convert_vgg16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_vgg16)

CHANNELS = (4, 8, 16, 32, 32)      # VGG16 at width 1/16
CONVS = (2, 2, 3, 3, 3)
FC_DIM = 16
ROI = 7
TORCH_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _layers(rng):
  """Random conv weights as a list of (block, conv, w [3, 3, in, out], b [out])."""
  layers, cin = [], 3
  for block, (n, cout) in enumerate(zip(CONVS, CHANNELS), 1):
    for i in range(1, n + 1):
      w = rng.normal(0, np.sqrt(2.0 / (9 * cin)), (3, 3, cin, cout)).astype(np.float32)
      layers.append((block, i, w, rng.normal(0, 0.1, cout).astype(np.float32)))
      cin = cout
  return layers


def _fc(rng):
  fc6 = rng.normal(0, 0.02, (ROI, ROI, CHANNELS[-1], FC_DIM)).astype(np.float32)  # HWC in
  fc7 = rng.normal(0, 0.1, (FC_DIM, FC_DIM)).astype(np.float32)
  return fc6, rng.normal(0, 0.1, FC_DIM).astype(np.float32), fc7, rng.normal(
      0, 0.1, FC_DIM).astype(np.float32)


def _torch_state_dict(layers, fc):
  """Numpy arrays under torchvision's VGG16 key names and layouts."""
  state = {}
  for index, (_, _, w, b) in zip(TORCH_CONV_INDICES, layers):
    state[f"features.{index}.weight"] = w.transpose(3, 2, 0, 1)   # OIHW
    state[f"features.{index}.bias"] = b
  fc6, b6, fc7, b7 = fc
  state["classifier.0.weight"] = fc6.transpose(3, 2, 0, 1).reshape(FC_DIM, -1)  # CHW flatten
  state["classifier.0.bias"] = b6
  state["classifier.3.weight"] = fc7.T
  state["classifier.3.bias"] = b7
  state["classifier.6.weight"] = np.zeros((10, FC_DIM), np.float32)
  state["classifier.6.bias"] = np.zeros(10, np.float32)
  return state


def _write_keras_h5(path, layers, fc):
  """Keras's HDF5 weights layout (keras.applications *_tf_kernels.h5)."""
  entries = [("input_1", [])]
  for block, i, w, b in layers:
    entries.append((f"block{block}_conv{i}", [("kernel:0", w), ("bias:0", b)]))
    if i == CONVS[block - 1]:
      entries.append((f"block{block}_pool", []))
  fc6, b6, fc7, b7 = fc
  entries += [("flatten", []), ("fc1", [("kernel:0", fc6.reshape(-1, FC_DIM)), ("bias:0", b6)]),
              ("fc2", [("kernel:0", fc7), ("bias:0", b7)])]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [name.encode() for name, _ in entries]
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.2.4"
    for name, weights in entries:
      group = f.create_group(name)
      group.attrs["weight_names"] = [f"{name}/{w}".encode() for w, _ in weights]
      for w, value in weights:
        group.create_dataset(f"{name}/{w}", data=value)


def _np_trunk(x, layers):
  """Reference VGG trunk on one [H, W, C] image: 3x3 same convs, ReLU, 2x2 floor pools."""
  for block, i, w, b in layers:
    h, wd = x.shape[:2]
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    y = np.zeros((h, wd, w.shape[-1]), np.float64)
    for dy in range(3):
      for dx in range(3):
        y += xp[dy:dy + h, dx:dx + wd] @ w[dy, dx].astype(np.float64)
    x = np.maximum(y + b, 0.0)
    if i == CONVS[block - 1] and block < 5:
      h2, w2 = x.shape[0] // 2, x.shape[1] // 2
      x = x[:2 * h2, :2 * w2].reshape(h2, 2, w2, 2, -1).max(axis=(1, 3))
  return x


def _model(input_norm):
  return faster_rcnn.FasterRCNN(num_classes=2, width=1 / 16, input_norm=input_norm,
                                fc_dim=FC_DIM, frozen_blocks=0)


def _check_model_matches(npz_path, input_norm, layers, fc, reference_input):
  model = _model(input_norm)
  params = faster_rcnn.load_pretrained(tiny.numpy_params(model), npz_path,
                                       input_norm=input_norm)
  image = np.random.default_rng(1).integers(0, 256, (1, 48, 40, 3), dtype=np.uint8)
  features, _, _ = jax.jit(lambda p, x, hw: model.apply(
      {"params": p}, x, hw, method=faster_rcnn.FasterRCNN.features_and_rpn))(
          params, jnp.asarray(image), jnp.asarray([[48, 40]], jnp.int32))
  expected = _np_trunk(reference_input(image[0].astype(np.float64)), layers)
  np.testing.assert_allclose(np.asarray(features[0]), expected, rtol=2e-4, atol=2e-4)
  # fc6 / fc7 of the RoI head against the source's own flattening.
  fc6, b6, fc7, b7 = fc
  pooled = np.random.default_rng(2).normal(size=(ROI, ROI, CHANNELS[-1])).astype(np.float32)
  head = params["head"]
  x = np.maximum(pooled.reshape(-1) @ np.asarray(head["fc6"]["kernel"]) + head["fc6"]["bias"], 0)
  x = x @ np.asarray(head["fc7"]["kernel"]) + head["fc7"]["bias"]
  ref = np.maximum(pooled.reshape(-1) @ fc6.reshape(-1, FC_DIM) + b6, 0) @ fc7 + b7
  np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4)


def _torch_reference_input(image):
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  return (image / 255.0 - mean) / std


def _caffe_reference_input(image):
  return image[..., ::-1] - np.array([102.9801, 115.9465, 122.7717])


def test_torchvision_state_dict_converts_and_matches_reference(tmp_path):
  rng = np.random.default_rng(0)
  layers, fc = _layers(rng), _fc(rng)
  state = _torch_state_dict(layers, fc)
  arrays = convert_vgg16.convert_torchvision(state)
  assert sorted(k.split("/")[0] for k in arrays if k.endswith("kernel")) == sorted(
      [f"conv{b}_{i}" for b, i, _, _ in layers] + ["fc6", "fc7"])
  path = str(tmp_path / "tv.npz")
  convert_vgg16.save(arrays, "torchvision", "torchvision", path)
  _check_model_matches(path, "torchvision", layers, fc, _torch_reference_input)


def test_torch_pth_file_matches_numpy_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  state = _torch_state_dict(_layers(rng), _fc(rng))
  path = str(tmp_path / "vgg16.pth")
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  arrays, input_norm, source = convert_vgg16.convert_file(path)
  assert (input_norm, source) == ("torchvision", "torchvision")
  expected = convert_vgg16.convert_torchvision(state)
  assert arrays.keys() == expected.keys()
  for k in arrays:
    np.testing.assert_array_equal(arrays[k], expected[k])


def test_keras_h5_converts_and_matches_reference(tmp_path):
  rng = np.random.default_rng(0)
  layers, fc = _layers(rng), _fc(rng)
  h5_path = str(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5")
  _write_keras_h5(h5_path, layers, fc)
  arrays, input_norm, source = convert_vgg16.convert_file(h5_path)
  assert (input_norm, source) == ("caffe", "keras")
  path = str(tmp_path / "keras.npz")
  convert_vgg16.save(arrays, input_norm, source, path)
  _check_model_matches(path, "caffe", layers, fc, _caffe_reference_input)


def test_load_pretrained_rejects_mismatches(tmp_path):
  rng = np.random.default_rng(0)
  arrays = convert_vgg16.convert_torchvision(_torch_state_dict(_layers(rng), _fc(rng)))
  path = str(tmp_path / "tv.npz")
  convert_vgg16.save(arrays, "torchvision", "torchvision", path)
  params = tiny.numpy_params(_model("caffe"))
  with pytest.raises(ValueError, match="input_norm"):
    faster_rcnn.load_pretrained(params, path, input_norm="caffe")
  wide = tiny.numpy_params(faster_rcnn.FasterRCNN(num_classes=2, width=1 / 8, fc_dim=FC_DIM))
  with pytest.raises(ValueError, match="conv1_1/kernel has shape"):
    faster_rcnn.load_pretrained(wide, path)


def test_unknown_file_type_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="expected a torchvision"):
    convert_vgg16.convert_file(str(tmp_path / "weights.bin"))
