"""A few static canvases chosen to fit a dataset's image sizes (aspect-ratio buckets).

Pure NumPy, no JAX. Every image is resized by py-faster-rcnn's rule (`resized_hw`: shorter
side `min_size`, longer at most `max_size`) and placed at the top-left of the smallest-area
canvas that holds that size (`assign_canvases`; a canvas never shrinks an image). One program
is compiled per canvas, so there are few (K, `data.num_canvases`); `choose_canvases` picks the
K that minimise the padded pixels over a dataset:

  cost(S) = sum over images of area(smallest canvas in S holding the image),

which is total canvas pixels, i.e. padded pixels plus the (fixed) image pixels. Each canvas of
an optimal set can shrink to the largest height and the largest width among its images without
losing any, so the candidates are the pairs (h, w) of a height and a width of the sizes (rounded
up to `multiple`). The search is exhaustive over all K-subsets of these candidates when that is
cheap (small problems, and the test cases), otherwise a greedy start followed by single-swap
local search to a local optimum (Teitz-Bart), which finds the exhaustive optimum on the
VOC-like and random cases tested.
"""

import itertools
import logging
import math
from typing import Any
from typing import Sequence

import numpy as np

from frcnn_jax.data import images
from frcnn_jax.data import transforms

# Exhaustive search while (number of K-subsets) x (distinct sizes) x K stays below this.
_EXHAUSTIVE_WORK = 20_000_000
_CHUNK_WORK = 2_000_000  # elements per vectorised block of the exhaustive search


def resized_hw(hw: Sequence[int], min_size: int, max_size: int) -> tuple[int, int]:
  """The size of an image after py-faster-rcnn's resize (what `transforms.prepare` gives it).

  Args:
    hw: (height, width) of the original image.
    min_size: target of the shorter side.
    max_size: cap on the longer side.

  Returns:
    (round(H * scale), round(W * scale)) with scale = min(min_size / shorter,
    max_size / longer), each at least 1.

  Raises:
    ValueError: a non-positive size.
  """
  return transforms.scaled_hw(hw, transforms.resize_scale(hw, min_size, max_size))


def _check_sizes(sizes: Any, what: str = "sizes") -> np.ndarray:
  """`sizes` as int64 [N, 2], all positive."""
  sizes = np.asarray(sizes)
  if sizes.ndim != 2 or sizes.shape[1] != 2:
    raise ValueError(f"{what} must be [N, 2] (height, width), got shape {sizes.shape}")
  if sizes.size and not np.issubdtype(sizes.dtype, np.integer):
    if not np.array_equal(sizes, np.round(sizes)):
      raise ValueError(f"{what} must be integers")
  sizes = sizes.astype(np.int64)
  if sizes.size and sizes.min() <= 0:
    bad = sizes[np.argmin(sizes.min(axis=1))]
    raise ValueError(f"{what} must be positive, got {bad[0]}x{bad[1]}")
  return sizes


def _set_cost(cost: np.ndarray, counts: np.ndarray, subsets: np.ndarray) -> np.ndarray:
  """Total canvas pixels of each candidate subset.

  Args:
    cost: float64 [U, M] area of candidate m for distinct size u (inf: does not hold it).
    counts: float64 [U] images of each distinct size.
    subsets: int [S, K] candidate indices.

  Returns:
    float64 [S] sum_u counts[u] * min_k cost[u, subsets[s, k]] (inf: some size unheld).
  """
  per_size = cost[:, subsets].min(axis=2)  # [U, S]
  return counts @ np.where(np.isinf(per_size), np.inf, per_size)


