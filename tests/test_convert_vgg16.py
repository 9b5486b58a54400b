"""Tests for scripts/convert_vgg16.py: torchvision and Keras VGG16 weights -> frcnn_jax .npz."""

import importlib.util
import pathlib
import re

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
NORMS = ("caffe", "keras", "torchvision")

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
  return tiny.model(num_classes=2, width=1 / 16, convs_per_block=(2, 2, 3, 3, 3),
                    input_norm=input_norm, fc_dim=FC_DIM, frozen_blocks=0, num_anchors=9)


def _check_model_matches(npz_path, input_norm, layers, fc, reference_input):
  model = _model(input_norm)
  params = model.trunk.load_pretrained(tiny.numpy_params(model), npz_path, input_norm)
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
  return image[..., ::-1] - np.array([102.9801, 115.9465, 122.7717])   # py-faster-rcnn


def _keras_reference_input(image):
  return image[..., ::-1] - np.array([103.939, 116.779, 123.68])        # keras.applications


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
  assert (input_norm, source) == ("keras", "keras")
  path = str(tmp_path / "keras.npz")
  convert_vgg16.save(arrays, input_norm, source, path)
  with np.load(path) as data:
    np.testing.assert_array_equal(data["pixel_mean"], [103.939, 116.779, 123.68])
  _check_model_matches(path, "keras", layers, fc, _keras_reference_input)
  with pytest.raises(ValueError, match="input_norm='keras'"):
    caffe = _model("caffe")
    caffe.trunk.load_pretrained(tiny.numpy_params(caffe), path, "caffe")


def test_load_pretrained_rejects_mismatches(tmp_path):
  rng = np.random.default_rng(0)
  arrays = convert_vgg16.convert_torchvision(_torch_state_dict(_layers(rng), _fc(rng)))
  path = str(tmp_path / "tv.npz")
  convert_vgg16.save(arrays, "torchvision", "torchvision", path)
  caffe = _model("caffe")
  with pytest.raises(ValueError, match="input_norm"):
    caffe.trunk.load_pretrained(tiny.numpy_params(caffe), path, "caffe")
  wide = tiny.model(num_classes=2, width=1 / 8, convs_per_block=(2, 2, 3, 3, 3), fc_dim=FC_DIM)
  with pytest.raises(ValueError, match="conv1_1/kernel has shape"):
    wide.trunk.load_pretrained(tiny.numpy_params(wide), path, "torchvision")


def test_unknown_file_type_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="expected a Caffe .caffemodel"):
    convert_vgg16.convert_file(str(tmp_path / "weights.bin"))


# --- Caffe .caffemodel ---------------------------------------------------------------------
# A hand-written protobuf encoder (wire format: varint keys, length-delimited messages, packed
# repeated fields) builds the synthetic files; the protobuf package, where installed, builds
# them a second time from a descriptor with Caffe's field numbers.


def _varint(value):
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _key(number, wire):
  return _varint(number << 3 | wire)


def _bytes_field(number, payload):
  return _key(number, 2) + _varint(len(payload)) + payload


def _blob_bytes(array, legacy, packed=True):
  """BlobProto: shape (7, BlobShape dim 1 packed) or legacy num/channels/height/width (1-4);
  data (5) packed or as one fixed32 field per value."""
  array = np.asarray(array, np.float32)
  if legacy:
    dims = (1,) * (4 - array.ndim) + array.shape
    out = b"".join(_key(n, 0) + _varint(d) for n, d in zip((1, 2, 3, 4), dims))
  else:
    out = _bytes_field(7, _bytes_field(1, b"".join(_varint(d) for d in array.shape)))
  if packed:
    return out + _bytes_field(5, array.astype("<f4").tobytes())
  return out + b"".join(_key(5, 5) + v.tobytes() for v in array.astype("<f4").reshape(-1))


def _caffe_blobs(layers, fc):
  """[(caffe layer name, [weight, bias] in Caffe layouts)] of VGG16 plus fc8."""
  out = [(f"conv{b}_{i}", [w.transpose(3, 2, 0, 1), bias]) for b, i, w, bias in layers]
  fc6, b6, fc7, b7 = fc
  out.append(("fc6", [fc6.transpose(3, 2, 0, 1).reshape(FC_DIM, -1), b6]))   # pool5 CHW
  out.append(("fc7", [fc7.T, b7]))
  out.append(("fc8", [np.ones((10, FC_DIM), np.float32), np.zeros(10, np.float32)]))
  return out


