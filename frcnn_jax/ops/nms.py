"""Static-shape greedy non-maximum suppression: every loop has a compile-time trip count.

Semantics (docs/conventions.md): boxes are visited by descending score (ties by ascending index,
so the result is deterministic); a visited box is kept unless a box kept before it has IoU
(`boxes.iou`) strictly greater than `iou_threshold` with it. Invalid boxes (and boxes with a NaN
score) are never kept and never suppress. The output holds the first `max_output_size` kept
indices in visiting order, padded with -1.

Algorithm: after sorting, the boxes are processed in tiles of T (`tile_size`) by a
`lax.fori_loop` over the static number of tiles. Each tile is first suppressed by the boxes
already kept, which live compacted in a buffer of K = `max_output_size` slots; the tile's own
greedy order is then settled exactly on its [T, T] overlap matrix, and its kept boxes are
appended to the buffer and the output. Every loop has a static trip count, which XLA records
as `known_trip_count`, so XLA:GPU never copies a loop condition to the host
(tests/test_hlo_structure.py). Two schedules of this one algorithm, chosen when lowering
(`lax.platform_dependent`), give the same result:

- accelerators (GPU, TPU): no data-dependent control flow at all. Every tile runs and is
  compared with all K slots (masked by the number filled), and the in-tile order is settled
  in T / 32 trips (`_resolve_blocks`), each a [32, T] reduction plus 32 dependent bit
  operations fused into one kernel. The work is the worst case, N * (K + T) IoU pairs (30 M
  for 12000 -> 2000, little for an accelerator), in N / 32 short loop trips and no host
  round trip.
- CPU, where a conditional costs no host round trip (the host is the device): `lax.cond`
  skips the tiles once the output is full or the valid boxes have run out, and the chunks of
  the kept buffer not filled yet, so the work is that of a data-dependent loop, about
  N' * K' / 2 pairs for the N' boxes visited and K' kept. The in-tile order is settled one
  box per trip (`_resolve_rows`), a cheap trip on XLA:CPU. Under `jax.vmap` a custom
  batching rule keeps the skipping (a plain vmap would turn the conds into selects that run
  both branches): a tile or chunk runs while any image of the batch needs it.

The IoU is `boxes.iou`'s formula evaluated as torchvision's kernel does (`_iou`).
Memory is O(T * (T + K)); no N x N matrix is ever built.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from frcnn_jax.ops import boxes as box_ops

Array = jnp.ndarray

DEFAULT_TILE_SIZE = 512
_BLOCK = 32   # boxes settled on one uint32 bit mask by `_resolve_blocks`


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _columns(boxes: Array) -> Array:
  """[M, 4] xyxy boxes -> [5, M] rows x1, y1, x2, y2, area (`boxes.area`)."""
  return jnp.concatenate([boxes.T, box_ops.area(boxes)[None]], axis=0)


def _iou(a: Array, b: Array) -> Array:
  """[5, M] x [5, T] `_columns` -> [M, T] IoU: `boxes.iou`'s formula, torchvision's order.

  Areas are computed once per box, then inter / (area_a + area_b - inter), one float32
  rounding per operation (tested bit for bit against NumPy), as torchvision's kernel does;
  this also makes the [M, T] pass a third cheaper on CPU than `boxes.iou` on [M, 4] boxes.
  """
  a, b = a[:, :, None], b[:, None, :]
  iw = jnp.maximum(jnp.minimum(a[2], b[2]) - jnp.maximum(a[0], b[0]), 0.0)
  ih = jnp.maximum(jnp.minimum(a[3], b[3]) - jnp.maximum(a[1], b[1]), 0.0)
  inter = iw * ih
  union = a[4] + b[4] - inter
  positive = union > 0.0
  return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def _overlaps(a: Array, b: Array, threshold: Array) -> Array:
  """[5, M] x [5, T] `_columns` -> bool [M, T]: IoU strictly above the threshold."""
  return _iou(a, b) > threshold


def _nms(boxes: Array, scores: Array, classes: Array | None, iou_threshold,
         max_output_size: int, valid: Array | None, tile_size: int) -> Array:
  """Shared implementation of `nms` and `batched_nms` (classes None: one class)."""
  if not isinstance(max_output_size, (int, np.integer)) or max_output_size < 0:
    raise ValueError(f"max_output_size must be a static int >= 0, got {max_output_size!r}.")
  if not isinstance(tile_size, (int, np.integer)) or tile_size <= 0 or tile_size % 8:
    raise ValueError(f"tile_size must be a positive multiple of 8, got {tile_size!r}.")
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


def _resolve_rows(blocked: Array, within: Array) -> Array:
  """Greedy suppression inside one tile, one box per loop trip (the CPU schedule).

  Args:
    blocked: bool [T]: boxes that are invalid or suppressed by earlier tiles.
    within: bool [T, T], strictly upper triangular: within[j, r] when box j, visited before
      box r, would suppress it.

  Returns:
    bool [T]: the boxes of the tile that greedy NMS keeps.
  """
  def row(j, blocked):
    return blocked | (within[j] & ~blocked[j])

  # Box j only suppresses later boxes, so its own flag is final once row j is reached.
  return ~lax.fori_loop(0, blocked.shape[0], row, blocked)


def _resolve_blocks(blocked: Array, within: Array) -> Array:
  """Greedy suppression inside one tile in T / 32 loop trips (the accelerator schedule).

  Each trip settles a block of 32 boxes: the boxes kept in earlier blocks suppress it (one
  [32, T] reduction), then its own order is resolved on a uint32 bit mask of its diagonal
  [32, 32] overlap block, 32 dependent bit operations in one fused expression.

  Args:
    blocked: bool [T]: boxes that are invalid or suppressed by earlier tiles (T a multiple
      of 8; blocks of 8 or 16 when T is not a multiple of 32).
    within: bool [T, T], strictly upper triangular (see `_resolve_rows`).

  Returns:
    bool [T]: the boxes of the tile that greedy NMS keeps (equal to `_resolve_rows`).
  """
  t = blocked.shape[0]
  s = np.gcd(t, _BLOCK)
  bit = jnp.left_shift(jnp.uint32(1), jnp.arange(s, dtype=jnp.uint32))
  diagonal = jnp.stack([within[b * s:(b + 1) * s, b * s:(b + 1) * s] for b in range(t // s)])
  diagonal_bits = jnp.sum(jnp.where(diagonal, bit, 0), axis=-1, dtype=jnp.uint32)  # [T/s, s]

  def block(b, state):
    blocked, keep = state
    word = jnp.sum(jnp.where(lax.dynamic_slice_in_dim(blocked, b * s, s), bit, 0),
                   dtype=jnp.uint32)
    rows = lax.dynamic_index_in_dim(diagonal_bits, b, keepdims=False)
    for j in range(s):   # box j of the block is kept iff its bit is still clear
      free = jnp.bitwise_and(jnp.right_shift(word, jnp.uint32(j)), jnp.uint32(1)) ^ 1
      word = word | (rows[j] * free)
    kept = jnp.bitwise_and(word, bit) == 0
    hit = jnp.any(kept[:, None] & lax.dynamic_slice_in_dim(within, b * s, s), axis=0)
    return blocked | hit, lax.dynamic_update_slice_in_dim(keep, kept, b * s, 0)

  return lax.fori_loop(0, t // s, block, (blocked, jnp.zeros((t,), bool)))[1]


def _sorted_tiles(boxes: Array, scores: Array, classes: Array, valid: Array, t: int):
  """One image's boxes in visiting order as `_columns`, padded to whole tiles of t.

  Returns:
    ((columns [5, P], index [P] (-1 in the padding), classes [P]), number of valid boxes).
  """
  n = boxes.shape[0]
  valid = valid & ~jnp.isnan(scores)
  # Sort: valid first, then by descending score, then by ascending index. `+ 0.0` maps -0.0
  # to 0.0 so that equal scores compare equal under the sort's total order.
  order = jnp.arange(n, dtype=jnp.int32)
  _, _, order = lax.sort(((~valid).astype(jnp.int32), -scores + 0.0, order), num_keys=3)
  pad = _round_up(n, t) - n
  tiles = (jnp.pad(_columns(boxes[order]), ((0, 0), (0, pad))),
           jnp.pad(order, (0, pad), constant_values=-1), jnp.pad(classes[order], (0, pad)))
  return tiles, jnp.sum(valid.astype(jnp.int32))


def _load(tiles, i: Array, t: int):
  """Tile i of `_sorted_tiles`: (columns [5, t], index [t], classes [t])."""
  return tuple(lax.dynamic_slice_in_dim(x, i * t, t, axis=x.ndim - 1) for x in tiles)


def _suppressed_by_kept(tile, kept: Array, kept_classes: Array, start: Array, count: Array,
                        threshold: Array, class_aware: bool) -> Array:
  """bool [T]: tile boxes overlapping one of kept slots [start, start + M) below `count`."""
  hit = _overlaps(kept, tile[0], threshold)
  hit &= (start + jnp.arange(kept.shape[1]) < count)[:, None]
  if class_aware:
    hit &= kept_classes[:, None] == tile[2][None, :]
  return jnp.any(hit, axis=0)


def _append(state, blocked: Array, threshold: Array, *, resolve, class_aware: bool):
  """Settles the tile in `state` given its `blocked` boxes; appends its survivors.

  state: (tile, count, kept columns [5, S], kept classes [S], output [K]).
  """
  tile, count, kept, kept_classes, out = state
  position = jnp.arange(blocked.shape[0])
  within = _overlaps(tile[0], tile[0], threshold) & (position[:, None] < position[None, :])
  if class_aware:
    within &= tile[2][:, None] == tile[2][None, :]
  keep = resolve(blocked, within)
  slot = jnp.where(keep, count + jnp.cumsum(keep.astype(jnp.int32)) - 1, kept.shape[1])
  kept = kept.at[:, slot].set(tile[0], mode="drop")
  if class_aware:
    kept_classes = kept_classes.at[slot].set(tile[2], mode="drop")
  out = out.at[slot].set(tile[1], mode="drop")
  return tile, count + jnp.sum(keep.astype(jnp.int32)), kept, kept_classes, out


def _initial_state(tile, slots: int, k: int):
  return (tile, jnp.int32(0), jnp.zeros((5, slots), jnp.float32), jnp.zeros((slots,), jnp.int32),
          jnp.full((k,), -1, jnp.int32))


def _accelerator_nms(boxes, scores, classes, threshold, valid, *, k: int, t: int,
                     class_aware: bool) -> Array:
  """One image, no data-dependent control flow: every tile, all K slots, `_resolve_blocks`."""
  tiles, num_valid = _sorted_tiles(boxes, scores, classes, valid, t)
  append = functools.partial(_append, resolve=_resolve_blocks, class_aware=class_aware)

  def step(i, state):
    blocked = i * t + jnp.arange(t) >= num_valid
    blocked |= _suppressed_by_kept(state[0], state[2], state[3], 0, state[1], threshold,
                                   class_aware)
    # The next tile rides in the loop state: sliced inside the [K, T] comparison's fusion,
    # XLA:CPU would re-evaluate the dynamic slice for every pair (6x slower).
    return (_load(tiles, i + 1, t),) + append(state, blocked, threshold)[1:]

  state = _initial_state(_load(tiles, 0, t), _round_up(k, 8), k)
  return lax.fori_loop(0, tiles[1].shape[0] // t, step, state)[-1]


def _cpu_nms(boxes, scores, classes, threshold, valid, *, k: int, t: int,
             class_aware: bool) -> Array:
  """A batch [B, ...] of images; skips with `lax.cond` what cannot change any image's result.

  A tile runs while some image still has valid boxes there and free output slots, and a
  chunk of the kept buffer is compared while some image has filled it. The skipped work is
  a no-op for every image, so the result is that of `_accelerator_nms`.
  """
  tiles, num_valid = jax.vmap(functools.partial(_sorted_tiles, t=t))(boxes, scores, classes,
                                                                      valid)
  chunk = min(t, _round_up(k, 8))
  slots = _round_up(k, chunk)
  append = jax.vmap(functools.partial(_append, resolve=_resolve_rows, class_aware=class_aware))

  def suppress(c, blocked, state):
    def one(tile, kept, kept_classes, count, threshold):
      return _suppressed_by_kept(
          tile, lax.dynamic_slice_in_dim(kept, c * chunk, chunk, axis=1),
          lax.dynamic_slice_in_dim(kept_classes, c * chunk, chunk), c * chunk, count,
          threshold, class_aware)
    return blocked | jax.vmap(one)(state[0], state[2], state[3], state[1], threshold)

  def settle(i, state):
    def chunk_step(c, blocked):
      return lax.cond(jnp.any(c * chunk < state[1]), functools.partial(suppress, state=state),
                      lambda c, blocked: blocked, c, blocked)

    blocked = i * t + jnp.arange(t)[None, :] >= num_valid[:, None]
    blocked = lax.fori_loop(0, slots // chunk, chunk_step, blocked)
    return append(state, blocked, threshold)

  def step(i, state):
    active = jnp.any((i * t < num_valid) & (state[1] < k))
    state = lax.cond(active, settle, lambda i, state: state, i, state)
    return (jax.vmap(functools.partial(_load, i=i + 1, t=t))(tiles),) + state[1:]

  state = jax.vmap(functools.partial(_initial_state, slots=slots, k=k))(
      jax.vmap(functools.partial(_load, i=0, t=t))(tiles))
  return lax.fori_loop(0, tiles[1].shape[1] // t, step, state)[-1]


def _cpu_nms_vmappable(*, k: int, t: int, class_aware: bool):
  """`_cpu_nms` for one image, which `jax.vmap` turns into one batched `_cpu_nms`.

  Without this rule vmap would turn the skipping conds into selects that run both branches.
  """
  run = functools.partial(_cpu_nms, k=k, t=t, class_aware=class_aware)

  @jax.custom_batching.custom_vmap
  def one_image(*args):
    return run(*(x[None] for x in args))[0]

  @one_image.def_vmap
  def batch(axis_size, in_batched, *args):
    args = [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
            for x, b in zip(args, in_batched)]
    return run(*args), True

  return one_image


@functools.partial(jax.jit, static_argnames=("max_output_size", "tile_size", "schedule"))
def _tiled_nms(boxes: Array, scores: Array, classes: Array | None, iou_threshold: Array,
               valid: Array, *, max_output_size: int, tile_size: int,
               schedule: str | None = None) -> Array:
  """One image's checked, non-empty inputs (jitted so eager calls compile once).

  `schedule`: "cpu", "accelerator" or None (the platform's own, chosen when lowering).
  """
  n = boxes.shape[0]
  class_aware = classes is not None
  classes = classes if class_aware else jnp.zeros((n,), jnp.int32)
  static = dict(k=max_output_size, t=min(tile_size, _round_up(n, 8)), class_aware=class_aware)
  cpu = _cpu_nms_vmappable(**static)
  accelerator = functools.partial(_accelerator_nms, **static)
  args = (boxes, scores, classes, iou_threshold, valid)
  if schedule is None:
    return lax.platform_dependent(*args, cpu=cpu, default=accelerator)
  return {"cpu": cpu, "accelerator": accelerator}[schedule](*args)


def nms(boxes: Array, scores: Array, iou_threshold: float | Array, max_output_size: int,
        valid: Array | None = None, *, tile_size: int = DEFAULT_TILE_SIZE) -> Array:
  """Greedy NMS with a static output size.

  Args:
    boxes: [N, 4] xyxy boxes (one image; lift to a batch with jax.vmap).
    scores: [N] scores; higher is visited first, ties by ascending index.
    iou_threshold: a box is suppressed by a kept box with IoU > iou_threshold.
    max_output_size: static number of output slots.
    valid: optional [N] bool; invalid boxes are never kept and never suppress.
    tile_size: boxes per tile, a multiple of 8 (a static speed knob; the result does not
      depend on it).

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
    tile_size: boxes per tile, a multiple of 8 (a static speed knob; the result does not
      depend on it).

  Returns:
    int32 [max_output_size] kept indices by descending score, padded with -1.
  """
  return _nms(boxes, scores, classes, iou_threshold, max_output_size, valid, tile_size)

