"""The train and eval loaders fed through grain instead of `worker_pool.OrderedPool`.

The comparison of the two loaders (`scripts/bench_input.py --loaders pool,grain`) and of their
guarantees (tests/benchmarking/test_grain_loader.py) runs on it; the project's loaders do not
use it (why: docs/performance.md, "Input pipeline").

Both loaders run the very task objects of the project's loaders on the very plans:
`pipeline.train_loader(...).make_batch` (global batch n -> this process's numpy share and its
counters, over `TrainPlan`) and `eval_loader.eval_batches(...).make_batch`. Only the workers
differ:

  grain.MapDataset.range(start, ...)   batch numbers, from the position to resume at
    .map(make_batch)                   -> (numpy batch, counters)
    .to_iter_dataset(ReadOptions(num_threads=read_threads))
    .mp_prefetch(MultiprocessingOptions(num_workers, per_worker_buffer_size),
                 worker_init_fn=...)

What grain 0.2 does with that (grain/_src/python/dataset/transformations/process_prefetch.py):

* `num_workers=0`: `mp_prefetch` is a no-op and the batches are made in the calling thread
  (`read_threads=0`, the default here: grain's own default is 16 threads and 500 elements
  ahead per process, which would put up to 500 batches in memory).
* W >= 1 workers: W *spawned* processes (`multiprocessing.get_context("spawn")`), worker i
  computing batches start + i, start + i + W, ... (a slice of the MapDataset), each started
  from a thread of the parent (the `InterleaveIterDataset` that reads them round-robin, which
  keeps the order). Every non-empty numpy array of an element travels through its own POSIX
  shared-memory block (`/dev/shm/psm_*`, `shared_memory_array.copy_to_shm`, default
  `min_shm_size=0`), which the parent unlinks once the array is garbage-collected (in a
  background thread).
* The iterator's grain state holds one state per worker, so it does not carry over to another
  worker count; this module keeps its own position instead (`get_state()["batches"]`, the
  number of batches returned, as `pipeline.TrainIterator` does) and resumes by starting the
  range there.
* grain's workers do not die with their parent by themselves, and Ctrl-C raises
  KeyboardInterrupt in them. `worker_init_fn` adds both (`die_with_parent`, `ignore_sigint`):
  "watch" polls the parent's pid from a thread of the worker every `WATCH_SECONDS`; Linux's
  parent-death signal ("pdeathsig") is unsafe here, since it fires when the *thread* that
  started the worker ends, and grain starts workers from threads that end before the iterator
  does (on a `set_state`, for one).

Workers use spawn, so a script that builds a loader with workers needs the usual
`if __name__ == "__main__":` guard.
"""

import ctypes
import functools
import os
import signal
import threading
import time
from typing import Any

try:
  import grain
except ImportError as e:   # grain is the `grain` extra, not a dependency
  raise ImportError(
      "frcnn_jax.benchmarking.grain_loader needs the grain package (pip install grain); the "
      "project's own loaders (frcnn_jax.data.pipeline, eval_loader) do not") from e

from frcnn_jax.data import batching
from frcnn_jax.data import eval_loader
from frcnn_jax.data import pipeline

DIE_WITH_PARENT = ("watch", "pdeathsig", "none")
WATCH_SECONDS = 0.1
_ENDLESS = 1 << 62   # the train range's end: batch numbers never get there
_PR_SET_PDEATHSIG = 1


def _watch_parent(parent_pid: int) -> None:
  """Ends this process as soon as its parent is gone (it is re-parented then)."""
  while os.getppid() == parent_pid:
    time.sleep(WATCH_SECONDS)
  os._exit(0)  # pylint: disable=protected-access


def _init_worker(parent_pid: int, die_with_parent: str, ignore_sigint: bool, index: int,
                 count: int) -> None:
  """grain's `worker_init_fn` (called with the worker's index and the worker count)."""
  del index, count
  if ignore_sigint:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  if die_with_parent == "pdeathsig":
    try:
      ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
      pass
  if die_with_parent != "none" and os.getppid() != parent_pid:
    os._exit(0)  # pylint: disable=protected-access
  if die_with_parent == "watch":
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="frcnn_jax-parent-watch").start()
  batching.use_absl_defaults()


def _dataset(make_batch: Any, start: int, stop: int, num_workers: int, buffer_size: int,
             read_threads: int, die_with_parent: str, ignore_sigint: bool
             ) -> "grain.IterDataset":
  """make_batch(start), ..., make_batch(stop - 1) in order, made by grain (module docstring)."""
  if die_with_parent not in DIE_WITH_PARENT:
    raise ValueError(f"die_with_parent must be one of {DIE_WITH_PARENT}, got "
                     f"{die_with_parent!r}")
  if num_workers < 0 or buffer_size < 1 or read_threads < 0:
    raise ValueError(f"num_workers and read_threads must be >= 0 and the buffer >= 1, got "
                     f"{num_workers}, {read_threads}, {buffer_size}")
  batching.use_absl_defaults()   # grain reads absl flags in the parent as in its workers
  ds = grain.MapDataset.range(start, stop).map(make_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(read_threads, 1)))
  if not num_workers:
    return ds
  return ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size),
      worker_init_fn=functools.partial(_init_worker, os.getpid(), die_with_parent,
                                       ignore_sigint))


