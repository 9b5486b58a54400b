"""Loads a detector written by `python -m frcnn_jax.export`: needs only JAX and NumPy.

This file imports nothing else (not even the rest of frcnn_jax), so it can be copied next to
an application that has only `jax` and `numpy` installed:

  import export_loader                  # or: from frcnn_jax.export import loader
  model = export_loader.load("model.bin")
  out = model.detect(image)             # uint8 [h, w, 3] RGB -> boxes, scores, labels
  out = model(images, image_hw, scale)  # prepared uint8 [B, H, W, 3] canvases, int32 [B, 2],
                                        # float32 [B]

The resize before the network is the training pipeline's (Pillow's antialiased bilinear
resample on uint8 pixels), reimplemented here in NumPy with Pillow's fixed-point arithmetic and
pass order, so the canvases are bit-identical to Pillow 13's (the version this was checked
against) without Pillow.
"""

import functools
import json
import math
import os
import zipfile
from typing import Any

import jax
import numpy as np

FORMAT = "frcnn_jax.export/2"   # one program per canvas ("canvases" in the meta)
_FORMAT_ONE_CANVAS = "frcnn_jax.export/1"   # one program, canvas "pad_hw"
_PRECISION_BITS = 32 - 8 - 2   # Pillow's fixed-point precision for 8-bit resampling


@functools.lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's bilinear resample weights along one axis (Resample.c, `precompute_coeffs`).

  The C loop over output pixels, vectorised with the same float64 operations in the same
  order (the normalising sum is accumulated tap by tap, as C does). Cached: read-only arrays.

  Returns:
    index int32 [out_size, K] source pixels and weight int32 [out_size, K] fixed-point
    weights (0 where unused).
  """
  scale = in_size / out_size
  filter_scale = max(scale, 1.0)
  support = 1.0 * filter_scale                    # the triangle filter's support is 1
  ksize = int(math.ceil(support)) * 2 + 1
  center = (np.arange(out_size) + 0.5) * scale
  xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)   # C's (int): toward 0
  xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
  taps = np.arange(ksize)
  used = taps < xmax[:, None]
  w = np.where(used, np.maximum(
      1.0 - np.abs((taps + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filter_scale)), 0.0),
               0.0)
  total = np.zeros(out_size)
  for k in range(ksize):
    total += w[:, k]
  w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
  fixed = np.where(w < 0, -0.5 + w * (1 << _PRECISION_BITS), 0.5 + w * (1 << _PRECISION_BITS))
  weight = np.where(used, fixed.astype(np.int64), 0).astype(np.int32)  # (int): toward 0
  index = np.where(used, taps + xmin[:, None], xmin[:, None]).astype(np.int32)
  weight.flags.writeable = index.flags.writeable = False
  return index, weight


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  """One pass of Pillow's 8-bit resample along `axis` (0: rows, 1: columns)."""
  if axis == 1:   # as rows: gathering whole rows is 2.5x faster than gathering columns
    return _resample_axis(image.transpose(1, 0, 2), out_size, 0).transpose(1, 0, 2)
  index, weight = _coefficients(image.shape[0], out_size)
  # int32 holds the sums: the bilinear weights are >= 0 and add up to 2^22, times <= 255.
  pixels = np.ascontiguousarray(image, np.int32)
  total = np.full((out_size,) + pixels.shape[1:], 1 << (_PRECISION_BITS - 1), np.int32)
  tap = np.empty_like(total)
  for k in range(index.shape[1]):      # K taps, each a gather of rows
    np.take(pixels, index[:, k], axis=0, out=tap)
    tap *= weight[:, k, None, None]
    total += tap
  total >>= _PRECISION_BITS
  return np.clip(total, 0, 255, out=total).astype(np.uint8)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pillow's `Image.resize((width, height), Image.BILINEAR)` of a uint8 [h, w, 3] image.

  Pillow 13's algorithm (Resample.c), bit for bit: antialiased when shrinking (the triangle
  filter widened by the scale), 22-bit fixed-point weights, two passes each rounded and clipped
  to uint8; the vertical pass first when the height shrinks by more than twice as many pixels
  as the width does, else the horizontal pass first (Pillow 12 and older: always horizontal
  first, so a few pixels may differ by one level there).
  """
  image = np.asarray(image, np.uint8)
  h, w = image.shape[:2]
  if h - height > 0 and h - height > (w - width) * 2:
    passes = ((height, 0), (width, 1))
  else:
    passes = ((width, 1), (height, 0))
  for size, axis in passes:
    if image.shape[axis] != size:
      image = _resample_axis(image, size, axis)
  return image


def resize_and_pad(image: np.ndarray, *, min_size: int, max_size: int,
                   pad_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.float32]:
  """One image to a model input on canvas `pad_hw`, as the training pipeline prepares it.

  Scaled by one factor so the shorter side is `min_size` (the longer at most `max_size`);
  only when that size does not fit the canvas is the factor capped further so that the image
  fits (frcnn_jax/data/transforms.py `fit_scale`). Bilinear, zero-padded at the bottom and
  right.

  Args:
    image: uint8 [h, w, 3] RGB.
    min_size: target shorter side.
    max_size: cap on the longer side.
    pad_hw: (H, W) canvas.

  Returns:
    canvas uint8 [H, W, 3], image_hw int32 [2], scale float32 (resized / original).
  """
  h, w = image.shape[:2]
  scale = min(min_size / min(h, w), max_size / max(h, w))
  if max(int(round(h * scale)), 1) > pad_hw[0] or max(int(round(w * scale)), 1) > pad_hw[1]:
    scale = min(scale, pad_hw[0] / h, pad_hw[1] / w)
  new_h = min(max(int(round(h * scale)), 1), pad_hw[0])
  new_w = min(max(int(round(w * scale)), 1), pad_hw[1])
  resized = resize_bilinear(image, new_h, new_w)
  canvas = np.zeros((*pad_hw, 3), np.uint8)
  canvas[:new_h, :new_w] = resized
  return canvas, np.array([new_h, new_w], np.int32), np.float32(scale)


def pick_canvas(hw: tuple[int, int], canvases, *, min_size: int, max_size: int) -> int:
  """The canvas of an image of original size `hw` (frcnn_jax/data/canvases.py's rule).

  The smallest-area canvas that holds the image resized by py-faster-rcnn's rule (ties: the
  lower index); if none holds it, the canvas on which it shrinks least.

  Returns:
    The canvas index.
  """
  h, w = int(hw[0]), int(hw[1])
  scale = min(min_size / min(h, w), max_size / max(h, w))
  rh, rw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
  holding = [(ch * cw, i) for i, (ch, cw) in enumerate(canvases) if rh <= ch and rw <= cw]
  if holding:
    return min(holding)[1]
  fits = [min(ch / rh, cw / rw) for ch, cw in canvases]
  return fits.index(max(fits))


class ExportedDetector:
  """A loaded export: call it on canvases, or `detect` one image of any size.

  Attributes:
    canvases: the (H, W) canvases with a program each.
  """

  def __init__(self, exported: list[jax.export.Exported], param_leaves: list[np.ndarray],
               meta: dict[str, Any]):
    self.exported = exported
    self.meta = meta
    self.canvases = [tuple(int(v) for v in c) for c in meta["canvases"]]
    self.class_names = tuple(meta.get("class_names", ()))
    self._params = [jax.device_put(x) for x in param_leaves]
    self._calls = {c: jax.jit(e.call) for c, e in zip(self.canvases, exported)}

  def __call__(self, images: np.ndarray, image_hw: np.ndarray,
               scale: np.ndarray) -> dict[str, np.ndarray]:
    """Detections of prepared canvases (uint8 [B, H, W, 3], int32 [B, 2], float32 [B]).

    Raises:
      ValueError: (H, W) is not one of the exported canvases.
    """
    images = np.asarray(images, np.uint8)
    call = self._calls.get(tuple(images.shape[1:3]))
    if call is None:
      raise ValueError(f"no exported program for canvas {tuple(images.shape[1:3])}: the "
                       f"export has {self.canvases}")
    out = call(self._params, images, np.asarray(image_hw, np.int32),
               np.asarray(scale, np.float32))
    return {k: np.asarray(v) for k, v in out.items()}

  def detect(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Detections of one uint8 RGB image [h, w, 3] (grayscale [h, w] and RGBA accepted).

    The image goes on the smallest exported canvas that holds it (`pick_canvas`).

    Returns:
      {"boxes" [K, 4] original pixels (clipped to the image), "scores" [K], "labels" [K]}:
      the valid detections.
    """
    image = np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    m = self.meta
    canvas_hw = self.canvases[pick_canvas(image.shape[:2], self.canvases,
                                          min_size=m["min_size"], max_size=m["max_size"])]
    canvas, hw, scale = resize_and_pad(image, min_size=m["min_size"], max_size=m["max_size"],
                                       pad_hw=canvas_hw)
    b = m["batch_size"]
    out = self(np.repeat(canvas[None], b, 0), np.repeat(hw[None], b, 0), np.full(b, scale))
    keep = out["valid"][0]
    h, w = image.shape[:2]
    boxes = np.clip(out["boxes"][0][keep], 0.0, np.array([w, h, w, h], np.float32))
    return {"boxes": boxes, "scores": out["scores"][0][keep], "labels": out["labels"][0][keep]}


