"""Input-pipeline throughput on VOC-sized JPEGs, for both settings of `data.resize_on`.

  host    decode, resize to 600/1000 (Pillow), random flip, pad to the canvas;
  device  decode and place on the source canvas (SOURCE_CANVAS, the pipeline's for these
          images); `frcnn_jax.ops.images.batch_images` resizes, flips and pads inside the
          jitted step.

The images are synthetic (`write_tree`: HEIGHT x WIDTH photo-like JPEGs with VOC XML
annotations in a VOCdevkit tree) and read through
`frcnn_jax.data.sources.voc_folder.VOCFolderSource`.
"""

import collections
import importlib.metadata
import pathlib
import statistics
import time

import jax
import numpy as np
from PIL import Image

from frcnn_jax.benchmarking import timing
from frcnn_jax.data import canvases
from frcnn_jax.data import pipeline
from frcnn_jax.data import transforms
from frcnn_jax.data.sources import voc_folder
from frcnn_jax.ops import images as image_ops

WIDTH, HEIGHT = 500, 375
SIZES = dict(min_size=600, max_size=1000, max_gt=64)
MODES = ("host", "device")   # data.resize_on
# What the pipeline ships these images on when the device resizes (one group of one size).
SOURCE_CANVAS = tuple(int(n) for n in canvases.source_canvases(
    np.array([[HEIGHT, WIDTH]]), np.zeros(1, np.int32), 1)[0])


def photo_like(rng: np.random.Generator) -> np.ndarray:
  """A uint8 [HEIGHT, WIDTH, 3] smooth colour field with rectangles and mild noise (its JPEG
  is close to a photo's in size and decoding cost)."""
  small = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)
  for _ in range(4):
    x, y = int(rng.integers(0, WIDTH - 60)), int(rng.integers(0, HEIGHT - 60))
    image[y:y + int(rng.integers(30, 200)), x:x + int(rng.integers(30, 200))] = rng.uniform(
        0, 255, 3)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_tree(root: pathlib.Path, num_images: int, seed: int = 0) -> None:
  """Writes <root>/VOCdevkit/VOC2007 with `num_images` JPEGs, 1-5 random VOC objects each,
  and a trainval list."""
  year = root / "VOCdevkit" / "VOC2007"
  for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
    (year / sub).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  names = []
  for i in range(num_images):
    name = f"{i:06d}"
    names.append(name)
    Image.fromarray(photo_like(rng)).save(year / "JPEGImages" / f"{name}.jpg", quality=90)
    objects = []
    for _ in range(int(rng.integers(1, 6))):
      x1, y1 = int(rng.integers(1, WIDTH - 40)), int(rng.integers(1, HEIGHT - 40))
      x2, y2 = int(rng.integers(x1 + 20, WIDTH + 1)), int(rng.integers(y1 + 20, HEIGHT + 1))
      cls = voc_folder.VOC_CLASSES[int(rng.integers(len(voc_folder.VOC_CLASSES)))]
      objects.append(f"<object><name>{cls}</name><difficult>0</difficult><bndbox>"
                     f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                     "</bndbox></object>")
    (year / "Annotations" / f"{name}.xml").write_text(
        f"<annotation><filename>{name}.jpg</filename><size><width>{WIDTH}</width>"
        f"<height>{HEIGHT}</height><depth>3</depth></size>{''.join(objects)}</annotation>")
  (year / "ImageSets" / "Main" / "trainval.txt").write_text("".join(n + "\n" for n in names))


def prepare(example, mode: str, flip: bool, canvas: tuple[int, int]):
  """One record through the host's share of `mode`: decode + resize + flip + pad (host), or
  decode + place on the source canvas + box arithmetic (device; the device resizes)."""
  source_canvas = SOURCE_CANVAS if mode == "device" else None
  return transforms.prepare(example, training=True, flip=flip, pad_hw=canvas,
                            source_canvas=source_canvas, **SIZES)


def time_in_process(source, canvas: tuple[int, int], repeats: int) -> dict[str, float]:
  """Each mode's per-record host work over the whole source, modes interleaved per round.

  Returns:
    {mode: median images per wall second, mode + "_cpu": median images per process-CPU
     second (one core; it does not depend on what else runs on the machine)}.
  """
  rates: dict[str, list[float]] = collections.defaultdict(list)
  for r in range(repeats):
    for mode in MODES:
      start, cpu_start = time.perf_counter(), time.process_time()
      for i in range(len(source)):
        prepare(source[i], mode, bool((i + r) % 2), canvas)
      rates[mode].append(len(source) / (time.perf_counter() - start))
      rates[mode + "_cpu"].append(len(source) / (time.process_time() - cpu_start))
  return {k: statistics.median(v) for k, v in rates.items()}


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
  walls, _ = timing.timed_runs(lambda: run(batch), repeats)
  return statistics.median(batch_size / wall for wall in walls)


