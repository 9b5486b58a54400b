"""Loads a detector written by `python -m frcnn_jax.export`: needs only JAX and NumPy.

This file imports nothing else (not even the rest of frcnn_jax), so it can be copied next to
an application that has only `jax` and `numpy` installed:

  import export_loader                  # or: from frcnn_jax.export import loader
  model = export_loader.load("model.bin")
  out = model.detect(image)             # uint8 [h, w, 3] RGB -> boxes, scores, labels
  inputs = model.prepare(image)         # the program's inputs (see `ExportedDetector.prepare`)
  out = model(**inputs)                 # all detection slots, with "valid"

The resize before the network happens inside the exported program (the input pipeline's
device resize, `frcnn_jax.ops.images`: Pillow's antialiased bilinear filter, in integer
arithmetic). This file only chooses the canvas and the resize factor (py-faster-rcnn's rule,
frcnn_jax/data/transforms.py) and places the image, unresized, at the top-left of a zero
source canvas; it has no resampling code.
"""

import json
import os
import zipfile
from typing import Any

import jax
import numpy as np

# The programs take each image unresized on a source canvas of any size and resize it inside.
FORMAT = "frcnn_jax.export/3"
# Formats whose programs took canvases resized on the host: refused, export again.
_OLDER_FORMATS = ("frcnn_jax.export/1", "frcnn_jax.export/2")


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


def fit(hw: tuple[int, int], canvas_hw: tuple[int, int], *, min_size: int,
        max_size: int) -> tuple[np.float32, np.ndarray]:
  """The resize factor and resized size of an image of original size `hw` on a canvas.

  Scaled by one factor so the shorter side is `min_size` (the longer at most `max_size`);
  only when that size does not fit the canvas is the factor capped further so that the image
  fits (frcnn_jax/data/transforms.py `fit_scale` and `scaled_hw`).

  Returns:
    (scale float32 (resized / original), image_hw int32 [2] (at most the canvas)).
  """
  h, w = int(hw[0]), int(hw[1])
  scale = min(min_size / min(h, w), max_size / max(h, w))
  rh, rw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
  if rh > canvas_hw[0] or rw > canvas_hw[1]:
    scale = min(scale, canvas_hw[0] / h, canvas_hw[1] / w)
  new_h = min(max(int(round(h * scale)), 1), canvas_hw[0])
  new_w = min(max(int(round(w * scale)), 1), canvas_hw[1])
  return np.float32(scale), np.array([new_h, new_w], np.int32)


