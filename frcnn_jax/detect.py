r"""Runs a trained detector on image files and writes JSON detections and annotated PNGs.

Usage:

  python -m frcnn_jax.detect --workdir runs/voc07 --output out/ [--step N] \
      [--threshold 0.5] [--config.test.score_threshold=0.1 ...] image.jpg more/*.png folder/

The run's config (WORKDIR/config.json) is used; test-time keys may be overridden (see
frcnn_jax/config/run.py). The output folder must lie outside the input folders; files left
there by an earlier run are kept unless --overwrite. An unreadable image is skipped with a
message, the others are processed, and the exit code is 1 at the end. A folder is searched for
image files (by suffix) without its subfolders; what it skips is listed on stderr.

For each image `<name>.<ext>`: `OUT/<name>.json` with every detection (score above the
config's `test.score_threshold`; boxes xyxy in original-image pixels, continuous coordinates)
and `OUT/<name>.png` with the detections scoring at least `--threshold` drawn and labelled
(an image whose shorter side is under 256 px enlarged by an integer factor, so that the labels
are readable). When two inputs share a file stem (`a/x.jpg`, `b/x.png`), OUT mirrors the inputs'
paths below their common folder instead (`OUT/a/x.json`, `OUT/b/x.json`; the suffix is kept,
`OUT/a/x.jpg.json`, when the stems collide within one folder). Each image's line on stdout
names its input and its outputs.
Images of any size and mode (grayscale, palette, RGBA: alpha dropped) are resized and padded
exactly as in evaluation, each onto the smallest canvas that holds it: the config's
`data.pad_hw` / `data.canvases`, else `data.num_canvases` canvases chosen for the sizes of the
images given (one compiled program per canvas).
"""

import json
import logging
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