class GrainTrainIterator:
  """`pipeline.TrainIterator`'s numpy batches (no mesh, no trainer-side prefetch) from grain.

  Attributes:
    plan: the `TrainPlan`.
    source_canvases: as `TrainIterator.source_canvases`.
    counts: per-process counters over the batches returned.
  """

  def __init__(self, make_batch: Any, plan: pipeline.TrainPlan, *, num_workers: int,
               worker_buffer_size: int = 2, read_threads: int = 0,
               die_with_parent: str = "watch", ignore_sigint: bool = True):
    self.plan = plan
    self.source_canvases = make_batch.source_canvases
    self._make_batch = make_batch
    self._options = {"num_workers": num_workers, "buffer_size": worker_buffer_size,
                     "read_threads": read_threads, "die_with_parent": die_with_parent,
                     "ignore_sigint": ignore_sigint}
    _dataset(make_batch, 0, 1, **self._options)   # checks the options
    self._iterator: Any = None
    self._returned = 0
    self.counts = dict.fromkeys(batching.COUNT_NAMES, 0)

  def __iter__(self) -> "GrainTrainIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    if self._iterator is None:
      self._iterator = iter(_dataset(self._make_batch, self._returned, _ENDLESS,
                                     **self._options))
    batch, counts = next(self._iterator)
    self._returned += 1
    for k, v in counts.items():
      self.counts[k] += v
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position after the last batch returned: {"batches", "epoch", "position", "plan",
    "counts"} (the fields of `TrainIterator.get_state()` but its version)."""
    epoch, position = divmod(self._returned, self.plan.batches_per_epoch)
    return {"batches": self._returned, "epoch": epoch, "position": position,
            "plan": self.plan.fingerprint(), "counts": dict(self.counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` of this class or of `TrainIterator` on the same plan,
    with any worker count.

    Raises:
      ValueError: the state is from another plan (naming what differs).
    """
    mine = self.plan.fingerprint()
    differs = [f"{k}: saved {state['plan'].get(k)!r}, now {v!r}"
               for k, v in mine.items() if state["plan"].get(k) != v]
    if differs:
      raise ValueError("the saved data iterator position belongs to another batch plan: " +
                       "; ".join(differs))
    self.close()
    self._returned = int(state["batches"])
    self.counts = {k: int(state.get("counts", {}).get(k, 0)) for k in batching.COUNT_NAMES}

  def close(self) -> None:
    """Stops grain's workers; a later `next()` starts them again at the position."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def grain_train_loader(source, *, num_workers: int = 0, worker_buffer_size: int = 2,
                       read_threads: int = 0, die_with_parent: str = "watch",
                       ignore_sigint: bool = True, **train_loader_args) -> GrainTrainIterator:
  """`pipeline.train_loader`'s plan and task, run by grain.

  Args:
    source: the dataset source.
    num_workers: grain's worker processes (0: batches made in the calling thread).
    worker_buffer_size: grain's `per_worker_buffer_size`.
    read_threads: threads per process computing batches (grain's `ReadOptions.num_threads`).
    die_with_parent: "watch" (poll the parent's pid), "pdeathsig" (Linux's parent-death
      signal, which fires when the thread that started the worker ends) or "none" (grain
      as it is).
    ignore_sigint: workers ignore Ctrl-C (grain's do not).
    **train_loader_args: `pipeline.train_loader`'s other arguments but `prefetch` and `mesh`
      (batch_size, seed, sizes, canvases or pad_hw, flip, shard_options, resize_on_device).

  Returns:
    A `GrainTrainIterator` of this process's numpy batches.
  """
  reference = pipeline.train_loader(source, num_workers=0, prefetch=0, mesh=None,
                                    **train_loader_args)
  return GrainTrainIterator(reference.make_batch, reference.plan, num_workers=num_workers,
                            worker_buffer_size=worker_buffer_size, read_threads=read_threads,
                            die_with_parent=die_with_parent, ignore_sigint=ignore_sigint)


class GrainEvalIterator:
  """`eval_loader.EvalIterator`'s batches from grain: one pass, with `len`.

  Attributes:
    canvases, source_canvases, batch_canvases: as `EvalIterator`'s.
    counts: per-process counters so far.
  """

  def __init__(self, reference: eval_loader.EvalIterator, *, num_workers: int,
               worker_buffer_size: int = 2, read_threads: int = 0,
               die_with_parent: str = "watch", ignore_sigint: bool = True):
    self.canvases = reference.canvases
    self.source_canvases = reference.source_canvases
    self.batch_canvases = reference.batch_canvases
    self.counts = dict(reference.counts)
    self._iterator = iter(_dataset(
        reference.make_batch, 0, len(reference), min(num_workers, len(reference)),
        worker_buffer_size, read_threads, die_with_parent, ignore_sigint))
    self._done = 0

  def __len__(self) -> int:
    return len(self.batch_canvases)

  def __iter__(self) -> "GrainEvalIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    if self._done == len(self):
      self.close()
      raise StopIteration
    batch, counts = next(self._iterator)
    self._done += 1
    for k, v in counts.items():
      self.counts[k] += v
    return batch

  def close(self) -> None:
    """Stops grain's workers."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def grain_eval_batches(source, *, num_workers: int = 0, worker_buffer_size: int = 2,
                       read_threads: int = 0, die_with_parent: str = "watch",
                       ignore_sigint: bool = True, **eval_args) -> GrainEvalIterator:
  """`eval_loader.eval_batches`'s batches and task, run by grain (arguments as
  `grain_train_loader`; `eval_args`: batch_size, sizes, canvases or pad_hw, shard_options,
  resize_on_device)."""
  reference = eval_loader.eval_batches(source, num_workers=0, **eval_args)
  return GrainEvalIterator(reference, num_workers=num_workers,
                           worker_buffer_size=worker_buffer_size, read_threads=read_threads,
                           die_with_parent=die_with_parent, ignore_sigint=ignore_sigint)
