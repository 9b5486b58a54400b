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

Prints one line per setting and, last, a JSON line with "per_core_images_per_s" and
"per_cpu_second_images" ({"host": ..., "device": ...}), "device_resize_images_per_s",
"loader_images_per_s" ({"host/0": ..., "device/2": ...}), "cores_to_feed_target" per mode
(ceil(target / per-CPU-second rate): the host cores that keep one accelerator consuming
`target_images_per_s` fed). (The export loader has no resize of its own any more: its programs
resize on the device, as `device_resize_images_per_s` measures.)
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