def _caffemodel_bytes(named_blobs, fmt):
  """NetParameter in the new `layer` (100) format or the V1 `layers` (2) format (fc7 inside a
  V0 `layer` 1 there), with blob-less layers and unrelated fields in between."""
  net = _bytes_field(1, b"VGG_ILSVRC_16_layers")
  for name, blobs in [("data", [])] + named_blobs[:2] + [("pool1", [])] + named_blobs[2:]:
    if fmt == "layer":
      body = (_bytes_field(1, name.encode()) + _bytes_field(2, b"Convolution")
              + _bytes_field(3, b"bottom") + b"".join(
                  _bytes_field(7, _blob_bytes(a, legacy=False, packed=name != "conv1_2"))
                  for a in blobs))
      net += _bytes_field(100, body)
    else:
      blob_bytes = [_blob_bytes(a, legacy=True) for a in blobs]
      if name == "fc7":
        v0 = _bytes_field(1, name.encode()) + b"".join(_bytes_field(50, b) for b in blob_bytes)
        body = _bytes_field(1, v0)
      else:
        body = (_bytes_field(2, b"bottom") + _bytes_field(4, name.encode()) + _key(5, 0)
                + _varint(4) + b"".join(_bytes_field(6, b) for b in blob_bytes))
      net += _bytes_field(2, body)
  return net


@pytest.mark.parametrize("fmt", ["layer", "v1"])
def test_caffemodel_converts_and_matches_reference(tmp_path, fmt):
  rng = np.random.default_rng(0)
  layers, fc = _layers(rng), _fc(rng)
  path = tmp_path / "VGG16.v2.caffemodel"
  path.write_bytes(_caffemodel_bytes(_caffe_blobs(layers, fc), fmt))
  parsed = convert_vgg16.read_caffemodel(str(path))
  assert list(parsed) == [f"conv{b}_{i}" for b, i, _, _ in layers] + ["fc6", "fc7", "fc8"]
  arrays, input_norm, source = convert_vgg16.convert_file(str(path))
  assert (input_norm, source) == ("caffe", "caffe") and not any("fc8" in k for k in arrays)
  npz = str(tmp_path / "caffe.npz")
  convert_vgg16.save(arrays, input_norm, source, npz)
  with np.load(npz) as data:
    assert str(data["input_norm"]) == "caffe"
    np.testing.assert_array_equal(data["pixel_mean"], [102.9801, 115.9465, 122.7717])
  # conv1_1 sees BGR minus py-faster-rcnn's PIXEL_MEANS; fc6 reads pool5 in Caffe's CHW order.
  _check_model_matches(npz, "caffe", layers, fc, _caffe_reference_input)


def test_caffemodel_built_by_the_protobuf_package(tmp_path):
  pytest.importorskip("google.protobuf")
  from google.protobuf import descriptor_pb2  # pylint: disable=g-import-not-at-top
  from google.protobuf import descriptor_pool  # pylint: disable=g-import-not-at-top
  from google.protobuf import message_factory  # pylint: disable=g-import-not-at-top
  f = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(name="caffe_subset.proto", package="caffe_subset",
                                             syntax="proto2")

  def message(name, fields):
    m = proto.message_type.add(name=name)
    for field_name, number, kind, label, type_name, packed in fields:
      field = m.field.add(name=field_name, number=number, type=kind, label=label)
      if type_name:
        field.type_name = f".caffe_subset.{type_name}"
      if packed:
        field.options.packed = True
  rep, opt = f.LABEL_REPEATED, f.LABEL_OPTIONAL
  message("BlobShape", [("dim", 1, f.TYPE_INT64, rep, None, True)])
  message("BlobProto", [("shape", 7, f.TYPE_MESSAGE, opt, "BlobShape", False),
                        ("data", 5, f.TYPE_FLOAT, rep, None, True),
                        ("num", 1, f.TYPE_INT64, opt, None, False),
                        ("channels", 2, f.TYPE_INT64, opt, None, False),
                        ("height", 3, f.TYPE_INT64, opt, None, False),
                        ("width", 4, f.TYPE_INT64, opt, None, False)])
  message("LayerParameter", [("name", 1, f.TYPE_STRING, opt, None, False),
                             ("type", 2, f.TYPE_STRING, opt, None, False),
                             ("blobs", 7, f.TYPE_MESSAGE, rep, "BlobProto", False)])
  message("V1LayerParameter", [("name", 4, f.TYPE_STRING, opt, None, False),
                               ("blobs", 6, f.TYPE_MESSAGE, rep, "BlobProto", False)])
  message("NetParameter", [("name", 1, f.TYPE_STRING, opt, None, False),
                           ("layer", 100, f.TYPE_MESSAGE, rep, "LayerParameter", False),
                           ("layers", 2, f.TYPE_MESSAGE, rep, "V1LayerParameter", False)])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  net_class = message_factory.GetMessageClass(pool.FindMessageTypeByName(
      "caffe_subset.NetParameter"))
  rng = np.random.default_rng(3)
  layers, fc = _layers(rng), _fc(rng)
  named = _caffe_blobs(layers, fc)
  for fmt in ("layer", "v1"):
    net = net_class(name="VGG_ILSVRC_16_layers")
    for name, blobs in named:
      layer = net.layer.add(name=name, type="Convolution") if fmt == "layer" else net.layers.add(
          name=name)
      for array in blobs:
        blob = layer.blobs.add()
        if fmt == "layer":
          blob.shape.dim.extend(array.shape)
        else:
          blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
        blob.data.extend(array.reshape(-1).tolist())
    parsed = convert_vgg16.parse_caffemodel(net.SerializeToString())
    assert list(parsed) == [name for name, _ in named]
    for name, blobs in named:
      for got, want in zip(parsed[name], blobs):
        np.testing.assert_array_equal(got.reshape(want.shape), want)
    arrays = convert_vgg16.convert_caffe(parsed)
    np.testing.assert_array_equal(arrays["conv1_1/kernel"], layers[0][2])
    np.testing.assert_array_equal(arrays["fc6/kernel"], fc[0].reshape(-1, FC_DIM))
    np.testing.assert_array_equal(arrays["fc7/kernel"], fc[2])


