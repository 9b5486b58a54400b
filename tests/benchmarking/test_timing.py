"""frcnn_jax.benchmarking.timing: warm-up apart from the timed runs, interleaved rounds."""

import jax
import jax.numpy as jnp

from frcnn_jax.benchmarking import timing


def test_timed_runs_warm_up_once_then_time_each_step():
  calls = []
  walls, cpus = timing.timed_runs(lambda: calls.append(1) or jnp.ones(2), 3)
  assert len(calls) == 4 and len(walls) == len(cpus) == 3
  assert all(w >= 0 for w in walls) and all(c >= 0 for c in cpus)
  assert timing.median_seconds(lambda: jnp.ones(2), 3) >= 0


def test_compile_timed_returns_a_runnable_program():
  compiled, seconds = timing.compile_timed(jax.jit(lambda x: x * 2), jnp.ones(3))
  assert seconds > 0 and float(compiled(jnp.ones(3))[0]) == 2.0


def test_interleaved_runs_warm_up_then_alternate():
  order = []
  runs = timing.interleaved_runs([("a", lambda: order.append("a")),
                                  ("b", lambda: order.append("b"))], rounds=2)
  assert order == ["a", "b", "a", "b", "a", "b"]   # one warm-up round, then two timed
  assert set(runs) == {"a", "b"}
  assert all(len(walls) == len(cpus) == 2 for walls, cpus in runs.values())
  medians = timing.interleaved_medians({"x": lambda: jnp.ones(1)}, 3)
  assert set(medians) == {"x"} and medians["x"] >= 0


def test_median_ms_and_load_average():
  assert timing.median_ms(lambda a: a + 1, jnp.ones(2), repeats=3) >= 0
  assert len(timing.load_average()) == 3
