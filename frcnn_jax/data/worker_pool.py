"""Ordered map of a function over task numbers in worker processes that die with their parent.

`OrderedPool(fn, num_workers)` computes fn(start), fn(start + 1), ... in `num_workers` spawned
processes (task t goes to worker t mod W) and returns the results in order. Results travel
pickled through one pipe per worker (no shared memory, so nothing can leak in /dev/shm), widened
to 1 MiB where Linux allows (`F_SETPIPE_SZ`: fewer, larger writes; `scripts/bench_input.py`
measures the loader with each worker count). A worker sends from its only thread, so a result
larger than the pipe holds it until the parent reads it: each worker is about one result ahead,
whatever `buffer` queues. Workers

* die with their parent: Linux's parent-death signal (SIGKILL) is armed first thing in each
  worker, and a worker also exits when it finds its parent gone while waiting for a task;
* ignore SIGINT (Ctrl-C reaches the whole process group): the parent decides, and `close()`
  stops them without tracebacks;
* send an exception back instead of printing it; `next()` raises it in the parent, with the
  worker's traceback text.

With `num_workers=0` the tasks run in the calling process.
"""

import ctypes
import fcntl
import multiprocessing
import os
import queue
import signal
import traceback
from typing import Any
from typing import Callable

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 1.0
_PIPE_BYTES = 1 << 20   # the unprivileged limit of Linux's /proc/sys/fs/pipe-max-size default


class WorkerError(RuntimeError):
  """An exception raised by `fn` in a worker process (its traceback in the message)."""


def _die_with_parent(parent_pid: int) -> None:
  """Arms SIGKILL on parent death (Linux); exits at once if the parent is already gone."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  except (OSError, AttributeError):
    pass  # not Linux: the polling in `_worker_main` still notices
  if os.getppid() != parent_pid:
    os._exit(0)  # pylint: disable=protected-access


def _widen(connection: Any) -> None:
  """Makes a pipe hold `_PIPE_BYTES` (Linux); leaves it as it is where that is not allowed."""
  try:
    fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
  except (AttributeError, OSError):
    pass


def _worker_main(fn: Callable[[int], Any], tasks: Any, results: Any, parent_pid: int,
                 init: Callable[[], None] | None) -> None:
  """Worker loop: task number -> ("ok", fn(task)) or ("error", text) sent on the `results`
  connection; None ends it."""
  _die_with_parent(parent_pid)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if init is not None:
    init()
  while True:
    try:
      task = tasks.get(timeout=_POLL_SECONDS)
    except queue.Empty:
      if os.getppid() != parent_pid:
        return
      continue
    except (EOFError, OSError):
      return
    if task is None:
      return
    try:
      result = ("ok", fn(task))
    except Exception as e:  # pylint: disable=broad-except
      result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    try:
      results.send(result)
    except OSError:   # BrokenPipeError: the parent closed the pool
      return


class OrderedPool:
  """fn(start), fn(start + 1), ... computed ahead in worker processes, returned in order."""

  def __init__(self, fn: Callable[[int], Any], num_workers: int, start: int = 0,
               buffer: int = 2, init: Callable[[], None] | None = None):
    """Starts the workers and queues the first tasks.

    Args:
      fn: picklable callable, task number -> picklable result.
      num_workers: worker processes (0: run `fn` in this process).
      start: the first task number.
      buffer: tasks queued ahead per worker (results larger than the pipe wait in the worker:
        see the module docstring).
      init: picklable callable run first in each worker.

    Raises:
      ValueError: negative `num_workers` or `buffer` < 1.
    """
    if num_workers < 0 or buffer < 1:
      raise ValueError(f"num_workers must be >= 0 and buffer >= 1, got {num_workers}, {buffer}")
    self._fn = fn
    self._next = start          # the next task whose result `next()` returns
    self._queued = start        # the next task to hand out
    self._buffer = buffer
    self._workers: list[Any] = []
    self._tasks: list[Any] = []
    self._results: list[Any] = []
    self._closed = False
    if num_workers:
      ctx = multiprocessing.get_context("spawn")
      for _ in range(num_workers):
        tasks = ctx.Queue()
        results, sender = ctx.Pipe(duplex=False)
        _widen(results)
        worker = ctx.Process(target=_worker_main, args=(fn, tasks, sender, os.getpid(), init),
                             daemon=True, name="frcnn_jax-input")
        worker.start()
        sender.close()   # the worker holds it now; EOF here once the worker is gone
        self._workers.append(worker)
        self._tasks.append(tasks)
        self._results.append(results)
      for _ in range(num_workers * buffer):
        self._submit()

  @property
  def pids(self) -> list[int]:
    """Process ids of the workers (empty with num_workers=0 or after `close`)."""
    return [w.pid for w in self._workers]

  def _submit(self) -> None:
    """Hands the next task to worker (task mod W)."""
    self._tasks[self._queued % len(self._workers)].put(self._queued)
    self._queued += 1

  def __iter__(self) -> "OrderedPool":
    return self

  def __next__(self) -> Any:
    if self._closed:
      raise ValueError("the input worker pool is closed")
    task = self._next
    self._next += 1
    if not self._workers:
      return self._fn(task)
    w = task % len(self._workers)
    while True:
      try:
        if self._results[w].poll(_POLL_SECONDS):
          kind, value = self._results[w].recv()
          break
      except EOFError:
        pass
      if not self._workers[w].is_alive():
        self._workers[w].join()
        raise WorkerError(f"input worker process {self._workers[w].pid} died (exit code "
                          f"{self._workers[w].exitcode}) computing task {task}") from None
    self._submit()
    if kind == "error":
      raise WorkerError(f"input worker failed on task {task}: {value}")
    return value

  def close(self) -> None:
    """Stops the workers (idempotent); pending results are discarded."""
    if self._closed:
      return
    self._closed = True
    for connection in self._results:   # a worker blocked sending a result stops at once
      connection.close()
    for tasks in self._tasks:
      try:
        tasks.put(None)
      except (OSError, ValueError):
        pass
    for worker in self._workers:
      worker.join(timeout=2.0)
      if worker.is_alive():
        worker.kill()
        worker.join(timeout=2.0)
    for q in self._tasks:
      q.cancel_join_thread()
      q.close()
    self._workers, self._tasks, self._results = [], [], []

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
