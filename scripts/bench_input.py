"""Input-pipeline throughput on VOC-sized JPEGs: images/s per CPU core.

Writes `--num_images` random 500x375 JPEGs with VOC XML annotations into a temporary VOCdevkit
tree, reads them through `frcnn_jax.data.voc.VOCFolderSource` and runs the training pipeline
(decode, resize to 600/1000, random flip, pad to 1000x1000, batch) with numpy output, for each
worker count. Also times the per-image work (decode + transform) in this process alone.

Usage:

  python scripts/bench_input.py [--num_images 48] [--workers 0,1,2] [--repeats 3]
                                [--target_images_per_s 20]

Prints one line per setting and, last, a JSON line:
  {"per_core_images_per_s": ..., "workers": {"0": images/s, ...}, "cores_to_feed_target": ...}
where per_core_images_per_s is the median single-process rate of decode + transform and
cores_to_feed_target = ceil(target / per-core rate): the CPU cores the input pipeline needs to
keep one accelerator consuming `target_images_per_s` fed.
"""

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from frcnn_jax import defaults  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.data import voc  # pylint: disable=g-import-not-at-top,wrong-import-position

WIDTH, HEIGHT = 500, 375
SIZES = dict(min_size=600, max_size=1000, pad_hw=(1000, 1000), max_gt=64)


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


def time_in_process(source, repeats: int) -> float:
  """Median images/s of decode + transform in this process (one core)."""
  rates = []
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(len(source)):
      transforms.prepare(source[i], training=True, flip=bool((i + r) % 2), **SIZES)
    rates.append(len(source) / (time.perf_counter() - start))
  return statistics.median(rates)


def time_loader(source, workers: int, batch_size: int, repeats: int) -> float:
  """Median images/s of the training loader (numpy batches) after its first batch."""
  loader = pipeline.train_loader(source, batch_size=batch_size, seed=0, flip=True,
                                 num_workers=workers, prefetch=0, **SIZES)
  next(loader)   # starts the workers
  steps = max(len(source) // batch_size, 1)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(loader)
    rates.append(steps * batch_size / (time.perf_counter() - start))
  return statistics.median(rates)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=48)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--target_images_per_s", type=float, default=20.0,
                      help="images/s one accelerator consumes (for cores_to_feed_target)")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",") if w]
  with tempfile.TemporaryDirectory() as tmp:
    write_tree(pathlib.Path(tmp), args.num_images)
    source = voc.VOCFolderSource(tmp, ("2007",), "trainval")
    per_core = time_in_process(source, args.repeats)
    print(f"in-process decode + transform: {per_core:.1f} images/s (1 core)", flush=True)
    loader_rates = {}
    for w in workers:
      loader_rates[str(w)] = time_loader(source, w, args.batch_size, args.repeats)
      print(f"loader num_workers={w}: {loader_rates[str(w)]:.1f} images/s "
            f"({loader_rates[str(w)] / max(w, 1):.1f} per worker core)", flush=True)
  print(json.dumps({
      "image_hw": [HEIGHT, WIDTH], "canvas": list(SIZES["pad_hw"]),
      "num_images": args.num_images, "batch_size": args.batch_size,
      "per_core_images_per_s": round(per_core, 2),
      "workers": {k: round(v, 2) for k, v in loader_rates.items()},
      "cpu_count": os.cpu_count(),
      "target_images_per_s": args.target_images_per_s,
      "cores_to_feed_target": math.ceil(args.target_images_per_s / per_core),
  }))


if __name__ == "__main__":
  main()