def source_canvas(hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int]:
  """The zero canvas an image of size `hw` is shipped on to the program of `canvas_hw`.

  Each side rounded up to a multiple of the canvas's: every image no larger than the canvas
  shares one source canvas (the canvas itself), so one compilation per program serves them,
  and a larger image costs one more per multiple.
  """
  return tuple(-(-int(n) // int(c)) * int(c) for n, c in zip(hw, canvas_hw))


class ExportedDetector:
  """A loaded export: `detect` one image of any size, or call a program on its inputs.

  Attributes:
    canvases: the (H, W) canvases with a program each.
    class_names: the names of labels 1..C.
    meta: the file's description (JSON).
  """

  def __init__(self, exported: list[jax.export.Exported], param_leaves: list[np.ndarray],
               meta: dict[str, Any]):
    self.exported = exported
    self.meta = meta
    self.canvases = [tuple(int(v) for v in c) for c in meta["canvases"]]
    self.class_names = tuple(meta.get("class_names", ()))
    self._params = [jax.device_put(x) for x in param_leaves]
    # One jit per program: it compiles once per source canvas size it is called with.
    self._calls = {c: jax.jit(e.call) for c, e in zip(self.canvases, exported)}

  def prepare(self, image: np.ndarray) -> dict[str, Any]:
    """The program inputs of one uint8 RGB image [h, w, 3] (grayscale [h, w], RGBA accepted).

    The canvas is the smallest exported one that holds the resized image (`pick_canvas`);
    the image goes unresized at the top-left of a zero source canvas (`source_canvas`),
    repeated to the export's batch size.

    Returns:
      {"source_image" uint8 [B, Hs, Ws, 3], "source_hw" int32 [B, 2] (h, w), "image_hw" int32
      [B, 2] (the resized size), "scale" float32 [B], "canvas_hw" (H, W)}: `self(**inputs)`.
    """
    image = np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    m = self.meta
    hw = image.shape[:2]
    canvas_hw = self.canvases[pick_canvas(hw, self.canvases, min_size=m["min_size"],
                                          max_size=m["max_size"])]
    scale, image_hw = fit(hw, canvas_hw, min_size=m["min_size"], max_size=m["max_size"])
    b = m["batch_size"]
    source = np.zeros((b, *source_canvas(hw, canvas_hw), 3), np.uint8)
    source[:, :hw[0], :hw[1]] = image
    return {"source_image": source, "source_hw": np.tile(np.array(hw, np.int32), (b, 1)),
            "image_hw": np.tile(image_hw, (b, 1)), "scale": np.full(b, scale, np.float32),
            "canvas_hw": canvas_hw}

  def __call__(self, source_image: np.ndarray, source_hw: np.ndarray, image_hw: np.ndarray,
               scale: np.ndarray, canvas_hw: tuple[int, int] | None = None
               ) -> dict[str, np.ndarray]:
    """Detections of the program of `canvas_hw` (default: the only canvas) on its inputs.

    Args:
      source_image: uint8 [B, Hs, Ws, 3]: each image unresized at the top-left, zeros
        elsewhere (any Hs, Ws).
      source_hw: int32 [B, 2] the images' (height, width).
      image_hw: int32 [B, 2] their resized sizes, at most the canvas.
      scale: float32 [B] resized / original (maps the boxes back).
      canvas_hw: the program's canvas.

    Returns:
      {"boxes" [B, D, 4] original pixels, "scores" [B, D], "labels" [B, D] (1..C), "valid"
      [B, D]}.

    Raises:
      ValueError: no program for `canvas_hw` (or several canvases and none named), or sizes
        beyond the source canvas or the canvas.
    """
    if canvas_hw is None and len(self.canvases) == 1:
      canvas_hw = self.canvases[0]
    call = None if canvas_hw is None else self._calls.get(tuple(int(v) for v in canvas_hw))
    if call is None:
      raise ValueError(f"no exported program for canvas {canvas_hw}: the export has "
                       f"{self.canvases}")
    source_image = np.asarray(source_image, np.uint8)
    source_hw = np.asarray(source_hw, np.int32).reshape(-1, 2)
    image_hw = np.asarray(image_hw, np.int32).reshape(-1, 2)
    if (source_hw > np.array(source_image.shape[1:3])).any():
      raise ValueError(f"source_hw {source_hw.tolist()} exceeds the source canvas "
                       f"{source_image.shape[1:3]}")
    if (image_hw > np.array(canvas_hw)).any():
      raise ValueError(f"image_hw {image_hw.tolist()} exceeds the canvas {tuple(canvas_hw)}")
    out = call(self._params, source_image, source_hw, image_hw, np.asarray(scale, np.float32))
    return {k: np.asarray(v) for k, v in out.items()}

  def detect(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Detections of one uint8 RGB image [h, w, 3] (grayscale [h, w] and RGBA accepted).

    Returns:
      {"boxes" [K, 4] original pixels (clipped to the image), "scores" [K], "labels" [K]}:
      the valid detections.
    """
    inputs = self.prepare(image)
    out = self(**inputs)
    keep = out["valid"][0]
    h, w = (int(v) for v in inputs["source_hw"][0])
    boxes = np.clip(out["boxes"][0][keep], 0.0, np.array([w, h, w, h], np.float32))
    return {"boxes": boxes, "scores": out["scores"][0][keep], "labels": out["labels"][0][keep]}


def load(path: str | os.PathLike) -> ExportedDetector:
  """Loads a file written by the export command into a callable detector.

  Raises:
    FileNotFoundError: there is no file at `path`.
    ValueError: the file is not a frcnn_jax export (another kind of file, or another export
      format; an older format says to export again); pickled data is refused, never loaded.
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
    if meta.get("format") in _OLDER_FORMATS:
      raise ValueError(f"{path} is in the older format {meta['format']!r}, whose programs take "
                       f"images resized outside them; this loader reads {FORMAT}: export it "
                       "again with python -m frcnn_jax.export")
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    programs = [f"program_{i:03d}" for i in range(len(meta["canvases"]))]
    exported = [jax.export.deserialize(bytearray(data[p].tobytes())) for p in programs]
    names = sorted(n for n in data.files if n.startswith("param_"))
    leaves = [data[n] for n in names]
  return ExportedDetector(exported, leaves, meta)
