"""Tests for scripts/convert_zf.py: py-faster-rcnn's ZF.v2.caffemodel -> frcnn_jax .npz.

The .caffemodel files are written here by a hand-written protobuf encoder (Caffe's field
numbers) in both layer formats: a width-reduced ZF for the conversion checks, and one with ZF's
real conv shapes (and small fc layers) for the documented command.
"""

import functools
import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models import caffe_weights
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models.backbones import zf
from frcnn_jax.models.roi_heads import fc
from frcnn_jax.models.roi_heads.pooling import RoIPooler
from tests.models import tiny

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_zf.py"
_spec = importlib.util.spec_from_file_location("convert_zf", _SCRIPT)
convert_zf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_zf)

TINY_WIDTH = 1 / 16
FC_DIM = 16
ROI = 6
# ZF.v2.caffemodel's conv blobs (train.prototxt: num_output, kernel_size).
REAL_CONV_SHAPES = {"conv1": (96, 3, 7, 7), "conv2": (256, 96, 5, 5), "conv3": (384, 256, 3, 3),
                    "conv4": (384, 384, 3, 3), "conv5": (256, 384, 3, 3)}


# --- protobuf wire format -------------------------------------------------------------------


def _varint(value):
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _bytes_field(number, payload):
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _blob_bytes(array, legacy):
  """BlobProto: shape (7, BlobShape dim 1 packed) or legacy num/channels/height/width (1-4),
  data (5) packed."""
  array = np.asarray(array, np.float32)
  if legacy:
    dims = (1,) * (4 - array.ndim) + array.shape
    out = b"".join(_varint(n << 3) + _varint(d) for n, d in zip((1, 2, 3, 4), dims))
  else:
    out = _bytes_field(7, _bytes_field(1, b"".join(_varint(d) for d in array.shape)))
  return out + _bytes_field(5, array.astype("<f4").tobytes())


def _caffemodel_bytes(named_blobs, fmt="layer"):
  """NetParameter in the `layer` (100) or V1 `layers` (2) format, blob-less norm / pool layers
  in between as in the ZF prototxt."""
  net = _bytes_field(1, b"ZF")
  extras = {"conv1": ["relu1", "norm1", "pool1"], "conv2": ["relu2", "norm2", "pool2"]}
  for name, blobs in named_blobs:
    for layer, layer_blobs in [(name, blobs)] + [(e, []) for e in extras.get(name, [])]:
      if fmt == "layer":
        body = _bytes_field(1, layer.encode()) + b"".join(
            _bytes_field(7, _blob_bytes(a, legacy=False)) for a in layer_blobs)
        net += _bytes_field(100, body)
      else:
        body = _bytes_field(4, layer.encode()) + b"".join(
            _bytes_field(6, _blob_bytes(a, legacy=True)) for a in layer_blobs)
        net += _bytes_field(2, body)
  return net


# --- ZF weights in our layouts and in Caffe's ------------------------------------------------


def _ours(rng, width=TINY_WIDTH, fc_dim=FC_DIM):
  """{layer: (kernel in our layout, bias)}: convs HWIO, fc6 over HWC [ROI, ROI, C] inputs."""
  out, cin = {}, 3
  for name, (cout, _, k, _) in convert_zf.conv_shapes(width).items():
    out[name] = (rng.normal(0, np.sqrt(2.0 / (k * k * cin)), (k, k, cin, cout)).astype(
        np.float32), rng.normal(0, 0.1, cout).astype(np.float32))
    cin = cout
  out["fc6"] = (rng.normal(0, 0.02, (ROI, ROI, cin, fc_dim)).astype(np.float32),
                rng.normal(0, 0.1, fc_dim).astype(np.float32))
  out["fc7"] = (rng.normal(0, 0.1, (fc_dim, fc_dim)).astype(np.float32),
                rng.normal(0, 0.1, fc_dim).astype(np.float32))
  return out


def _caffe_blobs(ours):
  """[(layer, [weight, bias])] in Caffe's layouts (OIHW; fc over CHW-flattened pool5), fc8 too."""
  out = [(name, [w.transpose(3, 2, 0, 1), b]) for name, (w, b) in ours.items()
         if name.startswith("conv")]
  w6, b6 = ours["fc6"]
  out.append(("fc6", [w6.transpose(3, 2, 0, 1).reshape(w6.shape[-1], -1), b6]))
  w7, b7 = ours["fc7"]
  out.append(("fc7", [w7.T, b7]))
  out.append(("fc8", [np.ones((10, w7.shape[1]), np.float32), np.zeros(10, np.float32)]))
  return out


@functools.lru_cache(maxsize=None)
def _real_shaped_bytes():
  """A caffemodel with ZF.v2's conv shapes and 8-wide fc6 / fc7 (about 15 MB)."""
  return _caffemodel_bytes(_caffe_blobs(_ours(np.random.default_rng(7), 1.0, 8)))