from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.config import run as run_config
from frcnn_jax.data import canvases as canvas_lib
from frcnn_jax.data import images as image_io
from frcnn_jax.data import transforms
from frcnn_jax.detection import detector
from frcnn_jax.evaluation import runner as eval_runner
from frcnn_jax.runtime import console
from frcnn_jax.runtime import parallel
from frcnn_jax.training import restore
from frcnn_jax.visualization import drawing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def list_images(inputs: Sequence[str]) -> list[pathlib.Path]:
  """Image files named in `inputs`: files as given, folders expanded (sorted, non-recursive).

  What a folder holds besides image files (subfolders, files without an image suffix) is
  skipped, and said on stderr, one line per folder and kind.

  Raises:
    FileNotFoundError: an input does not exist, or no image was found.
  """
  paths = []
  for item in inputs:
    path = pathlib.Path(item)
    if path.is_dir():
      entries = sorted(path.iterdir())
      paths.extend(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
      folders = [p.name for p in entries if p.is_dir()]
      others = [p.name for p in entries
                if not p.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES]
      if folders:
        print(f"{item}: skipped {console.count(len(folders), 'subfolder')} (folders are not "
              f"searched; give them as inputs to include them): {_names(folders)}",
              file=sys.stderr, flush=True)
      if others:
        print(f"{item}: skipped {console.count(len(others), 'file')} without an image suffix "
              f"({', '.join(IMAGE_SUFFIXES)}): {_names(others)}", file=sys.stderr, flush=True)
    elif path.is_file():
      paths.append(path)
    else:
      raise FileNotFoundError(f"{item}: no such file or folder")
  if not paths:
    raise FileNotFoundError(f"no image files in {list(inputs)}")
  return paths


def _names(names: Sequence[str], most: int = 5) -> str:
  shown = ", ".join(names[:most])
  return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def prepare(image: np.ndarray, config: ml_collections.ConfigDict,
            canvases: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
  """One RGB image -> a batch of one (canvas, image_hw, scale), resized as in evaluation.

  Args:
    image: uint8 [h, w, 3].
    config: the run's config (resize rule, canvases).
    canvases: the canvases to pick from (default: `builders.canvases_from_config` for this
      image's size). The image goes on the smallest that holds it
      (`canvases.place_canvases`).

  Returns:
    {"image" uint8 [1, H, W, 3], "image_hw" int32 [1, 2], "scale" float32 [1]}.
  """
  d = config.data
  if canvases is None:
    canvases = builders.canvases_from_config(config, sizes=[image.shape[:2]])
  size = canvas_lib.resized_hw(image.shape[:2], d.min_size, d.max_size)
  pad_hw = tuple(int(v) for v in canvases[int(canvas_lib.place_canvases([size], canvases)[0])])
  scale = transforms.fit_scale(image.shape[:2], d.min_size, d.max_size, pad_hw)
  resized, _ = transforms.resize(image, np.zeros((0, 4), np.float32), scale, pad_hw)
  return {"image": transforms.pad_image(resized, pad_hw)[None],
          "image_hw": np.array([resized.shape[:2]], np.int32),
          "scale": np.array([scale], np.float32)}


def canvases_for_images(config: ml_collections.ConfigDict, paths: Sequence[pathlib.Path]
                        ) -> tuple[tuple[int, int], ...]:
  """The canvases `run` uses: the config's (`data.pad_hw` / `data.canvases`), else
  `data.num_canvases` chosen for the images' sizes (read from their headers)."""
  sizes = []
  for path in paths:
    try:
      sizes.append(image_io.image_size(path))
    except (image_io.ImageDecodeError, OSError):
      continue   # `run` reports it when it reads the image
  return builders.canvases_from_config(config, sizes=sizes or None)


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


def output_names(paths: Sequence[pathlib.Path]) -> list[str]:
  """The output name of each input, relative to the output folder, without suffix.

  The file stem ("x") when every input has its own stem; otherwise each input's path below
  the inputs' common folder ("a/x"), keeping the suffix ("a/x.jpg") for the inputs whose stems
  collide within one folder. The same file given twice gets the same name.
  """
  files = [os.path.abspath(p) for p in paths]
  distinct = set(files)
  stems = {os.path.splitext(os.path.basename(f))[0] for f in distinct}
  if len(stems) == len(distinct):
    return [pathlib.Path(f).stem for f in files]
  root = os.path.commonpath([os.path.dirname(f) for f in distinct])
  relative = {f: pathlib.Path(os.path.relpath(f, root)) for f in distinct}
  taken: dict[pathlib.PurePath, int] = {}
  for rel in relative.values():
    taken[rel.with_suffix("")] = taken.get(rel.with_suffix(""), 0) + 1
  names = {f: (rel.with_suffix("") if taken[rel.with_suffix("")] == 1 else rel).as_posix()
           for f, rel in relative.items()}
  return [names[f] for f in files]


def check_output(output: str | os.PathLike, inputs: Sequence[str],
                 paths: Sequence[pathlib.Path], *, overwrite: bool = False) -> None:
  """Refuses an output folder that would write over an input or an earlier result.

  Args:
    output: the output folder.
    inputs: the files and folders given on the command line.
    paths: the image files found in them.
    overwrite: allow replacing `<name>.json` / `<name>.png` of an earlier run (never inputs).

  Raises:
    ValueError: the output folder is an input folder, lies inside one or contains one; an
      output file would be an input image; or (without `overwrite`) an output file exists.
  """
  out_dir = pathlib.Path(output).resolve()
  for item in inputs:
    folder = pathlib.Path(item).resolve()
    if folder.is_dir() and (out_dir == folder or out_dir.is_relative_to(folder)
                            or folder.is_relative_to(out_dir)):
      raise ValueError(f"--output {output} {'is' if out_dir == folder else 'overlaps'} the "
                       f"input folder {item}: choose an output folder outside the inputs")
  images = {p.resolve() for p in paths}
  existing = []
  for name in output_names(paths):
    for suffix in (".json", ".png"):
      target = out_dir / f"{name}{suffix}"
      if target in images:
        raise ValueError(f"--output {output} would write {target} over an input image: "
                         "choose another output folder")
      if target.exists():
        existing.append(str(target))
  if existing and not overwrite:
    raise ValueError(f"{len(existing)} output files exist already (e.g. {existing[0]}), from "
                     "an earlier run: choose another --output, or pass --overwrite")


def run(config: ml_collections.ConfigDict, params: Any, paths: Sequence[pathlib.Path],
        output: str | os.PathLike, *, class_names: Sequence[str], threshold: float = 0.5,
        skipped: list[tuple[pathlib.Path, str]] | None = None,
        extra: dict[str, Any] | None = None) -> list[pathlib.Path]:
  """Detects objects in each image and writes `<name>.json` and `<name>.png` into `output`.

  `<name>` is the image's `output_names` entry (a path below `output` when file stems collide).
  The PNG of an image whose shorter side is under 256 px is enlarged (`drawing.display_factor`)
  so that its labels are readable. An image that cannot be read or decoded is skipped with a
  message on stderr (and appended to `skipped`); the others are still processed. One line per
  image on stdout names the input and its outputs.

  Args:
    config: the experiment config (model, test settings, resizing).
    params: network parameters.
    paths: image files.
    output: output folder (created).
    class_names: C names; label c is class_names[c - 1].
    threshold: minimum score of the drawn detections (the JSON keeps them all).
    skipped: where to append (path, reason) of each image that could not be read.
    extra: more fields for every JSON record (e.g. the checkpoint step, config overrides).

  Returns:
    The JSON paths written, in input order.
  """
  model = builders.model_from_config(config, len(class_names))
  settings = builders.detector_settings_from_config(config)
  out_dir = pathlib.Path(output)
  out_dir.mkdir(parents=True, exist_ok=True)
  canvases = canvases_for_images(config, paths)
  written = []
  for path, name in zip(paths, output_names(paths)):
    try:
      image = image_io.read_image(path)
    except image_io.ImageDecodeError as e:
      print(f"skipped {e}", file=sys.stderr, flush=True)   # the message names the file
      if skipped is not None:
        skipped.append((path, str(e)))
      continue
    out = jax.device_get(detector.predict(params, prepare(image, config, canvases),
                                          model=model, settings=settings))
    out = {k: v[0] for k, v in out.items()}
    out["boxes"] = eval_runner.clip_to_image(out["boxes"], *image.shape[:2])
    record = detections_record(path, image, out, class_names)
    record.update(extra or {})
    json_path = out_dir / f"{name}.json"
    png_path = out_dir / f"{name}.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    shown = out["valid"] & (out["scores"] >= threshold)
    factor = drawing.display_factor(image.shape[:2])
    drawing.draw_boxes(drawing.enlarge(image, factor), out["boxes"][shown] * factor,
                       out["labels"][shown], out["scores"][shown], class_names).save(png_path)
    print(f"{path} -> {json_path}, {png_path.name}: "
          f"{console.count(len(record['detections']), 'detection')}, {int(shown.sum())} drawn",
          flush=True)
    written.append(json_path)
  return written


def define_flags() -> None:
  """Defines the command's flags."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Training run directory (reads checkpoints/ and "
                      "config.json).")
  flags.DEFINE_string("output", None, "Output folder for <name>.json and <name>.png (created; "
                      "never an input folder).")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
  flags.DEFINE_float("threshold", 0.5, "Minimum score of the detections drawn on the PNGs "
                     "(the JSON keeps every detection above test.score_threshold).")
  flags.DEFINE_bool("overwrite", False, "Replace <name>.json / <name>.png left in --output by "
                    "an earlier run (inputs are never replaced).")


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) < 2:
    raise app.UsageError("give at least one image file or folder")
  for name in ("workdir", "output"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  skipped = []
  try:
    resolved = run_config.from_flags(f.workdir)
    for note in resolved.notes:
      logging.warning("%s", note)
    paths = list_images(argv[1:])
    check_output(f.output, argv[1:], paths, overwrite=f.overwrite)
    class_names = builders.class_names(resolved.config)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    params, step = restore.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
    print(f"checkpoint step {step}, {console.count(len(paths), 'image')}", flush=True)
    run(resolved.config, params, paths, f.output, class_names=class_names,
        threshold=f.threshold, skipped=skipped,
        extra={"step": step, "overrides": resolved.overrides})
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if skipped:
    sys.exit(f"error: {len(skipped)} of {console.count(len(paths), 'image')} could not be read: "
             + ", ".join(str(p) for p, _ in skipped))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
