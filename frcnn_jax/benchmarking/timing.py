"""Wall and process-CPU timing with warm-up and compilation kept apart from the timed runs.

Every timed call is waited for (`jax.block_until_ready` on its result), so asynchronous
dispatch never hides device time. Process-CPU seconds count every thread of this process: on
a machine shared with other processes their ratio to the wall seconds says how many cores a
run got, and CPU-time figures do not move with the machine's other load.
"""

import os
import statistics
import time
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any

import jax


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
  """Lowers and compiles a jitted function for `args`.

  Args:
    jitted: a `jax.jit` result.
    *args: its arguments (arrays or abstract values).

  Returns:
    (the `jax.stages.Compiled` program, wall seconds of lowering plus compiling).
  """
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def timed_runs(fn: Callable[[], Any], steps: int) -> tuple[list[float], list[float]]:
  """Times `steps` calls of `fn` after one untimed warm-up call.

  Returns:
    (wall seconds [steps], process-CPU seconds [steps]), each call until its result is ready.
  """
  jax.block_until_ready(fn())
  walls, cpus = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - cpu_start)
  return walls, cpus


def median_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
  """Median wall seconds of `repeats` calls of `fn` after one warm-up call."""
  return statistics.median(timed_runs(fn, repeats)[0])


def median_ms(fn: Callable[..., Any], *args: Any, repeats: int, warmup: int = 2) -> float:
  """Median wall milliseconds of `fn(*args)` after `warmup` untimed calls.

  JAX results are waited for; other values (e.g. torch tensors, ready when returned) pass
  through `jax.block_until_ready` unchanged.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def interleaved_runs(items: Sequence[tuple[Hashable, Callable[[], Any]]], rounds: int
                     ) -> dict[Hashable, tuple[list[float], list[float]]]:
  """Times several functions in interleaved rounds.

  Every function is called once untimed (warm-up), then `rounds` rounds call each once in the
  given order, so that a change in the machine's load hits every item alike. The functions
  must wait for their own results (this one does not).

  Args:
    items: (key, fn) pairs; keys must be distinct.
    rounds: timed rounds.

  Returns:
    {key: (wall seconds [rounds], process-CPU seconds [rounds])}.
  """
  for _, fn in items:
    fn()
  out = {key: ([], []) for key, _ in items}
  for _ in range(rounds):
    for key, fn in items:
      start, cpu_start = time.perf_counter(), time.process_time()
      fn()
      out[key][0].append(time.perf_counter() - start)
      out[key][1].append(time.process_time() - cpu_start)
  return out


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
  """Median wall seconds of each function over interleaved rounds (`interleaved_runs`), each
  call waited for (`jax.block_until_ready` on its result)."""
  runs = interleaved_runs(
      [(name, lambda fn=fn: jax.block_until_ready(fn())) for name, fn in fns.items()], rounds)
  return {name: statistics.median(wall) for name, (wall, _) in runs.items()}


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages, rounded to 0.01."""
  return [round(v, 2) for v in os.getloadavg()]
