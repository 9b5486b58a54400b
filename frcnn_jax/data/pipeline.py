"""The input pipeline: a dataset source -> Batches on a few static canvases (docs/conventions.md).

Canvases. Every record goes to one canvas (h, w): the smallest-area one that holds its
resized size (`canvases.assign_canvases`; sizes from `source.annotation(i)`, no decoding). With
one canvas every record goes to it, and an image larger than it is scaled down to fit. A
record no canvas of several holds (explicit `data.canvases`) goes to the canvas on which it
shrinks least (`canvases.place_canvases`). A record whose image header is unreadable is left
out of the plan and counted as skipped.

Training (`train_loader`): an endless sequence of global batches of B records, each on one
canvas, from a plan that every process computes identically from the seed (`TrainPlan`):
each epoch e, the records of each canvas group are shuffled (generator seeded with
(seed, e, canvas)), cut into global batches of B (a group's last B' < B records are left out
of that epoch: `dropped_per_epoch`, logged; they are different records each epoch), and the
order of all the epoch's batches is shuffled (seeded with (seed, e)). Process p of P reads
slots [p B / P, (p + 1) B / P) of every global batch, so all processes run the same canvas
at every step. Per record, in `num_workers` worker processes (`worker_pool`):
`transforms.prepare` (difficult objects dropped, resize, random horizontal flip drawn from a
generator seeded with (seed, e, batch, slot), so flips do not depend on the worker or process
count, pad to the batch's canvas). A record that cannot be read (`source[i]` is None under
bad_input="skip") is replaced by the next record of its group in that epoch's order
(counted). The iterator assembles each process's batch into global `jax.Array`s sharded on
the mesh's `data` axis (`parallel.host_batch_to_global`), `prefetch` batches ahead.
Its state is the number of global batches returned, with the epoch and the position in it
(`get_state()`, JSON); `set_state()` continues with identical batches on an iterator built
with the same plan, whatever its worker count.

Resizing on the device (`resize_on_device`, docs/data.md "Input on the device"): the host only
decodes; each record's decoded image goes, unresized, at the top-left of its group's source
canvas (`canvases.source_canvases`: per canvas, the largest original height and width among its
records, from the same annotations), and the Batch carries "source_image", "source_hw", "flip"
and a zero-byte "canvas" in place of "image" (`transforms.prepare`); the jitted step makes the
image with `frcnn_jax.ops.images.batch_images`. Boxes and sizes are the same either way.

Evaluation: `frcnn_jax.data.eval_loader`.

Counters (per process, `iterator.counts`): "skipped_records" (unreadable records),
"gt_overflow" (objects left out because an image had more than max_gt), "degenerate_boxes"
(boxes with no extent after resizing). Each case is also logged with the image's name where it
happens (in the worker process).

Worker processes die with the trainer (also on SIGKILL), ignore Ctrl-C and leave no shared
memory behind; `close()` stops them.
"""

import collections
import logging
from typing import Any
from typing import Sequence

import jax
import numpy as np

from frcnn_jax.data import batching
from frcnn_jax.data import transforms
from frcnn_jax.data import worker_pool
from frcnn_jax.runtime import parallel

_STATE_VERSION = 2


