"""frcnn_jax.data.worker_pool: ordered results, errors, dead workers, clean shutdown."""

import fcntl
import os
import signal

import numpy as np
import pytest

from frcnn_jax.data import worker_pool


def _batch(n: int) -> dict:
  """A 2 MB result, larger than any pipe buffer, so that workers block sending it."""
  return {"task": n, "pixels": np.full((2, 384, 512, 3), n % 256, np.uint8)}


def _fail_on_three(n: int) -> int:
  if n == 3:
    raise KeyError("three")
  return n


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_results_come_in_task_order_from_start(workers):
  pool = worker_pool.OrderedPool(_batch, workers, start=5, buffer=2)
  try:
    for n in range(5, 12):
      out = next(pool)
      assert out["task"] == n and (out["pixels"] == n % 256).all()
  finally:
    pool.close()


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ"), reason="Linux pipe sizes only")
def test_result_pipes_are_widened_to_one_mebibyte():
  pool = worker_pool.OrderedPool(_batch, 2)
  try:
    sizes = [fcntl.fcntl(r.fileno(), fcntl.F_GETPIPE_SZ)
             for r in pool._results]   # pylint: disable=protected-access
    assert sizes == [1 << 20] * 2
  finally:
    pool.close()


def test_close_with_results_pending_lets_the_workers_exit_by_themselves():
  pool = worker_pool.OrderedPool(_batch, 2, buffer=3)
  next(pool)
  workers = list(pool._workers)   # pylint: disable=protected-access
  pool.close()
  assert [w.exitcode for w in workers] == [0, 0]   # not killed: they saw the closed pipe
  with pytest.raises(ValueError, match="closed"):
    next(pool)


def test_an_exception_in_a_worker_is_raised_with_its_traceback():
  pool = worker_pool.OrderedPool(_fail_on_three, 2)
  try:
    assert [next(pool) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(worker_pool.WorkerError, match=r"(?s)task 3: KeyError: 'three'.*"
                                                      r"Traceback"):
      next(pool)
  finally:
    pool.close()


def test_a_killed_worker_is_named():
  pool = worker_pool.OrderedPool(_batch, 1, buffer=1)
  try:
    next(pool)
    os.kill(pool.pids[0], signal.SIGKILL)
    with pytest.raises(worker_pool.WorkerError, match=r"died \(exit code -9\)"):
      for _ in range(4):   # a result sent before the kill may still arrive
        next(pool)
  finally:
    pool.close()