@pytest.mark.parametrize("data,match", [(b"\x0a\x05ab", "past the end"),
                                        (b"\x0b", "wire type 3"),
                                        (b"\x80", "truncated varint")])
def test_malformed_caffemodel_is_a_clear_error(data, match):
  with pytest.raises(ValueError, match=match):
    convert_vgg16.parse_caffemodel(data)


def test_caffemodel_without_vgg_layers_is_rejected():
  net = _bytes_field(100, _bytes_field(1, b"ip1") + _bytes_field(
      7, _blob_bytes(np.zeros((2, 3)), legacy=False)))
  with pytest.raises(ValueError, match="not a Caffe VGG16"):
    convert_vgg16.convert_caffe(convert_vgg16.parse_caffemodel(net))


def _documented_commands(text):
  """The `python scripts/convert_vgg16.py ...` commands in `text`, continuation lines joined."""
  joined = re.sub(r"\\\n\s*", " ", text)
  return [line.strip().split("#")[0].split() for line in joined.splitlines()
          if line.strip().startswith("python scripts/convert_vgg16.py")]


def test_documented_commands_run_as_written(tmp_path, monkeypatch):
  """Every convert command in the script's docstring, the docs and experiments/voc.py runs
  unchanged on a synthetic file of the documented input name (torch ones need torch)."""
  root = _SCRIPT.parents[1]
  texts = [_SCRIPT.read_text(), (root / "README.md").read_text(),
           *(page.read_text() for page in sorted((root / "docs").glob("*.md"))),
           (_SCRIPT.parents[1] / "experiments" / "voc.py").read_text()]
  commands = [c for text in texts for c in _documented_commands(text)]
  assert len(commands) >= 4 and all("--input" in c and "--output" in c for c in commands)
  rng = np.random.default_rng(0)
  layers, fc = _layers(rng), _fc(rng)
  monkeypatch.chdir(tmp_path)
  for i, command in enumerate(commands):
    argv = command[2:]
    source = argv[argv.index("--input") + 1]
    if source.endswith((".pth", ".pt")):
      torch = pytest.importorskip("torch")
      torch.save({k: torch.from_numpy(v) for k, v in _torch_state_dict(layers, fc).items()},
                 source)
    elif source.endswith((".h5", ".hdf5")):
      _write_keras_h5(source, layers, fc)
    else:
      pathlib.Path(source).write_bytes(_caffemodel_bytes(_caffe_blobs(layers, fc), "layer"))
    output = pathlib.Path(argv[argv.index("--output") + 1])
    if output.exists():
      output.unlink()    # the same name documented twice: this test's own file
    convert_vgg16.main(argv)
    with np.load(output) as data:
      assert "conv1_1/kernel" in data.files and str(data["input_norm"]) in NORMS, i


def test_existing_output_is_not_overwritten(tmp_path, capsys):
  rng = np.random.default_rng(0)
  source = tmp_path / "VGG16.v2.caffemodel"
  source.write_bytes(_caffemodel_bytes(_caffe_blobs(_layers(rng), _fc(rng)), "layer"))
  output = tmp_path / "out.npz"
  output.write_bytes(b"user file")
  with pytest.raises(SystemExit):
    convert_vgg16.main(["--input", str(source), "--output", str(output)])
  assert output.read_bytes() == b"user file" and "--overwrite" in capsys.readouterr().err
  convert_vgg16.main(["--input", str(source), "--output", str(output), "--overwrite"])
  with np.load(output) as data:
    assert str(data["source"]) == "caffe"
  with pytest.raises(SystemExit):
    convert_vgg16.main(["--input", str(tmp_path / "missing.caffemodel"), "--output",
                        str(tmp_path / "x.npz")])
