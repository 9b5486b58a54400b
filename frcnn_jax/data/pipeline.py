"""The grain input pipeline: a dataset source -> fixed-shape Batches (CONTRACTS.md).

Training (`train_loader`): a grain `DataLoader` over this JAX process's shard of the source
(`ShardByJaxProcess(drop_remainder=True)`: contiguous, equal-sized shards), shuffled globally
from the seed and repeated forever (each epoch a new permutation), with
  1. `transforms.prepare` on each record (difficult objects dropped, resize, random horizontal
     flip drawn from the record's own generator `Philox(seed + index)`, so flips are the same
     whatever the worker count and after a restore), in `num_workers` worker processes;
  2. records that failed to read (`source[i]` is None under bad_input="skip") filtered out and
     counted;
  3. batching to the per-process batch B / process_count (remainder dropped).
The iterator then assembles each process's batch into global `jax.Array`s sharded on the mesh's
`data` axis (`parallel.host_batch_to_global`), `prefetch` batches ahead so that the
host-to-device copies overlap the training step. `get_state()` is a JSON-serialisable dict
(grain's DataLoader state after the last batch returned, and the counters); `set_state()` on
an iterator built with the same arguments continues with identical batches.

Evaluation (`eval_batches`): each record of this process's contiguous shard exactly once, in
order, difficult objects kept and flagged, numpy Batches of B / process_count examples. Every
process yields the same number of batches (shards differ by at most one record): the last ones
are padded with `valid=False` examples.

Counters (per process, `iterator.counts`): "skipped_records" (unreadable records filtered out),
"gt_overflow" (objects left out because an image had more than max_gt), "degenerate_boxes"
(boxes with no extent after resizing). Each case is also logged with the image's name where it
happens (in the worker process).
"""

import collections
import json
import logging
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np
from absl import flags

from frcnn_jax import parallel
from frcnn_jax.data import transforms

SKIPPED = "skipped_records"
COUNT_NAMES = (SKIPPED,) + transforms.COUNT_KEYS
_COUNT_PREFIX = "count_"  # per-example counter fields carried from the workers, then removed
_SKIPPED_MARKER = "skipped_record"


class _Records:
  """The source as grain reads it, with a stable repr (grain compares it on `set_state`)."""

  def __init__(self, source):
    self._source = source
    self._repr = f"Records({getattr(source, 'name', type(source).__name__)!r}, n={len(source)})"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    return self._source[index]

  def __repr__(self) -> str:
    return self._repr


