"""FLOPs of compiled XLA programs and the device's measured matrix-multiply peak.

Used by `scripts/benchmark.py` for model FLOPs utilisation (MFU = achieved FLOP/s divided by
the FLOP/s of a large matrix product timed on the same device in the same run).

What XLA's cost analysis counts: 2 FLOPs per multiply-add of dots and convolutions (taps that
fall on padding are not counted), one per elementwise op, and the body of a loop ONCE (it does
not multiply by the trip count; the detector's loops are NMS, a negligible share). For a
program partitioned over several devices the figure is that of one device's program.
"""

import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp


def compiled_flops(compiled: Any) -> float:
  """FLOPs of one execution of a compiled program, from XLA's cost analysis.

  Args:
    compiled: a `jax.stages.Compiled` (`jax.jit(f).lower(*args).compile()`).

  Returns:
    The "flops" entry of the cost analysis (summed over programs if there are several).

  Raises:
    ValueError: the backend reports no positive, finite FLOP count.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = sum(float(entry.get("flops", 0.0)) for entry in analysis or [])
  if not math.isfinite(flops) or flops <= 0:
    raise ValueError(f"XLA cost analysis gave no usable FLOP count (flops={flops!r})")
  return flops


def matmul_peak(n: int, dtype: Any, *, repeats: int = 5, chain: int = 1,
                device: jax.Device | None = None) -> dict[str, float]:
  """Measured FLOP/s of `chain` back-to-back [n, n] x [n, n] products in one program.

  The operands are random normal, the second scaled by 1/sqrt(n) so that repeated products
  keep their magnitude; the product accumulates in float32 and is stored in `dtype`. One
  warm-up run, then the median of `repeats` timed runs (`block_until_ready`).

  Args:
    n: matrix side.
    dtype: operand dtype (jnp.float32, jnp.bfloat16).
    repeats: timed runs.
    chain: products per run (> 1 hides the dispatch overhead of fast accelerators).
    device: where to run (default: the first device).

  Returns:
    {"flops_per_s": 2 n^3 chain / median wall seconds, "seconds": median wall seconds,
     "cpu_seconds": median process CPU seconds (all threads) per run, "flops_per_cpu_s":
     2 n^3 chain / cpu_seconds, "n", "chain"}. On a CPU shared with other processes the wall
    figure depends on the cores this process got; cpu_seconds / seconds says how many.
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
