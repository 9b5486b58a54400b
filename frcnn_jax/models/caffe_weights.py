"""Caffe weights without Caffe: a .caffemodel (binary NetParameter) reader and layout helpers.

The converters in `scripts/` (convert_vgg16.py, convert_zf.py) read the ImageNet models that
py-faster-rcnn starts from with `read_caffemodel`: a small protobuf wire-format reader
(https://protobuf.dev/programming-guides/encoding/) with the field numbers of Caffe's
`src/caffe/proto/caffe.proto`, so neither Caffe nor the protobuf package is needed. NumPy only.
"""

from typing import Iterator

import numpy as np

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_NET_LAYER, _NET_V1_LAYERS = 100, 2                       # NetParameter.layer / .layers
_LAYER_NAME, _LAYER_BLOBS = 1, 7                          # LayerParameter
_V1_NAME, _V1_BLOBS, _V1_V0 = 4, 6, 1                     # V1LayerParameter (+ V0 inside)
_V0_NAME, _V0_BLOBS = 1, 50                               # V0LayerParameter
_BLOB_SHAPE, _BLOB_DATA, _BLOB_DOUBLE_DATA = 7, 5, 8      # BlobProto
_BLOB_LEGACY_DIMS = (1, 2, 3, 4)                          # num, channels, height, width
_SHAPE_DIM = 1                                            # BlobShape.dim


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
  """Decodes the base-128 varint at `pos`; returns (value, next position)."""
  value, shift = 0, 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint: not a valid .caffemodel (protobuf) file")
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7
    if shift > 63:
      raise ValueError("varint longer than 10 bytes: not a valid .caffemodel (protobuf) file")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
  """Yields (field number, wire type, value) of one message: an int for varints, the payload
  bytes for length-delimited, 8- and 4-byte fields.

  Raises:
    ValueError: malformed data (bad wire type, lengths past the end).
  """
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _varint(buf, pos)
    elif wire in (_BYTES, _FIXED64, _FIXED32):
      if wire == _BYTES:
        size, pos = _varint(buf, pos)
      else:
        size = 8 if wire == _FIXED64 else 4
      if pos + size > len(buf):
        raise ValueError(f"field {number} runs past the end of its message: not a valid "
                         ".caffemodel (protobuf) file")
      value, pos = buf[pos:pos + size], pos + size
    else:
      raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
    yield number, wire, value


def _packed(values: list, wire_types: list[int], scalar: str) -> np.ndarray:
  """Concatenates a repeated numeric field read packed (bytes) and/or unpacked."""
  parts = []
  for value, wire in zip(values, wire_types):
    if scalar == "varint":
      if wire == _BYTES:
        pos, out = 0, []
        while pos < len(value):
          item, pos = _varint(value, pos)
          out.append(item)
        parts.append(np.asarray(out, np.int64))
      else:
        parts.append(np.asarray([value], np.int64))
    else:
      parts.append(np.frombuffer(value, scalar))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def _blob(buf: memoryview) -> np.ndarray:
  """A BlobProto as a float32 array of its shape (BlobShape, else legacy num/channels/h/w)."""
  dims, legacy, data, double = None, {}, [], []
  for number, wire, value in _fields(buf):
    if number == _BLOB_SHAPE and wire == _BYTES:
      found = [(v, w) for n, w, v in _fields(value) if n == _SHAPE_DIM]
      dims = _packed([v for v, _ in found], [w for _, w in found], "varint")
    elif number == _BLOB_DATA:
      data.append((value, wire))
    elif number == _BLOB_DOUBLE_DATA:
      double.append((value, wire))
    elif number in _BLOB_LEGACY_DIMS and wire == _VARINT:
      legacy[number] = value
  if data:
    values = _packed([v for v, _ in data], [w for _, w in data], "<f4")
  else:
    values = _packed([v for v, _ in double], [w for _, w in double], "<f8")
  if dims is None:
    dims = np.asarray([legacy.get(n, 0) for n in _BLOB_LEGACY_DIMS], np.int64)
  if int(np.prod(dims)) != values.size:
    raise ValueError(f"blob of shape {dims.tolist()} holds {values.size} values")
  return values.astype(np.float32).reshape(tuple(int(d) for d in dims))


def _layer(buf: memoryview, name_field: int, blobs_field: int,
           v0_field: int | None = None) -> tuple[str, list[np.ndarray]]:
  """(name, blobs) of a LayerParameter or V1LayerParameter (whose V0 part may hold them)."""
  name, blobs = "", []
  for number, wire, value in _fields(buf):
    if number == name_field and wire == _BYTES:
      name = bytes(value).decode()
    elif number == blobs_field and wire == _BYTES:
      blobs.append(_blob(value))
    elif v0_field is not None and number == v0_field and wire == _BYTES:
      v0_name, v0_blobs = _layer(value, _V0_NAME, _V0_BLOBS)
      name, blobs = name or v0_name, blobs or v0_blobs
  return name, blobs


def parse_caffemodel(data: bytes) -> dict[str, list[np.ndarray]]:
  """Reads a binary Caffe NetParameter: {layer name: [blobs]} for layers with blobs.

  Both layer formats are read: `layer` (field 100, LayerParameter: name 1, blobs 7) and the
  legacy `layers` (field 2, V1LayerParameter: name 4, blobs 6, or those of its V0 `layer` 1).
  Blobs (BlobProto) take their shape from `shape` (7, BlobShape dim 1) or the legacy
  num / channels / height / width (1-4) and their values from `data` (5) or `double_data` (8).

  Raises:
    ValueError: malformed protobuf data.
  """
  layers = {}
  for number, wire, value in _fields(memoryview(data)):
    if wire != _BYTES:
      continue
    if number == _NET_LAYER:
      name, blobs = _layer(value, _LAYER_NAME, _LAYER_BLOBS)
    elif number == _NET_V1_LAYERS:
      name, blobs = _layer(value, _V1_NAME, _V1_BLOBS, _V1_V0)
    else:
      continue
    if blobs:
      layers[name] = blobs
  return layers


def read_caffemodel(path: str) -> dict[str, list[np.ndarray]]:
  """Reads a .caffemodel file (see `parse_caffemodel`)."""
  with open(path, "rb") as f:
    return parse_caffemodel(f.read())


def fc_from_chw(weight: np.ndarray, channels: int) -> np.ndarray:
  """An fc weight over a flattened [C, s, s] map -> a kernel over the [s, s, C] map.

  Caffe's InnerProduct and torch's Linear after a conv map flatten it CHW; the RoI head
  flattens HWC (`frcnn_jax/models/roi_heads/fc.py`).

  Args:
    weight: [out, C * s * s].
    channels: C.

  Returns:
    [s * s * C, out].

  Raises:
    ValueError: the input count is not a square map of `channels` channels.
  """
  out_features, in_features = weight.shape
  side = int(round(np.sqrt(in_features // channels)))
  if side * side * channels != in_features:
    raise ValueError(f"fc6 has {in_features} inputs, not a square map of {channels} channels")
  kernel = weight.reshape(out_features, channels, side, side).transpose(2, 3, 1, 0)
  return kernel.reshape(side * side * channels, out_features)
