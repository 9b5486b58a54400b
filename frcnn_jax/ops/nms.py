"""Static-shape greedy non-maximum suppression, tiled so that 12000 boxes stay cheap.

Semantics (DESIGN.md): boxes are visited by descending score (ties by ascending index, so the
result is deterministic); a visited box is kept unless a box kept before it has IoU
(`boxes.iou`) strictly greater than `iou_threshold` with it. Invalid boxes (and boxes with a
NaN score) are never kept and never suppress. The output holds the first `max_output_size`
kept indices in visiting order, padded with -1.

Algorithm: after sorting, the boxes are processed in tiles of `tile_size` inside a
`lax.while_loop`. Each tile is first suppressed by the boxes already kept, which live
compacted in a buffer of `max_output_size` slots and are compared chunk by chunk (only the
filled chunks). The tile's own greedy order is then resolved by a fixed-point iteration on
its [T, T] IoU block: keep = candidates & ~any(kept earlier in the tile and overlapping),
which is exact once it stops changing (at most T rounds, in practice a handful). Kept boxes
are appended to the buffer and the output, and the loop stops as soon as `max_output_size`
boxes are kept or the valid boxes run out. Work is O(N * K) IoU pairs for K kept boxes,
memory O(T * (T + K)); no N x N matrix is ever built.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from frcnn_jax.ops import boxes as box_ops

Array = jnp.ndarray

DEFAULT_TILE_SIZE = 512


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _overlaps(a: Array, b: Array, threshold: Array) -> Array:
  """[K, 4] x [T, 4] -> bool [K, T]: IoU strictly above the threshold."""
  return box_ops.iou(a, b) > threshold


def _same_class(a: Array | None, b: Array | None) -> Array | bool:
  return True if a is None else a[:, None] == b[None, :]


def _nms(boxes: Array, scores: Array, classes: Array | None, iou_threshold,
         max_output_size: int, valid: Array | None, tile_size: int) -> Array:
  """Shared implementation of `nms` and `batched_nms` (classes None: one class)."""
  if not isinstance(max_output_size, (int, np.integer)) or max_output_size < 0:
    raise ValueError(f"max_output_size must be a static int >= 0, got {max_output_size!r}.")
  if not isinstance(tile_size, (int, np.integer)) or tile_size <= 0:
    raise ValueError(f"tile_size must be a positive int, got {tile_size!r}.")
  max_output_size, tile_size = int(max_output_size), int(tile_size)
  boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  scores = lax.stop_gradient(jnp.asarray(scores, jnp.float32))
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape [N, 4], got {boxes.shape} (use jax.vmap).")
  n = boxes.shape[0]
  if scores.shape != (n,):
    raise ValueError(f"scores must have shape [{n}], got {scores.shape}.")
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  if valid.shape != (n,):
    raise ValueError(f"valid must have shape [{n}], got {valid.shape}.")
  if classes is not None:
    classes = jnp.asarray(classes, jnp.int32)
    if classes.shape != (n,):
      raise ValueError(f"classes must have shape [{n}], got {classes.shape}.")
  if n == 0 or max_output_size == 0:
    return jnp.full((max_output_size,), -1, jnp.int32)
  return _tiled_nms(boxes, scores, classes, jnp.asarray(iou_threshold, jnp.float32), valid,
                    max_output_size=max_output_size, tile_size=tile_size)


@functools.partial(jax.jit, static_argnames=("max_output_size", "tile_size"))
def _tiled_nms(boxes: Array, scores: Array, classes: Array | None, iou_threshold: Array,
               valid: Array, *, max_output_size: int, tile_size: int) -> Array:
  """The tiled loop on checked, non-empty inputs (jitted so eager calls compile once)."""
  n = boxes.shape[0]
  valid = valid & ~jnp.isnan(scores)
  # Sort: valid first, then by descending score, then by ascending index. `+ 0.0` maps -0.0
  # to 0.0 so that equal scores compare equal under the sort's total order.
  order = jnp.arange(n, dtype=jnp.int32)
  _, _, order = lax.sort(((~valid).astype(jnp.int32), -scores + 0.0, order), num_keys=3)
  num_valid = jnp.sum(valid.astype(jnp.int32))

  t = min(tile_size, _round_up(n, 8))
  num_tiles = -(-n // t)
  pad = num_tiles * t - n
  sorted_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
  sorted_index = jnp.pad(order, (0, pad), constant_values=-1)
  sorted_classes = None if classes is None else jnp.pad(classes[order], (0, pad))
  kc = min(t, _round_up(max_output_size, 8))
  kp = _round_up(max_output_size, kc)
  lower = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]

  def tile_body(state):
    i, count, kept_boxes, kept_classes, out = state
    tile = lax.dynamic_slice_in_dim(sorted_boxes, i * t, t)
    tile_index = lax.dynamic_slice_in_dim(sorted_index, i * t, t)
    tile_classes = (None if classes is None
                    else lax.dynamic_slice_in_dim(sorted_classes, i * t, t))
    tile_valid = (i * t + jnp.arange(t)) < num_valid

    def chunk_body(chunk_state):
      c, suppressed = chunk_state
      chunk = lax.dynamic_slice_in_dim(kept_boxes, c * kc, kc)
      chunk_classes = (None if classes is None
                       else lax.dynamic_slice_in_dim(kept_classes, c * kc, kc))
      filled = (c * kc + jnp.arange(kc)) < count
      hit = _overlaps(chunk, tile, iou_threshold) & _same_class(chunk_classes, tile_classes)
      return c + 1, suppressed | jnp.any(hit & filled[:, None], axis=0)

    num_chunks = (count + kc - 1) // kc
    _, suppressed = lax.while_loop(lambda s: s[0] < num_chunks, chunk_body,
                                   (jnp.int32(0), jnp.zeros((t,), bool)))
    candidates = tile_valid & ~suppressed
    within = (_overlaps(tile, tile, iou_threshold)
              & _same_class(tile_classes, tile_classes) & lower)

    def fixed_point(fp_state):
      keep, _ = fp_state
      new_keep = candidates & ~jnp.any(within & keep[:, None], axis=0)
      return new_keep, jnp.any(new_keep != keep)

    keep, _ = lax.while_loop(lambda s: s[1], fixed_point, (candidates, jnp.bool_(True)))
    slot = count + jnp.cumsum(keep.astype(jnp.int32)) - 1
    kept_boxes = kept_boxes.at[jnp.where(keep, slot, kp)].set(tile, mode="drop")
    if classes is not None:
      kept_classes = kept_classes.at[jnp.where(keep, slot, kp)].set(tile_classes, mode="drop")
    out = out.at[jnp.where(keep, slot, max_output_size)].set(tile_index, mode="drop")
    return i + 1, count + jnp.sum(keep.astype(jnp.int32)), kept_boxes, kept_classes, out

  def tile_cond(state):
    i, count = state[0], state[1]
    return (i < num_tiles) & (i * t < num_valid) & (count < max_output_size)

  init = (jnp.int32(0), jnp.int32(0), jnp.zeros((kp, 4), jnp.float32),
          jnp.zeros((kp,), jnp.int32), jnp.full((max_output_size,), -1, jnp.int32))
  return lax.while_loop(tile_cond, tile_body, init)[-1]


def nms(boxes: Array, scores: Array, iou_threshold: float | Array, max_output_size: int,
        valid: Array | None = None, *, tile_size: int = DEFAULT_TILE_SIZE) -> Array:
  """Greedy NMS with a static output size.

  Args:
    boxes: [N, 4] xyxy boxes (one image; lift to a batch with jax.vmap).
    scores: [N] scores; higher is visited first, ties by ascending index.
    iou_threshold: a box is suppressed by a kept box with IoU > iou_threshold.
    max_output_size: static number of output slots.
    valid: optional [N] bool; invalid boxes are never kept and never suppress.
    tile_size: boxes per tile (a static speed knob; the result does not depend on it).

  Returns:
    int32 [max_output_size] indices into boxes of the kept boxes by descending score,
    padded with -1.
  """
  return _nms(boxes, scores, None, iou_threshold, max_output_size, valid, tile_size)


def batched_nms(boxes: Array, scores: Array, classes: Array, iou_threshold: float | Array,
                max_output_size: int, valid: Array | None = None, *,
                tile_size: int = DEFAULT_TILE_SIZE) -> Array:
  """Class-aware greedy NMS: boxes of different classes never suppress each other.

  Equivalent to running `nms` per class and merging the kept boxes by descending score
  (ties by index), truncated to max_output_size; exact (a class-equality mask, no
  coordinate offsets).

  Args:
    boxes: [N, 4] xyxy boxes.
    scores: [N] scores.
    classes: [N] integer class ids.
    iou_threshold: a box is suppressed by a kept box of its class with IoU > iou_threshold.
    max_output_size: static number of output slots.
    valid: optional [N] bool; invalid boxes are never kept and never suppress.
    tile_size: boxes per tile (a static speed knob; the result does not depend on it).

  Returns:
    int32 [max_output_size] kept indices by descending score, padded with -1.
  """
  return _nms(boxes, scores, classes, iou_threshold, max_output_size, valid, tile_size)

