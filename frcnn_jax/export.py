r"""Exports the inference function with its parameters (jax.export, StableHLO) to one file.

Usage:

  python -m frcnn_jax.export --config experiments/voc.py --workdir runs/voc07 \
      --output model.bin [--step N] [--batch_size 1] [--platforms cpu,cuda]

The file is a NumPy .npz archive holding the serialised `jax.export.Exported` program of
`detector.predict` for a fixed canvas (`data.pad_hw`) and batch size, the parameter arrays
(inputs of the program, not constants baked into it) and a JSON description (canvas size,
resize rule, class names). `load(path)` needs only JAX and NumPy, no model code:

  from frcnn_jax import export
  model = export.load("model.bin")
  out = model(images, image_hw, scale)    # uint8 [B, H, W, 3] canvases, int32 [B, 2], f32 [B]
  out = model.detect(image)               # one uint8 [h, w, 3] RGB image of any size

Both return {"boxes" [.., D, 4] original pixels, "scores", "labels" (1..C), "valid"}.
"""

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags
from PIL import Image

from frcnn_jax import config_flags

FORMAT = "frcnn_jax.export/1"


def export_predict(params: Any, *, model, settings, height: int, width: int,
                   batch_size: int = 1, platforms: Sequence[str] | None = None
                   ) -> tuple[jax.export.Exported, list[np.ndarray]]:
  """Exports `detector.predict` for uint8 canvases [batch_size, height, width, 3].

  Args:
    params: network parameters.
    model: the network.
    settings: detector settings.
    height: canvas height (the pipeline's pad_hw[0]).
    width: canvas width.
    batch_size: images per call.
    platforms: lowering platforms, e.g. ("cpu", "cuda"); default: the current backend.

  Returns:
    (exported, param_leaves): the program takes (param_leaves, images, image_hw, scale).
  """
  from frcnn_jax import detector  # pylint: disable=g-import-not-at-top  # `load` needs no model

  leaves, treedef = jax.tree.flatten(params)

  def infer(param_leaves, images, image_hw, scale):
    batch = {"image": images, "image_hw": image_hw, "scale": scale}
    return detector.predict(jax.tree.unflatten(treedef, param_leaves), batch, model=model,
                            settings=settings)

  specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
           jax.ShapeDtypeStruct((batch_size, height, width, 3), np.uint8),
           jax.ShapeDtypeStruct((batch_size, 2), np.int32),
           jax.ShapeDtypeStruct((batch_size,), np.float32))
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(*specs)
  return exported, [np.asarray(jax.device_get(x)) for x in leaves]


def save(path: str | os.PathLike, exported: jax.export.Exported,
         param_leaves: Sequence[np.ndarray], meta: dict[str, Any]) -> None:
  """Writes the program, its parameters and `meta` (JSON-able) to one .npz file."""
  arrays = {f"param_{i:05d}": np.asarray(x) for i, x in enumerate(param_leaves)}
  arrays["program"] = np.frombuffer(bytes(exported.serialize()), np.uint8)
  arrays["meta"] = np.frombuffer(json.dumps({"format": FORMAT, **meta}).encode(), np.uint8)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def resize_and_pad(image: np.ndarray, *, min_size: int, max_size: int,
                   pad_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.float32]:
  """One image to a model input: scaled so the shorter side is `min_size` (the longer at most
  `max_size`, and fitting `pad_hw`), bilinear, zero-padded at the bottom and right.

  Args:
    image: uint8 [h, w, 3] RGB.
    min_size: target shorter side.
    max_size: cap on the longer side.
    pad_hw: (H, W) canvas.

  Returns:
    canvas uint8 [H, W, 3], image_hw int32 [2], scale float32 (resized / original).
  """
  h, w = image.shape[:2]
  scale = min(min_size / min(h, w), max_size / max(h, w), pad_hw[0] / h, pad_hw[1] / w)
  new_h = min(max(int(round(h * scale)), 1), pad_hw[0])
  new_w = min(max(int(round(w * scale)), 1), pad_hw[1])
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
  canvas = np.zeros((*pad_hw, 3), np.uint8)
  canvas[:new_h, :new_w] = resized
  return canvas, np.array([new_h, new_w], np.int32), np.float32(scale)


