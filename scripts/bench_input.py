"""Input-pipeline throughput on VOC-sized JPEGs: images/s per CPU core, host or device resize.

Writes `--num_images` random 500x375 JPEGs with VOC XML annotations into a temporary VOCdevkit
tree and reads them through `frcnn_jax.data.sources.voc_folder.VOCFolderSource`, for both
settings of `data.resize_on`:

  host    decode, resize to 600/1000 (Pillow), random flip, pad to the canvas;
  device  decode and place on the 384x512 source canvas (the pipeline's for these images);
          `frcnn_jax.ops.images.batch_images` resizes, flips and pads inside the jitted step.

It times each mode's per-record host work in this process alone, interleaved (A, B, A, B), per
wall second and per process-CPU second (one core, independent of the machine's other load);
the device's share on this machine's first JAX device; and the training loader (numpy
batches) for each worker count. The measurements are `frcnn_jax.benchmarking.input_pipeline`.

Usage:

  python scripts/bench_input.py [--num_images 48] [--canvas 608x800] [--workers 0,1,2]
                                [--repeats 3] [--target_images_per_s 250]
                                [--loaders pool,grain]

Prints one line per setting and, last, a JSON line with "per_core_images_per_s" and
"per_cpu_second_images" ({"host": ..., "device": ...}), "device_resize_images_per_s",
"loader_images_per_s" ({"host/0": ..., "device/2": ...}), "cores_to_feed_target" per mode
(ceil(target / per-CPU-second rate): the host cores that keep one accelerator consuming
`target_images_per_s` fed). (The export loader has no resize of its own any more: its programs
resize on the device, as `device_resize_images_per_s` measures.)

With `--loaders pool,grain` it measures only the training loaders against each other
(`frcnn_jax.benchmarking.grain_loader` runs the same plan and batches through grain; needs
the `grain` extra):
each loader for each worker count on both resize settings, interleaved
(`input_pipeline.compare_loaders`), printed as a table and then a JSON line with
"loader_batches_per_s" ({"pool/host/0": ..., "grain/device/2": ...}), "first_batch_s" and
"ratio_to_<first loader>".
"""

import argparse
import json
import math
import os
import pathlib
import tempfile

import jax

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import input_pipeline as bench
from frcnn_jax.data.sources import voc_folder


def _canvas(text: str) -> tuple[int, int]:
  """"HxW" -> (H, W) (`cases.parse_size`); argparse reports anything else as a usage error."""
  try:
    return cases.parse_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _compare(args: argparse.Namespace, loaders: tuple[str, ...], workers: list[int]) -> None:
  """--loaders: the training loaders' batches/s, a table then a JSON line."""
  with tempfile.TemporaryDirectory() as tmp:
    bench.write_tree(pathlib.Path(tmp), args.num_images)
    source = voc_folder.VOCFolderSource(tmp, ("2007",), "trainval")
    result = bench.compare_loaders(source, args.canvas, workers, args.batch_size, args.repeats,
                                   loaders)
  for line in bench.loader_table(result, loaders, workers):
    print(line, flush=True)
  rates = result["batches_per_s"]
  print(json.dumps({
      "loaders": list(loaders), "workers": workers, "modes": list(bench.MODES),
      "canvas": list(args.canvas), "num_images": args.num_images,
      "batch_size": args.batch_size, "repeats": args.repeats,
      "loader_batches_per_s": {k: round(v, 3) for k, v in rates.items()},
      "first_batch_s": {k: round(v, 3) for k, v in result["first_batch_s"].items()},
      f"ratio_to_{loaders[0]}": {
          f"{kind}/{m}/{w}": round(rates[f"{kind}/{m}/{w}"] / rates[f"{loaders[0]}/{m}/{w}"], 4)
          for kind in loaders[1:] for m in bench.MODES for w in workers},
      "versions": bench.loader_versions(loaders),
      "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
  }))


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
  parser.add_argument("--loaders", default=None,
                      help="comma-separated training loaders to compare (pool, grain); only "
                           "that comparison runs")
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
  if args.loaders is not None:
    loaders = tuple(k for k in args.loaders.split(",") if k)
    if not loaders or set(loaders) - set(bench.LOADERS) or len(set(loaders)) < len(loaders):
      parser.error(f"--loaders takes distinct names among {', '.join(bench.LOADERS)}; got "
                   f"{args.loaders!r}")
    for kind in loaders:
      if bench.loader_missing(kind):
        parser.error(bench.loader_missing(kind))
    _compare(args, loaders, workers)
    return
  with tempfile.TemporaryDirectory() as tmp:
    bench.write_tree(pathlib.Path(tmp), args.num_images)
    source = voc_folder.VOCFolderSource(tmp, ("2007",), "trainval")
    rates = bench.time_in_process(source, canvas, args.repeats)
    for mode in bench.MODES:
      print(f"in-process, data.resize_on={mode}: {rates[mode]:.1f} images/s (1 core; "
            f"{rates[mode + '_cpu']:.1f} per CPU-second)", flush=True)
    device_rate = bench.time_device_resize(source, canvas, args.batch_size, args.repeats)
    print(f"device resize + flip + pad on {jax.devices()[0].device_kind}: {device_rate:.1f} "
          f"images/s", flush=True)
    loader_rates = {}
    for mode in bench.MODES:
      for w in workers:
        rate = bench.time_loader(source, mode, canvas, w, args.batch_size, args.repeats)
        loader_rates[f"{mode}/{w}"] = rate
        print(f"loader data.resize_on={mode} num_workers={w}: {rate:.1f} images/s "
              f"({rate / max(w, 1):.1f} per worker core)", flush=True)
  print(json.dumps({
      "image_hw": [bench.HEIGHT, bench.WIDTH], "canvas": list(canvas),
      "source_canvas": list(bench.SOURCE_CANVAS),
      "num_images": args.num_images, "batch_size": args.batch_size,
      "per_core_images_per_s": {m: round(rates[m], 2) for m in bench.MODES},
      "per_cpu_second_images": {m: round(rates[m + "_cpu"], 2) for m in bench.MODES},
      "device_resize_images_per_s": round(device_rate, 2),
      "loader_images_per_s": {k: round(v, 2) for k, v in loader_rates.items()},
      "cpu_count": os.cpu_count(),
      "target_images_per_s": args.target_images_per_s,
      "cores_to_feed_target": {m: math.ceil(args.target_images_per_s / rates[m + "_cpu"])
                               for m in bench.MODES},
      "load_avg_1min": round(os.getloadavg()[0], 2),
  }))


if __name__ == "__main__":
  main()