class TrainPlan:
  """Which records form each global training batch, and on which canvas (module docstring).

  Attributes:
    canvases: the K canvases (h, w).
    batches_per_epoch: L, global batches per epoch.
    dropped_per_epoch: records left out of each epoch (incomplete last batches).
    left_out: records in no group (unreadable image header).
    group_sizes: records per canvas.
  """

  def __init__(self, canvas_of: np.ndarray, canvases: Sequence[Sequence[int]],
               batch_size: int, seed: int):
    """Builds the plan.

    Args:
      canvas_of: int [N] canvas per record (-1: left out).
      canvases: K canvases (h, w).
      batch_size: B, the global batch.
      seed: the plan's seed, in [0, 2**32).

    Raises:
      ValueError: no group holds a full batch.
    """
    self.canvases = batching.check_canvases(canvases)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    canvas_of = np.asarray(canvas_of)
    self.num_records = len(canvas_of)
    self._groups = [np.flatnonzero(canvas_of == k) for k in range(len(self.canvases))]
    self.group_sizes = [len(g) for g in self._groups]
    self.left_out = int((canvas_of < 0).sum())
    self._batches_per_group = [len(g) // self.batch_size for g in self._groups]
    self.batches_per_epoch = sum(self._batches_per_group)
    self.dropped_per_epoch = sum(len(g) % self.batch_size for g in self._groups)
    if not self.batches_per_epoch:
      raise ValueError(f"no canvas group holds a full batch of train.batch_size="
                       f"{self.batch_size} (records per canvas {self.group_sizes})")
    self._cached: tuple[int, Any] | None = None

  def fingerprint(self) -> dict[str, Any]:
    """What the batches depend on (compared on `set_state`)."""
    return {"canvases": [list(c) for c in self.canvases], "group_sizes": self.group_sizes,
            "batch_size": self.batch_size, "seed": self.seed, "num_records": self.num_records}

  def epoch(self, e: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Epoch e's order: (group permutations, canvas [L], first position in its group [L])."""
    if self._cached is not None and self._cached[0] == e:
      return self._cached[1]
    perms, canvas, start = [], [], []
    for k, group in enumerate(self._groups):
      perms.append(np.random.default_rng([self.seed, e, 0, k]).permutation(group))
      canvas += [k] * self._batches_per_group[k]
      start += [i * self.batch_size for i in range(self._batches_per_group[k])]
    order = np.random.default_rng([self.seed, e, 1]).permutation(self.batches_per_epoch)
    result = (perms, np.asarray(canvas, np.int32)[order], np.asarray(start, np.int64)[order])
    self._cached = (e, result)
    return result

  def batch(self, n: int) -> tuple[int, np.ndarray]:
    """Global batch n (counted over all epochs): (canvas index, record indices [B])."""
    e, t = divmod(int(n), self.batches_per_epoch)
    perms, canvas, start = self.epoch(e)
    k = int(canvas[t])
    return k, perms[k][start[t]:start[t] + self.batch_size]

  def describe(self) -> str:
    """One line for the log."""
    groups = ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(self.canvases, self.group_sizes))
    return (f"{len(self.canvases)} canvas(es) (records per canvas {groups}); "
            f"{self.batches_per_epoch} batches of {self.batch_size} per epoch, "
            f"{self.dropped_per_epoch} records left out of each epoch (incomplete last "
            f"batches)" + (f", {self.left_out} unreadable records" if self.left_out else ""))


class _TrainBatch:
  """Task n -> this process's slice of global batch n and its counters (runs in workers)."""

  def __init__(self, source, plan: TrainPlan, settings: dict[str, Any], flip: bool,
               shard_index: int, shard_count: int,
               source_canvases: tuple[tuple[int, int], ...] | None):
    self._source = source
    self._plan = plan
    self.source_canvases = source_canvases
    self._settings = settings
    self._flip = flip
    self._local = plan.batch_size // shard_count
    self._first = shard_index * self._local

  def __call__(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    plan = self._plan
    e, t = divmod(int(n), plan.batches_per_epoch)
    perms, canvas, start = plan.epoch(e)
    k = int(canvas[t])
    perm = perms[k]
    counts = dict.fromkeys(batching.COUNT_NAMES, 0)
    examples = []
    for slot in range(self._first, self._first + self._local):
      position = int(start[t]) + slot
      for attempt in range(len(perm)):
        example = self._source[int(perm[(position + attempt) % len(perm)])]
        if example is not None:
          break
        counts[batching.SKIPPED] += 1
      else:
        raise ValueError(f"no readable record among the {len(perm)} of canvas "
                         f"{plan.canvases[k]}")
      flip = self._flip and bool(
          np.random.default_rng([plan.seed, e, t, slot, 2]).random() < 0.5)
      fields, c = transforms.prepare(
          example, training=True, flip=flip, pad_hw=plan.canvases[k],
          source_canvas=None if self.source_canvases is None else self.source_canvases[k],
          **self._settings)
      for name, v in c.items():
        counts[name] += v
      examples.append(fields)
    return batching.stack(examples), counts


class TrainIterator:
  """Endless iterator of training Batches with a saveable position.

  Attributes:
    plan: the `TrainPlan`.
    source_canvases: per canvas, the source canvas (Hs, Ws) the decoded images are shipped on
      when the device resizes; None when the host does.
    counts: per-process counters (see the module docstring) over the batches returned.
  """

  def __init__(self, make_batch: _TrainBatch, plan: TrainPlan, mesh: jax.sharding.Mesh | None,
               prefetch: int, num_workers: int, worker_buffer_size: int):
    self.plan = plan
    self.source_canvases = make_batch.source_canvases
    self._make_batch = make_batch
    self._mesh = mesh
    self._prefetch = prefetch
    self._num_workers = num_workers
    self._worker_buffer = worker_buffer_size
    self._pool: worker_pool.OrderedPool | None = None
    self._queue: collections.deque = collections.deque()
    self._returned = 0   # global batches returned so far (the position)
    self.counts = dict.fromkeys(batching.COUNT_NAMES, 0)

  def __iter__(self) -> "TrainIterator":
    return self

  def _fetch(self) -> tuple[dict[str, Any], dict[str, int]]:
    if self._pool is None:
      self._pool = worker_pool.OrderedPool(
          self._make_batch, self._num_workers, start=self._returned + len(self._queue),
          buffer=self._worker_buffer, init=batching.use_absl_defaults if self._num_workers else None)
    batch, counts = next(self._pool)
    if self._mesh is not None:
      batch = parallel.host_batch_to_global(batch, self._mesh)
    return batch, counts

  def __next__(self) -> dict[str, Any]:
    while len(self._queue) <= self._prefetch:
      self._queue.append(self._fetch())
    batch, counts = self._queue.popleft()
    self._returned += 1
    for k, v in counts.items():
      self.counts[k] += v
    return batch

  @property
  def make_batch(self) -> _TrainBatch:
    """The picklable task the workers run: n -> (this process's numpy share of global batch n,
    its counters); another loader may run it (frcnn_jax/benchmarking/grain_loader.py)."""
    return self._make_batch

  @property
  def worker_pids(self) -> list[int]:
    """Process ids of the running worker processes (none before the first batch)."""
    return [] if self._pool is None else self._pool.pids

  def get_state(self) -> dict[str, Any]:
    """The position after the last batch returned (JSON-serialisable)."""
    epoch, position = divmod(self._returned, self.plan.batches_per_epoch)
    return {"version": _STATE_VERSION, "batches": self._returned, "epoch": epoch,
            "position": position, "plan": self.plan.fingerprint(),
            "counts": dict(self.counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` of an iterator built with the same plan.

    Raises:
      ValueError: the state is from another pipeline version or another plan (another
        dataset, canvas set, batch size or seed), naming what differs.
    """
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
      raise ValueError("the saved data iterator state is from another input pipeline version")
    mine = self.plan.fingerprint()
    differs = [f"{k}: saved {state['plan'].get(k)!r}, now {v!r}"
               for k, v in mine.items() if state["plan"].get(k) != v]
    if differs:
      raise ValueError("the saved data iterator position belongs to another batch plan: " +
                       "; ".join(differs))
    self.close()
    self._queue.clear()
    self._returned = int(state["batches"])
    self.counts = {k: int(state.get("counts", {}).get(k, 0)) for k in batching.COUNT_NAMES}

  def close(self) -> None:
    """Stops the worker processes; a later `next()` starts them again."""
    if self._pool is not None:
      self._pool.close()
      self._pool = None
      self._queue.clear()


def train_loader(source, *, batch_size: int, seed: int, min_size: int, max_size: int,
                 max_gt: int, canvases: Sequence[Sequence[int]] | None = None,
                 pad_hw: Sequence[int] | None = None, flip: bool = True, num_workers: int = 0,
                 prefetch: int = 2, mesh: jax.sharding.Mesh | None = None,
                 shard_options=None, worker_buffer_size: int = 2,
                 resize_on_device: bool = False) -> TrainIterator:
  """The training input: planned, transformed, batched per canvas, sharded on `mesh`.

  Args:
    source: random-access dataset source (docs/conventions.md); `source[i]` may be None (skipped).
    batch_size: B, the global batch over all processes.
    seed: plan and flip seed, in [0, 2**32).
    min_size: shorter side after resizing.
    max_size: cap on the longer side.
    max_gt: G ground-truth slots per image.
    canvases: the K canvases (h, w).
    pad_hw: one canvas (the same as `canvases=(pad_hw,)`); give canvases or pad_hw.
    flip: random horizontal flips (probability 0.5).
    num_workers: worker processes (0: transform in this process).
    prefetch: global batches assembled ahead of the one returned (0: none).
    mesh: the data mesh; batches become global jax.Arrays sharded on its `data` axis. None:
      this process's numpy batches (B / process count examples).
    shard_options: a `batching.Shard` (`shard_index`, `shard_count`) standing in for the JAX
      process (tests simulate processes with it; leave `mesh` None then).
    worker_buffer_size: tasks queued per worker (`worker_pool.OrderedPool`'s `buffer`; a
      batch larger than the 1 MiB result pipe keeps its worker about one batch ahead).
    resize_on_device: ship each decoded image on its group's source canvas with the fields
      `frcnn_jax.ops.images.batch_images` resizes, flips and pads it from on the device,
      instead of the resized image (docs/data.md, "Input on the device").

  Returns:
    A `TrainIterator` of Batches (docs/conventions.md) of B examples (global arrays), or
    B / process count (numpy, `mesh` None).

  Raises:
    ValueError: B not divisible by the process or device count, a bad size, a seed out of
      range, or no canvas with a full batch of records.
  """
  settings = batching.transform_settings(min_size, max_size, max_gt)
  canvases = batching.resolve_canvases(canvases, pad_hw)
  index, count = batching.shards(shard_options)
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the "
                     f"process count {count}")
  if mesh is not None:
    parallel.check_batch_size(batch_size, mesh)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32) for the input pipeline, got {seed}")
  if num_workers < 0 or prefetch < 0:
    raise ValueError(f"data.num_workers and data.prefetch must be >= 0, got {num_workers}, "
                     f"{prefetch}")
  canvas_of, sources = batching.record_canvases(source, canvases, min_size=min_size, max_size=max_size,
                                       resize_on_device=resize_on_device)
  plan = TrainPlan(canvas_of, canvases, batch_size, seed)
  logging.info("%s train plan: %s%s", getattr(source, "name", "source"), plan.describe(),
               batching.describe_sources(sources))
  make_batch = _TrainBatch(source, plan, settings, flip, index, count, sources)
  return TrainIterator(make_batch, plan, mesh, prefetch, num_workers, worker_buffer_size)
