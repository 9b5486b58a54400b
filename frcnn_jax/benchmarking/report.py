"""Number formatting shared by the benchmarks' tables, and results made JSON-safe."""

import math
from typing import Any


def fmt(value: float | None, spec: str) -> str:
  """`format(value, spec)`, or "-" right-aligned to the spec's width for a missing value."""
  if value is None:
    return "-".rjust(int(spec.split(".")[0] or 0))
  return format(value, spec)


def pct(value: float | None) -> str:
  """A fraction as a percentage with one decimal ("12.3%"), "-" when missing or not finite."""
  return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def json_safe(value: Any) -> Any:
  """A copy with non-finite floats as None and tuple keys as "x"-joined strings, recursively
  (tuples become lists), so that `json.dumps` writes standard JSON."""
  if isinstance(value, dict):
    return {("x".join(map(str, k)) if isinstance(k, tuple) else k): json_safe(v)
            for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value
