"""What the train and eval loaders share: canvas checks and assignment, transform arguments,
process shards, batch stacking and the input counters (frcnn_jax/data/pipeline.py)."""

import dataclasses
from typing import Any
from typing import Sequence

import jax
import numpy as np
from absl import flags

from frcnn_jax.data import canvases as canvas_lib
from frcnn_jax.data import transforms

SKIPPED = "skipped_records"
COUNT_NAMES = (SKIPPED,) + transforms.COUNT_KEYS


def use_absl_defaults() -> None:
  """Lets worker processes read absl flags outside an absl app (tests, scripts).

  Under `absl.app.run` the flags are parsed already and nothing changes; otherwise they keep
  their defaults.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def check_canvases(canvases: Sequence[Sequence[int]], key: str = "data.canvases"
                   ) -> tuple[tuple[int, int], ...]:
  """Canvases as a tuple of (h, w) int pairs.

  Raises:
    ValueError: none, or not positive (h, w) pairs (naming `key`).
  """
  try:
    out = tuple((int(h), int(w)) for h, w in canvases)
  except (TypeError, ValueError):
    raise ValueError(f"{key} must be (height, width) pairs, got {canvases!r}") from None
  if not out or min(min(c) for c in out) <= 0:
    raise ValueError(f"{key} must be one or more positive (height, width) pairs, got "
                     f"{canvases!r}")
  return out


def transform_settings(min_size: int, max_size: int, max_gt: int) -> dict[str, Any]:
  """Validated transform arguments (without the canvas)."""
  if min_size <= 0 or max_size <= 0:
    raise ValueError(f"data.min_size and data.max_size must be positive, got {min_size}, "
                     f"{max_size}")
  if max_gt <= 0:
    raise ValueError(f"data.max_gt must be positive, got {max_gt}")
  return {"min_size": int(min_size), "max_size": int(max_size), "max_gt": int(max_gt)}


def resolve_canvases(canvases, pad_hw) -> tuple[tuple[int, int], ...]:
  """The loaders' canvases from exactly one of `canvases` and `pad_hw` (ValueError else)."""
  if (canvases is None) == (pad_hw is None):
    raise ValueError("give exactly one of canvases and pad_hw")
  if pad_hw is not None:
    return check_canvases([pad_hw], "data.pad_hw")
  return check_canvases(canvases)


def record_canvases(source, canvases: Sequence[Sequence[int]], *, min_size: int,
                    max_size: int, resize_on_device: bool = False
                    ) -> tuple[np.ndarray, tuple[tuple[int, int], ...] | None]:
  """The canvas of every record (see the module docstring), and the source canvases.

  Args:
    source: random-access dataset source.
    canvases: the K canvases (h, w).
    min_size: target of the shorter side.
    max_size: cap on the longer side.
    resize_on_device: also choose the K source canvases (`canvases.source_canvases`) the
      decoded images of each group are shipped on.

  Returns:
    (int32 [N] canvas index per record, -1 for a record whose image header is unreadable;
     the K source canvases (Hs, Ws), or None without `resize_on_device`).
  """
  n = len(source)
  if len(canvases) == 1 and not resize_on_device:
    return np.zeros(n, np.int32), None
  sizes = canvas_lib.original_sizes(source)
  known = sizes.min(axis=1) > 0
  out = np.full(n, -1, np.int32)
  if len(canvases) == 1:
    out[known] = 0
  elif known.any():
    resized = canvas_lib.resized_sizes(sizes[known], min_size=min_size, max_size=max_size)
    out[known] = canvas_lib.place_canvases(resized, canvases)
  if not resize_on_device:
    return out, None
  return out, canvas_lib.source_canvases(sizes, out, len(canvases))


def describe_sources(sources: tuple[tuple[int, int], ...] | None) -> str:
  """The end of a plan's log line: where images are resized."""
  if sources is None:
    return "; resized on the host"
  return "; resized on the device from source canvases " + ", ".join(
      f"{h}x{w}" for h, w in sources)


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Examples (dicts of arrays) -> a batch dict of arrays with a leading example axis."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@dataclasses.dataclass(frozen=True)
class Shard:
  """A reader's place among the processes that read a split: stands in for the JAX process
  (tests, benchmarks).

  Attributes:
    shard_index: this reader's index p.
    shard_count: the number of readers P.
  """
  shard_index: int
  shard_count: int


def shards(shard_options: Shard | None) -> tuple[int, int]:
  """(index, count) of this process: `shard_options` (tests) or the JAX process."""
  if shard_options is None:
    return jax.process_index(), jax.process_count()
  return int(shard_options.shard_index), int(shard_options.shard_count)
