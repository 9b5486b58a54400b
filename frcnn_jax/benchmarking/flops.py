"""FLOPs of compiled XLA programs, from XLA's cost analysis.

The numerator of model FLOPs utilisation (`frcnn_jax.benchmarking.mfu`): MFU = a program's
FLOPs per second of its run over the FLOP/s of a large matrix product timed on the same
device in the same run.

What XLA's cost analysis counts: 2 FLOPs per multiply-add of dots and convolutions (taps that
fall on padding are not counted), one per elementwise op, and the body of a loop ONCE (it does
not multiply by the trip count; the detector's loops are NMS, a negligible share). For a
program partitioned over several devices the figure is that of one device's program.
"""

import math
from typing import Any


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


def program_flops(compiled: Any) -> float | None:
  """`compiled_flops`, or None where the backend gives no usable count."""
  try:
    return compiled_flops(compiled)
  except ValueError:
    return None