def _model():
  trunk = zf.ZF(width=TINY_WIDTH)
  head = fc.FCHead(dim=FC_DIM, num_classes=2, pooler=RoIPooler(size=ROI, spatial_scale=1 / 16))
  return faster_rcnn.FasterRCNN(trunk=trunk, head=head, input_norm="caffe", num_anchors=9)


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["layer", "v1"])
def test_caffemodel_converts_and_loads(tmp_path, fmt):
  rng = np.random.default_rng(0)
  ours = _ours(rng)
  path = tmp_path / "ZF.v2.caffemodel"
  path.write_bytes(_caffemodel_bytes(_caffe_blobs(ours), fmt))
  arrays = convert_zf.convert_file(str(path), width=TINY_WIDTH)
  assert sorted(arrays) == sorted(f"{layer}/{leaf}" for layer in ours
                                  for leaf in ("kernel", "bias"))
  for name, (w, b) in ours.items():
    np.testing.assert_array_equal(arrays[f"{name}/kernel"], w.reshape(-1, w.shape[-1]).reshape(
        arrays[f"{name}/kernel"].shape))
    np.testing.assert_array_equal(arrays[f"{name}/bias"], b)
  npz = str(tmp_path / "zf.npz")
  convert_zf.save(arrays, npz)
  with np.load(npz) as data:
    assert (str(data["input_norm"]), str(data["source"])) == ("caffe", "caffe")
    np.testing.assert_array_equal(data["pixel_mean"], [102.9801, 115.9465, 122.7717])
  model = _model()
  params = model.trunk.load_pretrained(tiny.numpy_params(model), npz, "caffe")
  # The trunk computes conv1 of the Caffe blob (OIHW, BGR inputs) as Caffe does.
  caffe_conv1, caffe_bias = _caffe_blobs(ours)[0][1]
  image = np.random.default_rng(1).normal(0, 50, (1, 15, 13, 3)).astype(np.float32)
  got = jax.jit(lambda p, x: jax.lax.conv_general_dilated(
      x, p["trunk"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC")))(params, jnp.asarray(image))
  padded = np.pad(image[0].astype(np.float64), ((3, 3), (3, 3), (0, 0)))
  want = np.zeros(got.shape[1:])
  for i in range(want.shape[0]):
    for j in range(want.shape[1]):
      patch = padded[2 * i:2 * i + 7, 2 * j:2 * j + 7].transpose(2, 0, 1)   # [C, kh, kw]
      want[i, j] = np.einsum("ochw,chw->o", caffe_conv1, patch)
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(np.asarray(params["trunk"]["conv1"]["bias"]), caffe_bias)
  # fc6 -> fc7 of the head equals py-faster-rcnn's at test time: pool5 flattened CHW, drop6
  # multiplying by 1 - 0.5 (scale_train: false; our head's model.fc.dropout_scale_train=False).
  pooled = np.random.default_rng(2).normal(size=(ROI, ROI, 16)).astype(np.float32)
  head = params["head"]
  x = np.maximum(pooled.reshape(-1) @ np.asarray(head["fc6"]["kernel"]) + head["fc6"]["bias"], 0)
  x = (0.5 * x) @ np.asarray(head["fc7"]["kernel"]) + head["fc7"]["bias"]
  blobs = dict(_caffe_blobs(ours))
  caffe_fc6 = np.maximum(blobs["fc6"][0] @ pooled.transpose(2, 0, 1).reshape(-1)
                         + blobs["fc6"][1], 0)
  caffe_fc7 = blobs["fc7"][0] @ (0.5 * caffe_fc6) + blobs["fc7"][1]
  np.testing.assert_allclose(x, caffe_fc7, rtol=1e-5, atol=1e-5)


def test_real_zf_shapes_are_accepted():
  layers = caffe_weights.parse_caffemodel(_real_shaped_bytes())
  assert {name: layers[name][0].shape for name in REAL_CONV_SHAPES} == REAL_CONV_SHAPES
  assert convert_zf.conv_shapes() == REAL_CONV_SHAPES
  arrays = convert_zf.convert_caffe(layers)
  assert arrays["conv2/kernel"].shape == (5, 5, 96, 256)
  assert arrays["fc6/kernel"].shape == (6 * 6 * 256, 8)
  # The same file is not a width-1/16 ZF.
  with pytest.raises(ValueError, match=r"'conv1'.*\(96, 3, 7, 7\).*\(6, 3, 7, 7\)"):
    convert_zf.convert_caffe(layers, width=TINY_WIDTH)


def _misfit(name):
  """Caffe blobs of the tiny ZF with one fault, and the error it must give."""
  blobs = dict(_caffe_blobs(_ours(np.random.default_rng(3))))
  if name == "missing conv3":
    del blobs["conv3"]
    match = r"'conv3' is missing"
  elif name == "grouped conv2":
    w, b = blobs["conv2"]
    blobs["conv2"] = [w[:, : w.shape[1] // 2], b]
    match = r"'conv2': weight \(16, 3, 5, 5\)"
  elif name == "conv4 bias":
    blobs["conv4"] = [blobs["conv4"][0], blobs["conv4"][1][:-1]]
    match = r"'conv4'.*bias \(23,\)"
  elif name == "fc6 not over conv5":
    w, b = blobs["fc6"]
    blobs["fc6"] = [w[:, :-1], b]
    match = r"'fc6'.*not a square map of 16 channels"
  elif name == "fc7 not over fc6":
    w, b = blobs["fc7"]
    blobs["fc7"] = [w[:, :-2], b]
    match = r"'fc7'.*fc6's 16 outputs"
  else:
    blobs["fc7"] = blobs["fc7"][:1]
    match = r"'fc7' has 1 blobs"
  return list(blobs.items()), match


@pytest.mark.parametrize("name", ["missing conv3", "grouped conv2", "conv4 bias",
                                  "fc6 not over conv5", "fc7 not over fc6", "fc7 one blob"])
def test_a_file_that_does_not_fit_names_the_layer(tmp_path, name):
  blobs, match = _misfit(name)
  path = tmp_path / "ZF.v2.caffemodel"
  path.write_bytes(_caffemodel_bytes(blobs))
  with pytest.raises(ValueError, match=match):
    convert_zf.convert_file(str(path), width=TINY_WIDTH)


def test_vgg16_caffemodel_and_other_files_are_refused(tmp_path):
  vgg = [("conv1_1", [np.zeros((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)])]
  with pytest.raises(ValueError, match="'conv1' is missing.*conv1_1"):
    convert_zf.convert_caffe(caffe_weights.parse_caffemodel(_caffemodel_bytes(vgg)))
  with pytest.raises(ValueError, match="expected a Caffe .caffemodel"):
    convert_zf.convert_file(str(tmp_path / "zf.pth"))
  with pytest.raises(ValueError, match="truncated varint"):
    caffe_weights.parse_caffemodel(b"\x80")


def _documented_commands(text):
  """The `python scripts/convert_zf.py ...` commands in `text`, continuation lines joined."""
  joined = re.sub(r"\\\n\s*", " ", text)
  return [line.strip().split("#")[0].split() for line in joined.splitlines()
          if line.strip().startswith("python scripts/convert_zf.py")]


def test_documented_commands_run_as_written(tmp_path, monkeypatch, capsys):
  """Every convert_zf command of the script's docstring, the docs and experiments/voc_zf.py
  runs unchanged on a file of ZF.v2's conv shapes under the documented input name."""
  root = _SCRIPT.parents[1]
  texts = [_SCRIPT.read_text(), (root / "README.md").read_text(),
           *(page.read_text() for page in sorted((root / "docs").glob("*.md"))),
           (root / "experiments" / "voc_zf.py").read_text()]
  commands = [c for text in texts for c in _documented_commands(text)]
  assert len(commands) >= 3 and all("--input" in c and "--output" in c for c in commands)
  monkeypatch.chdir(tmp_path)
  for command in commands:
    argv = command[2:]
    pathlib.Path(argv[argv.index("--input") + 1]).write_bytes(_real_shaped_bytes())
    output = pathlib.Path(argv[argv.index("--output") + 1])
    if output.exists():
      output.unlink()    # the same name documented twice: this test's own file
    convert_zf.main(argv)
    with np.load(output) as data:
      assert data["conv1/kernel"].shape == (7, 7, 3, 96) and str(data["input_norm"]) == "caffe"
  assert "--config.model.backbone=zf" in capsys.readouterr().out


def test_existing_output_is_not_overwritten(tmp_path, capsys):
  source = tmp_path / "ZF.v2.caffemodel"
  source.write_bytes(_real_shaped_bytes())
  output = tmp_path / "out.npz"
  output.write_bytes(b"user file")
  with pytest.raises(SystemExit):
    convert_zf.main(["--input", str(source), "--output", str(output)])
  assert output.read_bytes() == b"user file" and "--overwrite" in capsys.readouterr().err
  convert_zf.main(["--input", str(source), "--output", str(output), "--overwrite"])
  with np.load(output) as data:
    assert str(data["source"]) == "caffe"
  with pytest.raises(SystemExit):
    convert_zf.main(["--input", str(tmp_path / "missing.caffemodel"), "--output",
                     str(tmp_path / "x.npz")])
