"""Evaluation batches: each record of the eval split exactly once, grouped by canvas.

Evaluation (`eval_batches`): each record exactly once, grouped by canvas (canvas 0's records
in index order, then canvas 1's, ...), each group cut into global batches of B, the last one
padded with `valid=False` examples; process p reads slots [p B / P, (p + 1) B / P) of each,
so every process yields the same number of batches on the same canvases.

Records are transformed as in training without the flip (frcnn_jax/data/pipeline.py), in
`num_workers` worker processes.
"""

import logging
from typing import Any
from typing import Sequence

import numpy as np

from frcnn_jax.data import batching
from frcnn_jax.data import transforms
from frcnn_jax.data import worker_pool


class _EvalBatch:
  """Task n -> this process's slice of eval batch n and its counters (runs in workers)."""

  def __init__(self, source, batches: list[tuple[int, np.ndarray]],
               canvases: tuple[tuple[int, int], ...], settings: dict[str, Any],
               shard_index: int, local_batch: int,
               source_canvases: tuple[tuple[int, int], ...] | None):
    self._source = source
    self.source_canvases = source_canvases
    self._batches = batches
    self._canvases = canvases
    self._settings = settings
    self._first = shard_index * local_batch
    self._local = local_batch

  def __call__(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    k, records = self._batches[n]
    canvas = self._canvases[k]
    source_canvas = None if self.source_canvases is None else self.source_canvases[k]
    counts = dict.fromkeys(batching.COUNT_NAMES, 0)
    examples = []
    for i in records[self._first:self._first + self._local]:
      example = self._source[int(i)]
      if example is None:
        counts[batching.SKIPPED] += 1
        continue
      fields, c = transforms.prepare(example, training=False, pad_hw=canvas,
                                     source_canvas=source_canvas, **self._settings)
      for name, v in c.items():
        counts[name] += v
      examples.append(fields)
    padding = transforms.padding_example(canvas, self._settings["max_gt"], source_canvas)
    return batching.stack(examples + [padding] * (self._local - len(examples))), counts


class EvalIterator:
  """One pass over the eval split, this process's slices of the eval Batches (numpy).

  Attributes:
    canvases: the K canvases (h, w).
    source_canvases: the K source canvases when the device resizes, else None.
    batch_canvases: canvas index of each batch, in order.
    counts: per-process counters (see the module docstring) so far.
  """

  def __init__(self, make_batch: _EvalBatch, batch_canvases: list[int],
               canvases: tuple[tuple[int, int], ...], num_workers: int, name: str,
               skipped_up_front: int):
    self.canvases = canvases
    self.source_canvases = make_batch.source_canvases
    self.batch_canvases = batch_canvases
    self._make_batch = make_batch
    self._num_workers = num_workers
    self._name = name
    self._pool: worker_pool.OrderedPool | None = None
    self._done = 0
    self.counts = dict.fromkeys(batching.COUNT_NAMES, 0)
    self.counts[batching.SKIPPED] = skipped_up_front

  def __len__(self) -> int:
    return len(self.batch_canvases)

  @property
  def make_batch(self) -> _EvalBatch:
    """The picklable task the workers run: n -> (this process's slice of eval batch n, its
    counters), for n < len(self); another loader may run it
    (frcnn_jax/benchmarking/grain_loader.py)."""
    return self._make_batch

  def __iter__(self) -> "EvalIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done == len(self.batch_canvases):
      self.close()
      if any(self.counts.values()):
        logging.warning("%s eval input: %s", self._name,
                        ", ".join(f"{k}={v}" for k, v in self.counts.items()))
      raise StopIteration
    if self._pool is None:
      self._pool = worker_pool.OrderedPool(
          self._make_batch, min(self._num_workers, len(self.batch_canvases)),
          start=self._done, init=batching.use_absl_defaults if self._num_workers else None)
    batch, counts = next(self._pool)
    self._done += 1
    for k, v in counts.items():
      self.counts[k] += v
    return batch

  def close(self) -> None:
    """Stops the worker processes."""
    if self._pool is not None:
      self._pool.close()
      self._pool = None


def eval_batches(source, *, batch_size: int, min_size: int, max_size: int, max_gt: int,
                 canvases: Sequence[Sequence[int]] | None = None,
                 pad_hw: Sequence[int] | None = None, num_workers: int = 0,
                 shard_options=None, resize_on_device: bool = False) -> EvalIterator:
  """The eval split, each record exactly once, grouped by canvas, as numpy Batches.

  Every process yields the same batches' canvases: for each canvas in turn, its records in
  index order cut into global batches of B (the last padded with `valid=False` examples);
  process p takes slots [p B / P, (p + 1) B / P) of each.

  Args:
    source: random-access dataset source; `source[i]` may be None (skipped, counted).
    batch_size: B, the global eval batch over all processes.
    min_size: shorter side after resizing.
    max_size: cap on the longer side.
    max_gt: G ground-truth slots (difficult objects are kept, flagged).
    canvases: the K canvases (h, w).
    pad_hw: one canvas (the same as `canvases=(pad_hw,)`); give canvases or pad_hw.
    num_workers: worker processes (0: transform in this process).
    shard_options: a `batching.Shard` standing in for the JAX process (tests).
    resize_on_device: ship decoded images for the device to resize (as `train_loader`).

  Returns:
    An `EvalIterator` (with `len`) of numpy Batches of B / P examples.

  Raises:
    ValueError: B not a positive multiple of the process count, or a bad size.
  """
  settings = batching.transform_settings(min_size, max_size, max_gt)
  canvases = batching.resolve_canvases(canvases, pad_hw)
  index, count = batching.shards(shard_options)
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"eval.batch_size={batch_size} must be a positive multiple of the "
                     f"process count {count}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  canvas_of, sources = batching.record_canvases(source, canvases, min_size=min_size, max_size=max_size,
                                       resize_on_device=resize_on_device)
  batches = []
  for k in range(len(canvases)):
    group = np.flatnonzero(canvas_of == k)
    batches += [(k, group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
  skipped = int((canvas_of < 0).sum()) if index == 0 else 0
  make_batch = _EvalBatch(source, batches, canvases, settings, index, batch_size // count,
                          sources)
  return EvalIterator(make_batch, [k for k, _ in batches], canvases, num_workers,
                      getattr(source, "name", "source"), skipped)
