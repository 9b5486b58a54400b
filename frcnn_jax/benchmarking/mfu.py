"""The device's measured matmul peak and model FLOPs utilisation (MFU).

MFU = a program's FLOPs (`frcnn_jax.benchmarking.flops`) per second of its run, over the
FLOP/s of a large matrix product timed on the same device in the same run (not a datasheet
figure). On a CPU shared with other processes the same ratio is also given per process-CPU
second ("CPU-time MFU"), which does not move with the cores this process happens to get.

Content MFU counts only the FLOPs of the image content, not of the canvas padding around it.
"""

import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from frcnn_jax.benchmarking import cases

VOC_ASPECTS = (4 / 3, 3 / 2)   # the common VOC image shapes (long side / short side)


def matmul_peak(n: int, dtype: Any, *, repeats: int = 5, chain: int = 1,
                device: jax.Device | None = None) -> dict[str, float]:
  """Measured FLOP/s of `chain` back-to-back [n, n] x [n, n] products in one program.

  The operands are random normal, the second scaled by 1/sqrt(n) so that repeated products
  keep their magnitude; the product accumulates in float32 and is stored in `dtype`. One
  warm-up run, then the median of `repeats` timed runs (`block_until_ready`).

  Args:
    n: matrix side.
    dtype: operand dtype (jnp.float32, jnp.bfloat16, or its name).
    repeats: timed runs.
    chain: products per run (> 1 hides the dispatch overhead of fast accelerators).
    device: where to run (default: the first device).

  Returns:
    {"flops_per_s": 2 n^3 chain / median wall seconds, "seconds": median wall seconds,
     "cpu_seconds": median process CPU seconds (all threads) per run, "flops_per_cpu_s":
     2 n^3 chain / cpu_seconds (NaN when the CPU time rounds to 0), "n", "chain"}. On a CPU
    shared with other processes the wall figure depends on the cores this process got;
    cpu_seconds / seconds says how many.

  Raises:
    ValueError: n, repeats or chain below 1.
  """
  if n < 1 or repeats < 1 or chain < 1:
    raise ValueError(f"n, repeats and chain must be >= 1, got {n}, {repeats}, {chain}")
  device = device or jax.devices()[0]
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype), device)
  b = jax.device_put((jax.random.normal(key_b, (n, n), jnp.float32) / math.sqrt(n)
                      ).astype(dtype), device)

  def products(a, b):
    step = lambda _, x: jnp.dot(x, b, preferred_element_type=jnp.float32).astype(dtype)
    return jax.lax.fori_loop(0, chain, step, a)

  run = jax.jit(products).lower(a, b).compile()
  jax.block_until_ready(run(a, b))
  times, cpu_times = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(run(a, b))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  seconds, cpu_seconds = statistics.median(times), statistics.median(cpu_times)
  flop = 2.0 * n**3 * chain
  return {"flops_per_s": flop / seconds, "seconds": seconds, "cpu_seconds": cpu_seconds,
          "flops_per_cpu_s": flop / cpu_seconds if cpu_seconds > 0 else math.nan, "n": n,
          "chain": chain}


def matmul_peaks(dtypes: list[str], size: int = 0) -> dict[str, dict[str, float]]:
  """`matmul_peak` of each dtype name on the first device.

  Args:
    dtypes: dtype names ("float32", "bfloat16").
    size: matrix side; 0 picks 2048 on CPU and 8192 (10 chained products) on accelerators.

  Returns:
    {dtype: `matmul_peak`'s figures}.
  """
  accelerator = jax.devices()[0].platform != "cpu"
  n = size or (8192 if accelerator else 2048)
  return {dtype: matmul_peak(n, dtype, chain=10 if accelerator else 1) for dtype in dtypes}


def best_peaks(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
               ) -> dict[str, dict[str, float]]:
  """Per dtype, the faster of two `matmul_peaks` measurements (one before the rows, one after).

  Returns:
    {dtype: the faster measurement's figures, plus "before_flops_per_s", "after_flops_per_s",
     and "flops_per_cpu_s" as the larger of the two}.
  """
  peaks = {}
  for dtype in before:
    best = max(before[dtype], after[dtype], key=lambda p: p["flops_per_s"])
    peaks[dtype] = {**best, "before_flops_per_s": before[dtype]["flops_per_s"],
                    "after_flops_per_s": after[dtype]["flops_per_s"],
                    "flops_per_cpu_s": max(before[dtype]["flops_per_cpu_s"],
                                           after[dtype]["flops_per_cpu_s"])}
  return peaks


def add_mfu(row: dict[str, Any], peak: dict[str, float]) -> None:
  """Adds "peak_flops_per_s" and "{train,infer}_mfu" to a measured row.

  MFU = the part's FLOPs per step ("{part}_flops_per_image" x "batch", one device's program)
  / its median step seconds ("{part}_step_time_s") / the peak's "flops_per_s"; None where
  either is missing. On CPU (row["device"] starts with "cpu") also
  "{train,infer}_mfu_cpu_time" (FLOPs per process-CPU-second over the peak's
  "flops_per_cpu_s") and "{train,infer}_cores_used" (CPU seconds / wall seconds).
  """
  row["peak_flops_per_s"] = peak["flops_per_s"]
  cpu_device = row["device"].startswith("cpu")
  for part in cases.PARTS:
    per_image, step = row[f"{part}_flops_per_image"], row[f"{part}_step_time_s"]
    flop = None if per_image is None else per_image * row["batch"]
    row[f"{part}_mfu"] = None if flop is None or step is None else flop / step / peak[
        "flops_per_s"]
    if cpu_device:
      cpu = row[f"{part}_cpu_step_time_s"]
      usable = flop is not None and cpu and math.isfinite(peak["flops_per_cpu_s"])
      row[f"{part}_mfu_cpu_time"] = flop / cpu / peak["flops_per_cpu_s"] if usable else None
      row[f"{part}_cores_used"] = cpu / step if cpu and step else None


def content_hw(height: int, width: int, min_size: int) -> tuple[int, int]:
  """The largest common VOC image (4:3 or 3:2 at shorter side `min_size`) inside a canvas.

  The orientation follows the canvas; a canvas too small for either aspect gets its own size
  (clipped to `min_size` on the shorter side).

  Returns:
    (content height, content width), each at most the canvas's.
  """
  short_side, long_side = min(height, width), max(height, width)
  s = min(short_side, min_size)
  fitting = [round(s * a) for a in VOC_ASPECTS if round(s * a) <= long_side]
  l = max(fitting) if fitting else long_side
  return (s, l) if height <= width else (l, s)


def add_content_mfu(row: dict[str, Any], min_size: int) -> None:
  """Adds "content_hw" (`content_hw` of the row's canvas), "content_fraction" (content /
  canvas pixels) and "{train,infer}_mfu_content" (MFU x that fraction; None without MFU).

  A slight underestimate: the RoI head's FLOPs do not shrink with the canvas.
  """
  ch, cw = content_hw(row["height"], row["width"], min_size)
  row["content_hw"] = [ch, cw]
  row["content_fraction"] = ch * cw / (row["height"] * row["width"])
  for part in cases.PARTS:
    mfu = row.get(f"{part}_mfu")
    row[f"{part}_mfu_content"] = None if mfu is None else mfu * row["content_fraction"]
