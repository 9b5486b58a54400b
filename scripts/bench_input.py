"""Input-pipeline throughput on VOC-sized JPEGs: images/s per CPU core, host or device resize.

Writes `--num_images` random 500x375 JPEGs with VOC XML annotations into a temporary VOCdevkit
tree and reads them through `frcnn_jax.data.voc.VOCFolderSource`, for both settings of
`data.resize_on`:

  host    decode, resize to 600/1000 (Pillow), random flip, pad to the canvas;
  device  decode and place on the 384x512 source canvas (the pipeline's for these images);
          `frcnn_jax.ops.images.batch_images` resizes, flips and pads inside the jitted step.

It times each mode's per-record host work in this process alone, interleaved (A, B, A, B), per
wall second and per process-CPU second (one core, independent of the machine's other load);
the device's share on this machine's first JAX device; and the training loader (numpy
batches) for each worker count.

Usage:

  python scripts/bench_input.py [--num_images 48] [--canvas 608x800] [--workers 0,1,2]
                                [--repeats 3] [--target_images_per_s 250]

Prints one line per setting and, last, a JSON line with "per_core_images_per_s" and
"per_cpu_second_images" ({"host": ..., "device": ...}), "device_resize_images_per_s",
"loader_images_per_s" ({"host/0": ..., "device/2": ...}), "cores_to_feed_target" per mode
(ceil(target / per-CPU-second rate): the host cores that keep one accelerator consuming
`target_images_per_s` fed) and "export_loader_resize_ms" ({"numpy": ..., "pillow": ...}: the
JAX + NumPy loader's resize of one photo to 600x800, and Pillow's).
"""

import argparse
import collections
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position  # scripts/

from frcnn_jax.config import defaults  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.data import canvases  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.data import voc  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.export import loader as export_loader  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.ops import images as image_ops  # pylint: disable=g-import-not-at-top,wrong-import-position

WIDTH, HEIGHT = 500, 375
SIZES = dict(min_size=600, max_size=1000, max_gt=64)


def _photo_like(rng: np.random.Generator) -> np.ndarray:
  """A smooth colour field with rectangles and mild noise (JPEG size close to a photo's)."""
  small = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)
  for _ in range(4):
    x, y = int(rng.integers(0, WIDTH - 60)), int(rng.integers(0, HEIGHT - 60))
    image[y:y + int(rng.integers(30, 200)), x:x + int(rng.integers(30, 200))] = rng.uniform(
        0, 255, 3)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_tree(root: pathlib.Path, num_images: int, seed: int = 0) -> None:
  """Writes <root>/VOCdevkit/VOC2007 with `num_images` JPEGs and a trainval list."""
  year = root / "VOCdevkit" / "VOC2007"
  for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
    (year / sub).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  names = []
  for i in range(num_images):
    name = f"{i:06d}"
    names.append(name)
    Image.fromarray(_photo_like(rng)).save(year / "JPEGImages" / f"{name}.jpg", quality=90)
    objects = []
    for _ in range(int(rng.integers(1, 6))):
      x1, y1 = int(rng.integers(1, WIDTH - 40)), int(rng.integers(1, HEIGHT - 40))
      x2, y2 = int(rng.integers(x1 + 20, WIDTH + 1)), int(rng.integers(y1 + 20, HEIGHT + 1))
      cls = defaults.VOC_CLASSES[int(rng.integers(len(defaults.VOC_CLASSES)))]
      objects.append(f"<object><name>{cls}</name><difficult>0</difficult><bndbox>"
                     f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                     "</bndbox></object>")
    (year / "Annotations" / f"{name}.xml").write_text(
        f"<annotation><filename>{name}.jpg</filename><size><width>{WIDTH}</width>"
        f"<height>{HEIGHT}</height><depth>3</depth></size>{''.join(objects)}</annotation>")
  (year / "ImageSets" / "Main" / "trainval.txt").write_text("".join(n + "\n" for n in names))


# What the pipeline ships these images on when the device resizes (one group of one size).
SOURCE_CANVAS = tuple(int(n) for n in canvases.source_canvases(
    np.array([[HEIGHT, WIDTH]]), np.zeros(1, np.int32), 1)[0])
MODES = ("host", "device")   # data.resize_on


def prepare(example, mode: str, flip: bool, canvas: tuple[int, int]):
  """One record through the host's share of `mode`: decode + resize + flip + pad (host), or
  decode + place on the source canvas + box arithmetic (device; the device resizes)."""
  source_canvas = SOURCE_CANVAS if mode == "device" else None
  return transforms.prepare(example, training=True, flip=flip, pad_hw=canvas,
                            source_canvas=source_canvas, **SIZES)


def time_in_process(source, canvas: tuple[int, int], repeats: int) -> dict[str, float]:
  """Median images per wall second and per process-CPU second (one core; the latter does not
  depend on what else runs on the machine) of each mode's per-record host work, interleaved."""
  rates: dict[str, list[float]] = collections.defaultdict(list)
  for r in range(repeats):
    for mode in MODES:
      start, cpu_start = time.perf_counter(), time.process_time()
      for i in range(len(source)):
        prepare(source[i], mode, bool((i + r) % 2), canvas)
      rates[mode].append(len(source) / (time.perf_counter() - start))
      rates[mode + "_cpu"].append(len(source) / (time.process_time() - cpu_start))
  return {k: statistics.median(v) for k, v in rates.items()}