class ExportedDetector:
  """A loaded export: call it on canvases, or `detect` one image of any size."""

  def __init__(self, exported: jax.export.Exported, param_leaves: list[np.ndarray],
               meta: dict[str, Any]):
    self.exported = exported
    self.meta = meta
    self.class_names = tuple(meta.get("class_names", ()))
    self._params = [jax.device_put(x) for x in param_leaves]
    self._call = jax.jit(exported.call)

  def __call__(self, images: np.ndarray, image_hw: np.ndarray,
               scale: np.ndarray) -> dict[str, np.ndarray]:
    """Detections of prepared canvases (uint8 [B, H, W, 3], int32 [B, 2], float32 [B])."""
    out = self._call(self._params, np.asarray(images, np.uint8),
                     np.asarray(image_hw, np.int32), np.asarray(scale, np.float32))
    return {k: np.asarray(v) for k, v in out.items()}

  def detect(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Detections of one uint8 RGB image [h, w, 3] (grayscale [h, w] and RGBA accepted).

    Returns:
      {"boxes" [K, 4] original pixels (clipped to the image), "scores" [K], "labels" [K]}:
      the valid detections.
    """
    image = np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    m = self.meta
    canvas, hw, scale = resize_and_pad(image, min_size=m["min_size"], max_size=m["max_size"],
                                       pad_hw=tuple(m["pad_hw"]))
    b = m["batch_size"]
    out = self(np.repeat(canvas[None], b, 0), np.repeat(hw[None], b, 0), np.full(b, scale))
    keep = out["valid"][0]
    h, w = image.shape[:2]
    boxes = np.clip(out["boxes"][0][keep], 0.0, np.array([w, h, w, h], np.float32))
    return {"boxes": boxes, "scores": out["scores"][0][keep], "labels": out["labels"][0][keep]}


def load(path: str | os.PathLike) -> ExportedDetector:
  """Loads a file written by `save` (or the export command) into a callable detector."""
  with np.load(path) as data:
    meta = json.loads(data["meta"].tobytes().decode())
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    exported = jax.export.deserialize(bytearray(data["program"].tobytes()))
    names = sorted(n for n in data.files if n.startswith("param_"))
    leaves = [data[n] for n in names]
  return ExportedDetector(exported, leaves, meta)


def define_flags() -> None:
  """Defines the command's flags."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Training run directory (reads checkpoints/).")
  flags.DEFINE_string("output", None, "File to write, e.g. model.bin.")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
  flags.DEFINE_integer("batch_size", 1, "Images per call of the exported program.")
  flags.DEFINE_list("platforms", [], "Platforms to lower for (cpu, cuda, rocm, tpu); default: "
                    "the current backend.")


def main(argv: Sequence[str]) -> None:
  # The command needs the model code; `load` above does not.
  from frcnn_jax import builders  # pylint: disable=g-import-not-at-top
  from frcnn_jax import detect  # pylint: disable=g-import-not-at-top
  from frcnn_jax import evaluate  # pylint: disable=g-import-not-at-top
  from frcnn_jax import parallel  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("config", "workdir", "output"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  config = f.config
  try:
    class_names = detect.class_names_from_config(config)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    params, step = evaluate.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  height, width = (int(v) for v in config.data.pad_hw)
  exported, leaves = export_predict(
      params, model=builders.model_from_config(config, len(class_names)),
      settings=builders.detector_settings_from_config(config), height=height, width=width,
      batch_size=f.batch_size, platforms=f.platforms or None)
  save(f.output, exported, leaves, {
      "class_names": list(class_names), "pad_hw": [height, width],
      "min_size": int(config.data.min_size), "max_size": int(config.data.max_size),
      "batch_size": int(f.batch_size), "step": step, "platforms": list(exported.platforms)})
  size = os.path.getsize(f.output) / 2**20
  print(f"wrote {f.output} ({size:.1f} MiB): step {step}, input uint8 [{f.batch_size}, "
        f"{height}, {width}, 3], platforms {', '.join(exported.platforms)}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