def load(path: str | os.PathLike) -> ExportedDetector:
  """Loads a file written by the export command into a callable detector.

  Raises:
    FileNotFoundError: there is no file at `path`.
    ValueError: the file is not a frcnn_jax export (another kind of file, or another export
      format); pickled data is refused, never loaded.
  """
  try:
    data = np.load(path, allow_pickle=False)
  except (FileNotFoundError, IsADirectoryError, PermissionError):
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile):
    raise ValueError(f"{path} is not a frcnn_jax export (not a NumPy .npz archive)") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} is not a frcnn_jax export (a single NumPy array, not an .npz "
                     "archive)")
  with data:
    try:
      meta = json.loads(data["meta"].tobytes().decode())
    except (KeyError, ValueError, zipfile.BadZipFile):   # no meta, or not JSON text
      raise ValueError(f"{path} is not a frcnn_jax export (no export metadata in the "
                       "archive)") from None
    if not isinstance(meta, dict):
      raise ValueError(f"{path} is not a frcnn_jax export (its metadata is not an object)")
    if meta.get("format") not in (FORMAT, _FORMAT_ONE_CANVAS):
      raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    if meta["format"] == _FORMAT_ONE_CANVAS:   # one program for the canvas pad_hw
      meta["canvases"] = [meta["pad_hw"]]
      programs = ["program"]
    else:
      programs = [f"program_{i:03d}" for i in range(len(meta["canvases"]))]
    exported = [jax.export.deserialize(bytearray(data[p].tobytes())) for p in programs]
    names = sorted(n for n in data.files if n.startswith("param_"))
    leaves = [data[n] for n in names]
  return ExportedDetector(exported, leaves, meta)