def time_loader(source, mode: str, canvas: tuple[int, int], workers: int, batch_size: int,
                repeats: int) -> float:
  """Median images/s of the training loader (numpy batches) after its first batch, each
  repeat a pass over the source."""
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


LOADERS = ("pool", "grain")   # pipeline.train_loader; benchmarking.grain_loader


def loader_missing(kind: str) -> str | None:
  """Why the loader `kind` cannot run here (grain not installed), or None."""
  if kind == "grain":
    try:
      from frcnn_jax.benchmarking import grain_loader  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
    except ImportError as e:
      return str(e)
  return None


def loader_versions(loaders: tuple[str, ...]) -> dict[str, str]:
  """The installed version of each loader's package ("pool": this project's)."""
  names = {"pool": "frcnn_jax", "grain": "grain"}
  out = {}
  for kind in loaders:
    try:
      out[kind] = importlib.metadata.version(names[kind])
    except importlib.metadata.PackageNotFoundError:
      out[kind] = "unknown"
  return out


def _any_loader(kind: str, source, mode: str, canvas: tuple[int, int], workers: int,
                batch_size: int):
  """The training loader `kind` (LOADERS) on the same plan; grain is imported only here."""
  if kind == "pool":
    return _loader(source, mode, canvas, workers, batch_size)
  from frcnn_jax.benchmarking import grain_loader  # pylint: disable=import-outside-toplevel
  return grain_loader.grain_train_loader(source, batch_size=batch_size, seed=0, flip=True,
                                         num_workers=workers, canvases=(canvas,),
                                         resize_on_device=mode == "device", **SIZES)


def compare_loaders(source, canvas: tuple[int, int], workers: list[int], batch_size: int,
                    repeats: int, loaders: tuple[str, ...] = LOADERS) -> dict[str, dict]:
  """Batches/s of each training loader, per resize mode and worker count, interleaved.

  Every (mode, workers, loader) item is timed once per round (`timing.interleaved_runs`:
  one untimed round first, then `repeats` rounds, the loaders of one (mode, workers) side by
  side). Each call builds a fresh loader, takes its first batch (starting its workers: the
  "first_batch_s"), then 1 + 6 x workers more untimed batches so that what the workers made
  ahead while the loader started is used up (the loaders buffer differently), then times
  len(source) // batch_size batches: the steady rate. The loader is closed after each call.

  Returns:
    {"batches_per_s": {"loader/mode/workers": median}, "first_batch_s": {...: median}}.
  """
  steps = max(len(source) // batch_size, 1)
  window: dict[str, list[float]] = collections.defaultdict(list)
  first: dict[str, list[float]] = collections.defaultdict(list)

  def run(key: str, kind: str, mode: str, w: int) -> None:
    start = time.perf_counter()
    loader = _any_loader(kind, source, mode, canvas, w, batch_size)
    try:
      next(loader)
      first[key].append(time.perf_counter() - start)
      for _ in range(1 + 6 * w):
        next(loader)
      start = time.perf_counter()
      for _ in range(steps):
        next(loader)
      window[key].append(steps / (time.perf_counter() - start))
    finally:
      loader.close()

  items = [(f"{kind}/{mode}/{w}",
            lambda key=f"{kind}/{mode}/{w}", kind=kind, mode=mode, w=w: run(key, kind, mode, w))
           for mode in MODES for w in workers for kind in loaders]
  timing.interleaved_runs(items, repeats)
  # The first entry of each item is its untimed warm-up round.
  return {"batches_per_s": {k: statistics.median(v[1:]) for k, v in window.items()},
          "first_batch_s": {k: statistics.median(v[1:]) for k, v in first.items()}}


def loader_table(result: dict[str, dict], loaders: tuple[str, ...], workers: list[int]
                 ) -> list[str]:
  """`compare_loaders`' result as table lines: per mode and worker count, each loader's
  batches/s (first-batch seconds), and each other loader's rate over the first's."""
  head = f"{'resize_on':<10}{'workers':>8}" + "".join(
      f"{kind + ' batches/s':>20}{'first batch s':>15}" for kind in loaders) + "".join(
      f"{kind + '/' + loaders[0]:>14}" for kind in loaders[1:])
  lines = [head]
  for mode in MODES:
    for w in workers:
      rates = [result["batches_per_s"][f"{kind}/{mode}/{w}"] for kind in loaders]
      lines.append(f"{mode:<10}{w:>8}" + "".join(
          f"{rate:>20.2f}{result['first_batch_s'][f'{kind}/{mode}/{w}']:>15.2f}"
          for kind, rate in zip(loaders, rates)) + "".join(
          f"{rate / rates[0]:>14.3f}" for rate in rates[1:]))
  return lines