def _use_absl_defaults() -> None:
  """Lets grain's worker processes read their absl flags outside an absl app (tests, scripts).

  Under `absl.app.run` the flags are parsed already and nothing changes; otherwise they keep
  their defaults.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _settings(min_size: int, max_size: int, pad_hw, max_gt: int) -> dict[str, Any]:
  """Validated transform arguments."""
  pad_hw = tuple(int(s) for s in pad_hw)
  if len(pad_hw) != 2 or min(pad_hw) <= 0:
    raise ValueError(f"data.pad_hw must be two positive sizes, got {pad_hw}")
  if min_size <= 0 or max_size <= 0:
    raise ValueError(f"data.min_size and data.max_size must be positive, got {min_size}, "
                     f"{max_size}")
  if max_gt <= 0:
    raise ValueError(f"data.max_gt must be positive, got {max_gt}")
  return {"min_size": int(min_size), "max_size": int(max_size), "pad_hw": pad_hw,
          "max_gt": int(max_gt)}


class _TrainPrepare(grain.transforms.RandomMap):
  """Record -> per-image Batch fields + counters; None (unreadable record) passes as None."""

  def __init__(self, settings: dict[str, Any], flip: bool):
    self._settings = settings
    self._flip = flip
    self._skipped = 0  # None records since the last example this worker returned

  def random_map(self, element, rng: np.random.Generator):
    if element is None:
      self._skipped += 1
      return None
    flip = self._flip and bool(rng.random() < 0.5)
    fields, counts = transforms.prepare(element, training=True, flip=flip, **self._settings)
    counts[SKIPPED], self._skipped = self._skipped, 0
    fields.update({_COUNT_PREFIX + k: np.int32(counts[k]) for k in COUNT_NAMES})
    return fields


class _EvalRead(grain.transforms.Map):
  """Record index -> per-image Batch fields + counters; unreadable -> a skip marker.

  Reads the source itself: grain's MapDataset would drop a None record silently, uncounted.
  """

  def __init__(self, source, settings: dict[str, Any]):
    self._source = source
    self._settings = settings

  def map(self, element):
    element = self._source[int(element)]
    if element is None:
      return {_SKIPPED_MARKER: np.bool_(True)}
    fields, counts = transforms.prepare(element, training=False, **self._settings)
    fields.update({_COUNT_PREFIX + k: np.int32(v) for k, v in counts.items()})
    return fields


class _NotNone(grain.transforms.Filter):
  """Drops unreadable records (already counted by `_TrainPrepare`)."""

  def filter(self, element) -> bool:
    return element is not None


def _pop_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """Removes the counter fields of a batch (or example) and returns their sums."""
  return {k: int(np.sum(batch.pop(_COUNT_PREFIX + k, 0))) for k in COUNT_NAMES}


class TrainIterator:
  """Endless iterator of training Batches with a saveable position.

  Attributes:
    counts: per-process counters (see the module docstring) over the batches returned.
  """

  def __init__(self, loader: grain.DataLoader, mesh: jax.sharding.Mesh | None, prefetch: int):
    self._loader = loader
    self._mesh = mesh
    self._prefetch = prefetch
    self._iterator = iter(loader)
    self._queue: collections.deque = collections.deque()
    self._state = self._iterator.get_state()
    self.counts = dict.fromkeys(COUNT_NAMES, 0)

  def __iter__(self) -> "TrainIterator":
    return self

  def _fetch(self) -> tuple[dict[str, Any], bytes, dict[str, int]]:
    batch = next(self._iterator)
    state = self._iterator.get_state()
    counts = _pop_counts(batch)
    if self._mesh is not None:
      batch = parallel.host_batch_to_global(batch, self._mesh)
    return batch, state, counts

  def __next__(self) -> dict[str, Any]:
    while len(self._queue) <= self._prefetch:
      self._queue.append(self._fetch())
    batch, self._state, counts = self._queue.popleft()
    for k, v in counts.items():
      self.counts[k] += v
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position after the last batch returned (JSON-serialisable)."""
    return {"grain": json.loads(self._state), "counts": dict(self.counts)}

  def set_state(self, state: dict[str, Any] | bytes) -> None:
    """Continues from a `get_state()` of an iterator built with the same arguments.

    Raises:
      ValueError: the state belongs to a different source, sampler or worker count.
    """
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    grain_state = json.dumps(state["grain"]).encode()
    self._queue.clear()
    self._iterator.set_state(grain_state)
    self._state = grain_state
    self.counts = {k: int(state.get("counts", {}).get(k, 0)) for k in COUNT_NAMES}