def time_export_resize(image: np.ndarray, repeats: int) -> dict[str, float]:
  """Median milliseconds of `export_loader.resize_bilinear` (the JAX + NumPy loader's Pillow
  port) and of Pillow itself on one VOC-sized photo to 600x800 (the pipeline's scale for
  it), interleaved."""
  height, width = 600, 800
  resizers = {"numpy": lambda: export_loader.resize_bilinear(image, height, width),
              "pillow": lambda: Image.fromarray(image).resize((width, height), Image.BILINEAR)}
  times: dict[str, list[float]] = collections.defaultdict(list)
  for _ in range(max(5, 3 * repeats)):
    for name, resize in resizers.items():
      start = time.perf_counter()
      resize()
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: statistics.median(t) for name, t in times.items()}


def _loader(source, mode: str, canvas: tuple[int, int], workers: int, batch_size: int):
  return pipeline.train_loader(source, batch_size=batch_size, seed=0, flip=True,
                               num_workers=workers, prefetch=0, canvases=(canvas,),
                               resize_on_device=mode == "device", **SIZES)


def time_device_resize(source, canvas: tuple[int, int], batch_size: int, repeats: int) -> float:
  """Median images/s of the device's share (`images.batch_images`, jitted) on the first JAX
  device, on one batch of the device-mode loader."""
  batch = next(_loader(source, "device", canvas, 0, batch_size))
  batch = {k: jax.device_put(batch[k]) for k in image_ops.SOURCE_KEYS + ("image_hw",)}
  run = jax.jit(image_ops.batch_images)
  jax.block_until_ready(run(batch))
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(batch))
    rates.append(batch_size / (time.perf_counter() - start))
  return statistics.median(rates)


def time_loader(source, mode: str, canvas: tuple[int, int], workers: int, batch_size: int,
                repeats: int) -> float:
  """Median images/s of the training loader (numpy batches) after its first batch."""
  loader = _loader(source, mode, canvas, workers, batch_size)
  next(loader)   # starts the workers
  steps = max(len(source) // batch_size, 1)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(loader)
    rates.append(steps * batch_size / (time.perf_counter() - start))
  loader.close()
  return statistics.median(rates)


def _canvas(text: str) -> tuple[int, int]:
  """"HxW" -> (H, W) (`benchmark.parse_size`); argparse reports anything else as a usage
  error."""
  try:
    return benchmark.parse_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=48)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--canvas", default=(608, 800), type=_canvas,
                      help="training canvas HxW (608x800: VOC's 4 canvases put 500x375 here)")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--target_images_per_s", type=float, default=250.0,
                      help="images/s one accelerator consumes (for cores_to_feed_target)")
  args = parser.parse_args()
  for name in ("num_images", "batch_size", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  canvas = args.canvas
  try:
    workers = [int(w) for w in args.workers.split(",") if w]
  except ValueError:
    parser.error(f"--workers takes comma-separated counts, e.g. 0,1,2; got {args.workers!r}")
  if any(w < 0 for w in workers):
    parser.error(f"--workers counts must be >= 0, got {args.workers!r}")
  with tempfile.TemporaryDirectory() as tmp:
    write_tree(pathlib.Path(tmp), args.num_images)
    source = voc.VOCFolderSource(tmp, ("2007",), "trainval")
    rates = time_in_process(source, canvas, args.repeats)
    for mode in MODES:
      print(f"in-process, data.resize_on={mode}: {rates[mode]:.1f} images/s (1 core; "
            f"{rates[mode + '_cpu']:.1f} per CPU-second)", flush=True)
    device_rate = time_device_resize(source, canvas, args.batch_size, args.repeats)
    print(f"device resize + flip + pad on {jax_device()}: {device_rate:.1f} images/s",
          flush=True)
    export_ms = time_export_resize(source[0]["image"], args.repeats)
    print(f"export_loader resize to 600x800: {export_ms['numpy']:.1f} ms (NumPy), Pillow "
          f"{export_ms['pillow']:.1f} ms", flush=True)
    loader_rates = {}
    for mode in MODES:
      for w in workers:
        rate = time_loader(source, mode, canvas, w, args.batch_size, args.repeats)
        loader_rates[f"{mode}/{w}"] = rate
        print(f"loader data.resize_on={mode} num_workers={w}: {rate:.1f} images/s "
              f"({rate / max(w, 1):.1f} per worker core)", flush=True)
  print(json.dumps({
      "image_hw": [HEIGHT, WIDTH], "canvas": list(canvas), "source_canvas": list(SOURCE_CANVAS),
      "num_images": args.num_images, "batch_size": args.batch_size,
      "per_core_images_per_s": {m: round(rates[m], 2) for m in MODES},
      "per_cpu_second_images": {m: round(rates[m + "_cpu"], 2) for m in MODES},
      "device_resize_images_per_s": round(device_rate, 2),
      "loader_images_per_s": {k: round(v, 2) for k, v in loader_rates.items()},
      "export_loader_resize_ms": {k: round(v, 2) for k, v in export_ms.items()},
      "cpu_count": os.cpu_count(),
      "target_images_per_s": args.target_images_per_s,
      "cores_to_feed_target": {m: math.ceil(args.target_images_per_s / rates[m + "_cpu"])
                               for m in MODES},
      "load_avg_1min": round(os.getloadavg()[0], 2),
  }))


def jax_device() -> str:
  return str(jax.devices()[0].device_kind)


if __name__ == "__main__":
  main()
