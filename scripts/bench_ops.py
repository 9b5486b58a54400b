"""Median milliseconds of the detection ops on this machine, next to torchvision's C++ kernels.

  python scripts/bench_ops.py [--repeats 15]

Measures, each jitted, after warm-up, with block_until_ready: `nms` on 2000, 6000 and 12000
RPN-like boxes (IoU 0.7, max_output_size = N so that every kept box is found, as torchvision's
nms does), `roi_align` (sampling_ratio 2, aligned False) and `roi_pool` of 128 and 300 RoIs on a
38x63x512 map (a 600x1000 image at stride 16), 7x7 output, spatial scale 1/16, plus their
gradients with respect to the features. The reference figures are torchvision's C++ CPU kernels
on this kind of 2-thread machine. The machine, the device JAX runs on and the load average
(other processes share the cores: compare medians taken under similar load) are printed first;
the last line is one JSON object with every figure.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops import nms as nms_ops
from frcnn_jax.ops import roi

IMAGE_HW = (600, 1000)
FEATURE_SHAPE = (38, 63, 512)
TORCHVISION_MS = {"nms_2000": 23.0, "nms_6000": 179.0, "nms_12000": 608.0,
                  "roi_align_128": 35.0, "roi_align_300": 80.0, "roi_pool_128": 37.0}


def rpn_like_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, 4] xyxy boxes inside the image (sides 16..512 px, aspect 1:2..2:1) and [n] scores."""
  h, w = IMAGE_HW
  size = np.exp(rng.uniform(np.log(16.0), np.log(512.0), n))
  ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
  bw, bh = size / np.sqrt(ratio), size * np.sqrt(ratio)
  cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
  boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
  boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
  return boxes, rng.uniform(size=n).astype(np.float32)


def median_ms(fn, *args, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "device": str(jax.devices()[0]), "load_avg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=15, help="timed runs per op (median)")
  args = parser.parse_args()
  info = machine()
  print(f"machine: {info}")
  rng = np.random.default_rng(0)
  figures = {}

  for n in (2000, 6000, 12000):
    boxes, scores = map(jnp.asarray, rpn_like_boxes(rng, n))
    fn = jax.jit(functools.partial(nms_ops.nms, iou_threshold=0.7, max_output_size=n))
    figures[f"nms_{n}"] = median_ms(fn, boxes, scores, repeats=args.repeats)

  features = jax.random.normal(jax.random.key(0), FEATURE_SHAPE, jnp.float32)
  ops = {"roi_align": functools.partial(roi.roi_align, output_size=7, spatial_scale=1 / 16,
                                        sampling_ratio=2, aligned=False),
         "roi_pool": functools.partial(roi.roi_pool, output_size=7, spatial_scale=1 / 16)}
  for r in (128, 300):
    rois = jnp.asarray(rpn_like_boxes(rng, r)[0])
    for name, op in ops.items():
      figures[f"{name}_{r}"] = median_ms(jax.jit(op), features, rois, repeats=args.repeats)
  rois = jnp.asarray(rpn_like_boxes(rng, 128)[0])
  for name, op in ops.items():
    grad = jax.jit(jax.grad(lambda f, b, op=op: jnp.sum(op(f, b))))
    figures[f"{name}_128_grad"] = median_ms(grad, features, rois, repeats=max(3, args.repeats // 3))

  print(f"{'op':<20}{'ms (median)':>12}{'torchvision':>13}{'ratio':>8}")
  for name, ms in figures.items():
    ref = TORCHVISION_MS.get(name)
    ref_txt, ratio_txt = (f"{ref:.0f}", f"{ms / ref:.2f}") if ref else ("-", "-")
    print(f"{name:<20}{ms:>12.1f}{ref_txt:>13}{ratio_txt:>8}")
  ratios = {k: round(v / TORCHVISION_MS[k], 3) for k, v in figures.items() if k in TORCHVISION_MS}
  print(json.dumps({"machine": info, "ms": {k: round(v, 2) for k, v in figures.items()},
                    "torchvision_ms": TORCHVISION_MS, "ratio_to_torchvision": ratios}))


if __name__ == "__main__":
  main()