def _exhaustive(cost: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
  """The K-subset of candidates with the least cost (ties: the lexicographically first)."""
  m = cost.shape[1]
  chunk = max(_CHUNK_WORK // max(cost.shape[0] * k, 1), 1)
  best, best_cost = None, np.inf
  combos = itertools.combinations(range(m), k)
  while True:
    block = np.array(list(itertools.islice(combos, chunk)), np.int64).reshape(-1, k)
    if not len(block):
      break
    costs = _set_cost(cost, counts, block)
    i = int(np.argmin(costs))
    if costs[i] < best_cost:
      best, best_cost = block[i], costs[i]
  return best


def _greedy(cost: np.ndarray, counts: np.ndarray, k: int) -> list[int]:
  """Adds the candidate that lowers the cost most, K times (or until none lowers it)."""
  chosen: list[int] = []
  current = np.full(cost.shape[0], np.inf)
  for _ in range(k):
    totals = counts @ np.minimum(current[:, None], cost)
    m = int(np.argmin(totals))
    if chosen and totals[m] >= counts @ current:
      break
    chosen.append(m)
    current = np.minimum(current, cost[:, m])
  return chosen


def _swap_search(cost: np.ndarray, counts: np.ndarray, chosen: list[int]) -> tuple[float, list]:
  """Applies the best single swap (one chosen candidate for another) while it lowers the cost.

  Returns:
    (cost, candidates) at the local optimum.
  """
  chosen = list(chosen)
  total = counts @ cost[:, chosen].min(axis=1)
  while True:
    best = (total, None, None)
    for j in range(len(chosen)):
      others = chosen[:j] + chosen[j + 1:]
      base = cost[:, others].min(axis=1) if others else np.full(cost.shape[0], np.inf)
      totals = counts @ np.minimum(base[:, None], cost)
      m = int(np.argmin(totals))
      if totals[m] < best[0]:
        best = (totals[m], j, m)
    if best[1] is None:
      return float(total), chosen
    total, chosen[best[1]] = best[0], best[2]


def _local_search(cost: np.ndarray, counts: np.ndarray, k: int, restarts: int = 96
                  ) -> np.ndarray:
  """Swap local search from several starts; the best local optimum.

  Starts: the greedy set; the greedy set for a cost where an unheld size costs twice the
  largest canvas (it may pass through sets that leave sizes unheld, then the largest
  candidate replaces its least useful member); `restarts` random K-subsets (fixed seed)
  repaired the same way.
  """
  largest = int(np.argmax(np.where(np.isinf(cost), -1.0, cost).max(axis=0)))
  penalised = np.where(np.isinf(cost), 2.0 * cost[np.isfinite(cost)].max(), cost)
  rng = np.random.default_rng(0)
  starts = [_greedy(cost, counts, k), _greedy(penalised, counts, k)]
  starts += [list(rng.choice(cost.shape[1], size=k, replace=False)) for _ in range(restarts)]
  best = (np.inf, None)
  for start in starts:
    start = [int(m) for m in start]
    if not np.isfinite(counts @ cost[:, start].min(axis=1)) and largest not in start:
      start[-1] = largest
    result = _swap_search(cost, counts, start)
    if result[0] < best[0]:
      best = result
  return np.array(best[1], np.int64)


def choose_canvases(sizes: Any, num_canvases: int, multiple: int = 32,
                    exhaustive: bool | None = None) -> tuple[tuple[int, int], ...]:
  """At most K canvases, multiples of `multiple`, that hold every size with least padding.

  Args:
    sizes: int [N, 2] resized (height, width) of the images (`resized_hw`).
    num_canvases: K >= 1.
    multiple: every canvas side is a multiple of this (the trunk's total stride).
    exhaustive: True: search every K-subset of candidates (exact); False: greedy plus swap
      local search; None: exhaustive when cheap enough.

  Returns:
    Canvases (h, w), ascending by area (then h, w); fewer than K when more would not lower
    the padding. Each image's canvas is the smallest-area one that holds it
    (`assign_canvases`).

  Raises:
    ValueError: no sizes, a non-positive size, K < 1 or multiple < 1.
  """
  if num_canvases < 1:
    raise ValueError(f"data.num_canvases must be >= 1, got {num_canvases}")
  if multiple < 1:
    raise ValueError(f"the canvas multiple must be >= 1, got {multiple}")
  sizes = _check_sizes(sizes)
  if not len(sizes):
    raise ValueError("no image sizes to choose canvases for")
  rounded = -(-sizes // multiple) * multiple
  distinct, counts = np.unique(rounded, axis=0, return_counts=True)
  heights, widths = np.unique(distinct[:, 0]), np.unique(distinct[:, 1])
  cand = np.stack(np.meshgrid(heights, widths, indexing="ij"), -1).reshape(-1, 2)
  holds = ((distinct[:, None, 0] <= cand[None, :, 0]) &
           (distinct[:, None, 1] <= cand[None, :, 1]))  # [U, M]
  # A canvas that no size touches at its height and at its width can shrink: not a candidate.
  tight = ((holds & (distinct[:, None, 0] == cand[None, :, 0])).any(0) &
           (holds & (distinct[:, None, 1] == cand[None, :, 1])).any(0))
  cand, holds = cand[tight], holds[:, tight]
  cost = np.where(holds, (cand[:, 0] * cand[:, 1]).astype(np.float64)[None], np.inf)
  counts = counts.astype(np.float64)
  k = min(int(num_canvases), len(cand))
  if exhaustive is None:
    exhaustive = math.comb(len(cand), k) * len(distinct) * k <= _EXHAUSTIVE_WORK
  chosen = (_exhaustive if exhaustive else _local_search)(cost, counts, k)
  canvases = [tuple(int(v) for v in cand[i]) for i in chosen]
  used = np.unique(assign_canvases(rounded, canvases))
  canvases = [canvases[i] for i in used]
  return tuple(sorted(canvases, key=lambda c: (c[0] * c[1], c[0], c[1])))


def assign_canvases(sizes: Any, canvases: Sequence[Sequence[int]]) -> np.ndarray:
  """The smallest-area canvas that holds each size.

  Args:
    sizes: int [N, 2] resized (height, width).
    canvases: K canvases (h, w).

  Returns:
    int32 [N] canvas index per size (ties in area: the lower index).

  Raises:
    ValueError: a size that no canvas holds (named), or a bad shape.
  """
  sizes = _check_sizes(sizes)
  canv = _check_sizes(np.asarray(canvases).reshape(-1, 2), "canvases")
  if not len(canv):
    raise ValueError("no canvases")
  holds = (sizes[:, None, 0] <= canv[None, :, 0]) & (sizes[:, None, 1] <= canv[None, :, 1])
  unheld = ~holds.any(axis=1)
  if unheld.any():
    h, w = sizes[np.argmax(unheld)]
    raise ValueError(f"no canvas holds an image of resized size {h}x{w} (height x width); "
                     f"canvases: {[tuple(int(v) for v in c) for c in canv]}")
  area = np.where(holds, (canv[:, 0] * canv[:, 1])[None], np.iinfo(np.int64).max)
  return np.argmin(area, axis=1).astype(np.int32)


def place_canvases(sizes: Any, canvases: Sequence[Sequence[int]]) -> np.ndarray:
  """`assign_canvases`, except that a size no canvas holds goes where it shrinks least.

  A size (h, w) that no canvas holds is scaled down to fit; it goes to the canvas with the
  largest factor min(canvas h / h, canvas w / w) (ties: the lower index). Used with explicit
  canvases (`data.canvases`, `data.pad_hw`) and for images at inference.

  Args:
    sizes: int [N, 2] resized (height, width).
    canvases: K canvases (h, w).

  Returns:
    int32 [N] canvas index per size.
  """
  sizes = _check_sizes(sizes)
  canv = _check_sizes(np.asarray(canvases).reshape(-1, 2), "canvases")
  if not len(canv):
    raise ValueError("no canvases")
  holds = ((sizes[:, None, 0] <= canv[None, :, 0]) &
           (sizes[:, None, 1] <= canv[None, :, 1])).any(axis=1)
  out = np.zeros(len(sizes), np.int32)
  if holds.any():
    out[holds] = assign_canvases(sizes[holds], canv)
  if not holds.all():
    fit = np.minimum(canv[None, :, 0] / sizes[~holds, None, 0],
                     canv[None, :, 1] / sizes[~holds, None, 1])
    out[~holds] = np.argmax(fit, axis=1)
  return out


def original_sizes(source) -> np.ndarray:
  """The original (height, width) of every record of a source, from `source.annotation(i)`.

  A source whose images all have one size may say so with an `hw` attribute (height, width)
  (ShapesSource), which is then used instead (no annotation is read).

  Returns:
    int32 [N, 2]; (0, 0) for a record whose image header is unreadable (`source[i]` skips it,
    or raises under bad_input="error"), logged once in total.

  Raises:
    ValueError: the source has no `annotation` method.
  """
  fixed = getattr(source, "hw", None)
  if fixed is not None:
    return np.tile(np.array(fixed, np.int32), (len(source), 1))
  if not hasattr(source, "annotation"):
    raise ValueError(f"{getattr(source, 'name', type(source).__name__)} has no annotation(i): "
                     "give data.canvases explicitly")
  out = np.zeros((len(source), 2), np.int32)
  unreadable = 0
  for i in range(len(source)):
    try:
      out[i] = source.annotation(i)["orig_hw"]
    except images.ImageDecodeError:
      unreadable += 1
  if unreadable:
    logging.warning("%s: %d records with unreadable image headers left out of the canvas "
                    "plan", getattr(source, "name", "source"), unreadable)
  return out


def source_sizes(source, *, min_size: int, max_size: int) -> np.ndarray:
  """The resized size of every record of a source (`original_sizes`, no decoding).

  Args:
    source: random-access source with `annotation(i)` ("orig_hw") or `hw`.
    min_size: target of the shorter side.
    max_size: cap on the longer side.

  Returns:
    int32 [N, 2] resized (height, width); (0, 0) for a record whose image header is unreadable.

  Raises:
    ValueError: the source has no `annotation` method.
  """
  return resized_sizes(original_sizes(source), min_size=min_size, max_size=max_size)


def resized_sizes(sizes: np.ndarray, *, min_size: int, max_size: int) -> np.ndarray:
  """`resized_hw` of int [N, 2] original sizes; (0, 0) stays (0, 0) (unknown)."""
  out = np.zeros((len(sizes), 2), np.int32)
  for i, hw in enumerate(np.asarray(sizes)):
    if hw.min() > 0:
      out[i] = resized_hw(hw, min_size, max_size)
  return out


def source_canvases(sizes: np.ndarray, canvas_of: np.ndarray, num_canvases: int,
                    multiple: int = 32) -> tuple[tuple[int, int], ...]:
  """The fixed canvas the decoded images of each canvas group are shipped on (device resize).

  Args:
    sizes: int [N, 2] original (height, width) per record ((0, 0): unknown).
    canvas_of: int [N] canvas per record (-1: left out).
    num_canvases: K.
    multiple: sides are rounded up to a multiple of this.

  Returns:
    K (Hs, Ws): per group the largest height and the largest width of its records, rounded up
    (one multiple for a group without records).
  """
  sizes = np.asarray(sizes).reshape(-1, 2)
  canvas_of = np.asarray(canvas_of)
  out = []
  for k in range(num_canvases):
    group = sizes[canvas_of == k]
    hw = group.max(axis=0) if len(group) else np.ones(2, np.int64)
    out.append(tuple(int(-(-int(v) // multiple) * multiple) for v in hw))
  return tuple(out)


def canvases_for_source(source, *, min_size: int, max_size: int, num_canvases: int,
                        multiple: int = 32) -> tuple[tuple[int, int], ...]:
  """`choose_canvases` for the resized sizes of every readable record of a source.

  Args:
    source: random-access source with `annotation(i)` ("orig_hw").
    min_size: target of the shorter side.
    max_size: cap on the longer side.
    num_canvases: K >= 1.
    multiple: every canvas side is a multiple of this.

  Returns:
    At most K canvases (h, w), ascending by area.
  """
  sizes = source_sizes(source, min_size=min_size, max_size=max_size)
  return choose_canvases(sizes[sizes.min(axis=1) > 0], num_canvases, multiple)


def padded_fraction(sizes: Any, canvases: Sequence[Sequence[int]]) -> float:
  """The fraction of canvas pixels that are padding when each size goes to its canvas.

  Args:
    sizes: int [N, 2] resized (height, width).
    canvases: canvases (h, w) that hold every size.

  Returns:
    1 - (image pixels) / (canvas pixels).
  """
  sizes = _check_sizes(sizes)
  canv = np.asarray(canvases, np.int64).reshape(-1, 2)
  assigned = canv[assign_canvases(sizes, canv)]
  return 1.0 - float((sizes[:, 0] * sizes[:, 1]).sum()) / float(
      (assigned[:, 0] * assigned[:, 1]).sum())
