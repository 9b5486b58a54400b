"""Input-pipeline throughput on VOC-sized JPEGs: images/s per CPU core.

Writes `--num_images` random 500x375 JPEGs with VOC XML annotations into a temporary VOCdevkit
tree, reads them through `frcnn_jax.data.voc.VOCFolderSource` and runs the training pipeline
(decode, resize to 600/1000, random flip, pad to 1000x1000, batch) with numpy output, for each
worker count. Also times the per-image work in this process alone, interleaved (A, B, A, B):
decode + transform (the host path) and decode only (the record read and decoded, the image
placed on a fixed 500x500 source canvas, its resized size computed: what the host does when
`frcnn_jax.ops.images.resize_flip_pad` resizes, flips and pads on the device), and the device
op's own rate on this machine's first JAX device.

Usage:

  python scripts/bench_input.py [--num_images 48] [--workers 0,1,2] [--repeats 3]
                                [--target_images_per_s 20]

Prints one line per setting and, last, a JSON line:
  {"per_core_images_per_s": ..., "decode_only_per_core_images_per_s": ...,
   "device_resize_images_per_s": ..., "workers": {"0": images/s, ...},
   "cores_to_feed_target": ..., "decode_only_cores_to_feed_target": ...}
where per_core_images_per_s is the median single-process rate of decode + transform and
cores_to_feed_target = ceil(target / per-core rate): the CPU cores the input pipeline needs to
keep one accelerator consuming `target_images_per_s` fed.
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


SOURCE_CANVAS = (500, 500)   # VOC images are at most 500 pixels a side


def decode_only(example, flip: bool) -> dict[str, np.ndarray]:
  """The host's share of the device path: the decoded image on the source canvas, its size,
  its resized size and the flip flag (`frcnn_jax.ops.images.resize_flip_pad`'s inputs)."""
  image = example["image"]
  hw = image.shape[:2]
  scale = transforms.fit_scale(hw, SIZES["min_size"], SIZES["max_size"], SIZES["pad_hw"])
  return {"image": transforms.pad_image(image, SOURCE_CANVAS),
          "source_hw": np.asarray(hw, np.int32),
          "target_hw": np.asarray(transforms.scaled_hw(hw, scale, SIZES["pad_hw"]), np.int32),
          "scale": np.float32(scale), "flip": np.bool_(flip)}


def time_in_process(source, repeats: int) -> dict[str, float]:
  """Median images per wall second and per process-CPU second (one core; the latter does not
  depend on what else runs on the machine) of decode + transform ("host") and of decode only
  ("decode"), measured interleaved."""
  rates: dict[str, list[float]] = collections.defaultdict(list)
  for r in range(repeats):
    for mode in ("host", "decode"):
      start, cpu_start = time.perf_counter(), time.process_time()
      for i in range(len(source)):
        flip = bool((i + r) % 2)
        if mode == "host":
          transforms.prepare(source[i], training=True, flip=flip, **SIZES)
        else:
          decode_only(source[i], flip)
      rates[mode].append(len(source) / (time.perf_counter() - start))
      rates[mode + "_cpu"].append(len(source) / (time.process_time() - cpu_start))
  return {k: statistics.median(v) for k, v in rates.items()}


def time_device_resize(source, batch_size: int, repeats: int) -> float:
  """Median images/s of `resize_flip_pad` (jitted) on the first JAX device."""
  import jax  # pylint: disable=g-import-not-at-top
  from frcnn_jax.ops import images as image_ops  # pylint: disable=g-import-not-at-top
  fields = [decode_only(source[i % len(source)], bool(i % 2)) for i in range(batch_size)]
  batch = {k: jax.device_put(np.stack([f[k] for f in fields]))
           for k in ("image", "source_hw", "target_hw", "flip")}
  run = lambda: image_ops.resize_flip_pad(batch["image"], batch["source_hw"],
                                          batch["target_hw"], batch["flip"],
                                          canvas_hw=tuple(SIZES["pad_hw"]))
  jax.block_until_ready(run())
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    rates.append(batch_size / (time.perf_counter() - start))
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
    rates = time_in_process(source, args.repeats)
    per_core, decode_rate = rates["host"], rates["decode"]
    print(f"in-process decode + transform: {per_core:.1f} images/s (1 core; "
          f"{rates['host_cpu']:.1f} per CPU-second)", flush=True)
    print(f"in-process decode only (device resizes): {decode_rate:.1f} images/s (1 core; "
          f"{rates['decode_cpu']:.1f} per CPU-second)", flush=True)
    device_rate = time_device_resize(source, args.batch_size, args.repeats)
    print(f"device resize + flip + pad: {device_rate:.1f} images/s", flush=True)
    loader_rates = {}
    for w in workers:
      loader_rates[str(w)] = time_loader(source, w, args.batch_size, args.repeats)
      print(f"loader num_workers={w}: {loader_rates[str(w)]:.1f} images/s "
            f"({loader_rates[str(w)] / max(w, 1):.1f} per worker core)", flush=True)
  print(json.dumps({
      "image_hw": [HEIGHT, WIDTH], "canvas": list(SIZES["pad_hw"]),
      "num_images": args.num_images, "batch_size": args.batch_size,
      "per_core_images_per_s": round(per_core, 2),
      "decode_only_per_core_images_per_s": round(decode_rate, 2),
      "per_cpu_second_images": round(rates["host_cpu"], 2),
      "decode_only_per_cpu_second_images": round(rates["decode_cpu"], 2),
      "device_resize_images_per_s": round(device_rate, 2),
      "workers": {k: round(v, 2) for k, v in loader_rates.items()},
      "cpu_count": os.cpu_count(),
      "target_images_per_s": args.target_images_per_s,
      "cores_to_feed_target": math.ceil(args.target_images_per_s / per_core),
      "decode_only_cores_to_feed_target": math.ceil(args.target_images_per_s / decode_rate),
      "load_avg_1min": round(os.getloadavg()[0], 2),
  }))


if __name__ == "__main__":
  main()
