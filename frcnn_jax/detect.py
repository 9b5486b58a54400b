r"""Runs a trained detector on image files and writes JSON detections and annotated PNGs.

Usage:

  python -m frcnn_jax.detect --config experiments/voc.py --workdir runs/voc07 \
      --output out/ [--step N] [--threshold 0.5] image.jpg more/*.png folder/

For each image `<name>.<ext>`: `OUT/<name>.json` with every detection (score above the
config's `test.score_threshold`; boxes xyxy in original-image pixels, continuous coordinates)
and `OUT/<name>.png` with the detections scoring at least `--threshold` drawn and labelled.
Images of any size and mode (grayscale, palette, RGBA: alpha dropped) are resized and padded
exactly as in evaluation.
"""

import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags

from frcnn_jax import builders
from frcnn_jax import config_flags
from frcnn_jax import detector
from frcnn_jax import drawing
from frcnn_jax import evaluate
from frcnn_jax import parallel
from frcnn_jax.data import images as image_io
from frcnn_jax.data import shapes
from frcnn_jax.data import transforms

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def list_images(inputs: Sequence[str]) -> list[pathlib.Path]:
  """Image files named in `inputs`: files as given, folders expanded (sorted, non-recursive).

  Raises:
    FileNotFoundError: an input does not exist, or no image was found.
  """
  paths = []
  for item in inputs:
    path = pathlib.Path(item)
    if path.is_dir():
      paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    elif path.is_file():
      paths.append(path)
    else:
      raise FileNotFoundError(f"{item}: no such file or folder")
  if not paths:
    raise FileNotFoundError(f"no image files in {list(inputs)}")
  return paths


def class_names_from_config(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The class names the run was trained with (without reading a dataset where possible)."""
  if config.data.name == "shapes":
    return tuple(shapes.ShapesSource.classes)
  if config.data.name in ("voc_tfds", "voc_folder"):
    return tuple(config.data.classes)
  return tuple(builders.source_from_config(config, "eval").classes)


def prepare(image: np.ndarray, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """One RGB image -> a batch of one (canvas, image_hw, scale), resized as in evaluation."""
  d = config.data
  pad_hw = tuple(int(v) for v in d.pad_hw)
  scale = transforms.resize_scale(image.shape[:2], d.min_size, d.max_size, pad_hw)
  resized, _ = transforms.resize(image, np.zeros((0, 4), np.float32), scale, pad_hw)
  return {"image": transforms.pad_image(resized, pad_hw)[None],
          "image_hw": np.array([resized.shape[:2]], np.int32),
          "scale": np.array([scale], np.float32)}


def detections_record(path: pathlib.Path, image: np.ndarray, out: dict[str, np.ndarray],
                      class_names: Sequence[str]) -> dict[str, Any]:
  """The JSON record of one image's valid detections (`out`: one image's `predict` output,
  boxes already clipped to the image)."""
  keep = out["valid"]
  dets = []
  for box, score, label in zip(out["boxes"][keep], out["scores"][keep], out["labels"][keep]):
    dets.append({"box": [round(float(v), 2) for v in box], "score": round(float(score), 5),
                 "label": int(label), "class": class_names[int(label) - 1]})
  return {"image": str(path), "height": int(image.shape[0]), "width": int(image.shape[1]),
          "detections": dets}


def run(config: ml_collections.ConfigDict, params: Any, paths: Sequence[pathlib.Path],
        output: str | os.PathLike, *, class_names: Sequence[str], threshold: float = 0.5
        ) -> list[pathlib.Path]:
  """Detects objects in each image and writes `<name>.json` and `<name>.png` into `output`.

  Args:
    config: the experiment config (model, test settings, resizing).
    params: network parameters.
    paths: image files.
    output: output folder (created).
    class_names: C names; label c is class_names[c - 1].
    threshold: minimum score of the drawn detections (the JSON keeps them all).

  Returns:
    The JSON paths written, in input order.
  """
  model = builders.model_from_config(config, len(class_names))
  settings = builders.detector_settings_from_config(config)
  out_dir = pathlib.Path(output)
  out_dir.mkdir(parents=True, exist_ok=True)
  written, used = [], set()
  for path in paths:
    image = image_io.read_image(path)
    out = jax.device_get(detector.predict(params, prepare(image, config), model=model,
                                          settings=settings))
    out = {k: v[0] for k, v in out.items()}
    out["boxes"] = evaluate.clip_to_image(out["boxes"], *image.shape[:2])
    name = path.stem
    while name in used:
      name += "_"
    used.add(name)
    record = detections_record(path, image, out, class_names)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    shown = out["valid"] & (out["scores"] >= threshold)
    drawing.draw_boxes(image, out["boxes"][shown], out["labels"][shown], out["scores"][shown],
                       class_names).save(out_dir / f"{name}.png")
    print(f"{path}: {len(record['detections'])} detections, {int(shown.sum())} drawn",
          flush=True)
    written.append(json_path)
  return written


def define_flags() -> None:
  """Defines the command's flags."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Training run directory (reads checkpoints/).")
  flags.DEFINE_string("output", None, "Output folder for <name>.json and <name>.png.")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
  flags.DEFINE_float("threshold", 0.5, "Minimum score of the detections drawn on the PNGs "
                     "(the JSON keeps every detection above test.score_threshold).")


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) < 2:
    raise app.UsageError("give at least one image file or folder")
  for name in ("config", "workdir", "output"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  try:
    paths = list_images(argv[1:])
    class_names = class_names_from_config(f.config)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    params, step = evaluate.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
    print(f"checkpoint step {step}, {len(paths)} images", flush=True)
    run(f.config, params, paths, f.output, class_names=class_names, threshold=f.threshold)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