def train_loader(source, *, batch_size: int, seed: int, min_size: int, max_size: int,
                 pad_hw: tuple[int, int], max_gt: int, flip: bool = True, num_workers: int = 0,
                 prefetch: int = 2, mesh: jax.sharding.Mesh | None = None,
                 shard_options: grain.sharding.ShardOptions | None = None,
                 worker_buffer_size: int = 2) -> TrainIterator:
  """The training input: shuffled, repeated, transformed, batched, sharded on `mesh`.

  Args:
    source: random-access dataset source (CONTRACTS.md); `source[i]` may be None (skipped).
    batch_size: B, the global batch over all processes.
    seed: shuffling and flip seed, in [0, 2**32).
    min_size: shorter side after resizing.
    max_size: cap on the longer side.
    pad_hw: (Hp, Wp) canvas.
    max_gt: G ground-truth slots per image.
    flip: random horizontal flips (probability 0.5).
    num_workers: grain worker processes (0: transform in this process).
    prefetch: global batches assembled ahead of the one returned (0: none).
    mesh: the data mesh; batches become global jax.Arrays sharded on its `data` axis. None:
      this process's numpy batches (B / shard count examples).
    shard_options: overrides `ShardByJaxProcess(drop_remainder=True)` (tests simulate
      processes with it; leave `mesh` None then).
    worker_buffer_size: batches each worker prepares ahead.

  Returns:
    A `TrainIterator` of Batches (CONTRACTS.md) of B examples (global arrays), or
    B / shard count (numpy, `mesh` None).

  Raises:
    ValueError: B not divisible by the process or device count, a bad size, a seed out of
      range, or fewer records than processes.
  """
  settings = _settings(min_size, max_size, pad_hw, max_gt)
  shards = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if batch_size <= 0 or batch_size % shards.shard_count:
    raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the "
                     f"process count {shards.shard_count}")
  if mesh is not None:
    parallel.check_batch_size(batch_size, mesh)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32) for the input pipeline, got {seed}")
  if len(source) < shards.shard_count:
    raise ValueError(f"{getattr(source, 'name', 'source')} has {len(source)} records, fewer "
                     f"than the {shards.shard_count} processes reading it")
  if num_workers < 0 or prefetch < 0:
    raise ValueError(f"data.num_workers and data.prefetch must be >= 0, got {num_workers}, "
                     f"{prefetch}")
  if num_workers:
    _use_absl_defaults()
  records = _Records(source)
  sampler = grain.samplers.IndexSampler(
      num_records=len(records), shard_options=shards, shuffle=True, num_epochs=None,
      seed=int(seed))
  loader = grain.DataLoader(
      data_source=records, sampler=sampler,
      operations=[_TrainPrepare(settings, flip), _NotNone(),
                  grain.transforms.Batch(batch_size // shards.shard_count, drop_remainder=True)],
      worker_count=num_workers, worker_buffer_size=worker_buffer_size)
  return TrainIterator(loader, mesh, prefetch)


class EvalIterator:
  """One pass over this process's shard of the eval split, as numpy Batches.

  Attributes:
    counts: per-process counters (see the module docstring) so far.
  """

  def __init__(self, examples: Iterator[dict[str, Any]], local_batch: int, num_batches: int,
               settings: dict[str, Any], name: str):
    self._local_batch = local_batch
    self._num_batches = num_batches
    self._padding = transforms.padding_example(settings["pad_hw"], settings["max_gt"])
    self._name = name
    self.counts = dict.fromkeys(COUNT_NAMES, 0)
    self._batches = self._generate(examples)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> "EvalIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._batches)

  def _stack(self, examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    examples = examples + [self._padding] * (self._local_batch - len(examples))
    return {k: np.stack([e[k] for e in examples]) for k in self._padding}

  def _generate(self, examples: Iterator[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
    pending, done = [], 0
    for example in examples:
      if _SKIPPED_MARKER in example:
        self.counts[SKIPPED] += 1
        continue
      for k, v in _pop_counts(example).items():
        self.counts[k] += v
      pending.append(example)
      if len(pending) == self._local_batch:
        yield self._stack(pending)
        pending, done = [], done + 1
    while done < self._num_batches:
      yield self._stack(pending)
      pending, done = [], done + 1
    if any(self.counts.values()):
      logging.warning("%s eval input: %s", self._name,
                      ", ".join(f"{k}={v}" for k, v in self.counts.items()))


def eval_batches(source, *, batch_size: int, min_size: int, max_size: int,
                 pad_hw: tuple[int, int], max_gt: int, num_workers: int = 0,
                 shard_options: grain.sharding.ShardOptions | None = None) -> EvalIterator:
  """This process's part of the eval split, each record exactly once, as numpy Batches.

  Process p of P reads records [p * N // P, (p + 1) * N // P) in order. Every process yields
  `ceil(ceil(N / P) / (B / P))` batches of B / P examples; slots past the end of its shard
  (and of skipped records) hold `valid=False` padding examples.

  Args:
    source: random-access dataset source; `source[i]` may be None (skipped, counted).
    batch_size: B, the global eval batch over all processes.
    min_size: shorter side after resizing.
    max_size: cap on the longer side.
    pad_hw: (Hp, Wp) canvas.
    max_gt: G ground-truth slots (difficult objects are kept, flagged).
    num_workers: grain worker processes (0: transform in this process).
    shard_options: overrides `ShardByJaxProcess()` (tests simulate processes with it).

  Returns:
    An `EvalIterator` (with `len`) of numpy Batches of B / P examples.

  Raises:
    ValueError: B not a positive multiple of the process count, or a bad size.
  """
  settings = _settings(min_size, max_size, pad_hw, max_gt)
  shards = shard_options or grain.sharding.ShardByJaxProcess()
  count, index = shards.shard_count, shards.shard_index
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"eval.batch_size={batch_size} must be a positive multiple of the "
                     f"process count {count}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  local_batch = batch_size // count
  n = len(source)
  num_batches = math.ceil(math.ceil(n / count) / local_batch)
  indices = grain.MapDataset.range(index * n // count, (index + 1) * n // count)
  examples = indices.map(_EvalRead(source, settings)).to_iter_dataset()
  if num_workers:
    _use_absl_defaults()
    examples = examples.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return EvalIterator(iter(examples), local_batch, num_batches, settings,
                      getattr(source, "name", "source"))
