"""Exact resume: SIGKILL mid-run, truncated latest checkpoint, SIGTERM (preemption)."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from frcnn_jax.data.sources import base
from tests import mixed_shapes
from tests import test_train

# Each test runs several training subprocesses (about a minute each on 2 busy cores).
pytestmark = pytest.mark.slow

RESUME = {**test_train.TINY, "train.num_steps": 8, "train.checkpoint_every": 4,
          "train.log_every": 1}
# Two canvases: tests.mixed_shapes' 48x64 landscape and 64x48 portrait images, canvases
# chosen automatically (multiples of 16).
CANVASES = {**RESUME, "data.pad_hw": (), "data.canvas_multiple": 16, "data.min_size": 48,
            "data.max_size": 64, "data.name": "mixed_shapes", "data.mixed_shapes.num_train": 12,
            "data.mixed_shapes.num_test": 5}


def _command(workdir, overrides, module="frcnn_jax.train"):
  return [sys.executable, "-m", module, "--config", test_train.SHAPES,
          "--workdir", workdir, *test_train.cli_args(overrides)]


def _env(cache_dir):
  env = test_train.subprocess_env(1)
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def _run(workdir, overrides, env, module="frcnn_jax.train"):
  done = subprocess.run(_command(workdir, overrides, module), env=env, cwd=test_train.ROOT,
                        capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return done


def _wait_for(predicate, process, timeout=240):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert process.poll() is None, "the run ended before the expected point"
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def _assert_params_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _traced_canvases(log, function):
  """Canvases (h, w) of the programs `function` was traced and compiled for, per the log."""
  traces = log.count(f"Finished tracing {function} for jit")
  shapes = re.findall(
      rf"Compiling jit\({function}\) with global shapes.*?uint8\[\d+,(\d+),(\d+),3\]", log)
  return traces, sorted((int(h), int(w)) for h, w in shapes)


@pytest.fixture
def mixed_registered():
  """`data.name=mixed_shapes` here too, as `python -m tests.mixed_shapes` registers it."""
  base.SOURCES.register("mixed_shapes")(mixed_shapes.MixedShapesSettings)
  yield
  base.SOURCES.unregister("mixed_shapes")


def test_sigkill_resume_and_truncated_checkpoint_are_bitwise_exact(tmp_path, mixed_registered):
  """Two canvases; also: each program traced once per canvas, a resume compiles nothing."""
  del mixed_registered
  cache = tmp_path / "jax_cache"
  env = {**_env(str(cache)), "JAX_LOG_COMPILES": "1"}
  module = "tests.mixed_shapes"
  config = test_train.tiny_config(**{k.replace(".", "__"): v for k, v in CANVASES.items()})
  straight = str(tmp_path / "straight")
  log = _run(straight, CANVASES, env, module).stderr
  both = [(48, 64), (64, 48)]
  assert _traced_canvases(log, "step_fn") == (2, both)   # train step: once per canvas
  assert _traced_canvases(log, "step") == (2, both)      # predict: once per canvas
  step, want = test_train.load_params(straight, config)
  assert step == 8
  compiled = set(os.listdir(cache))

  resumed = str(tmp_path / "resumed")
  process = subprocess.Popen(_command(resumed, CANVASES, module), env=env,
                             cwd=test_train.ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  _wait_for(lambda: os.path.isdir(os.path.join(resumed, "checkpoints", "4")), process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.isdir(os.path.join(resumed, "checkpoints", "8"))
  log = _run(resumed, CANVASES, env, module).stderr
  assert "resumed from checkpoint step 4" in log
  step, got = test_train.load_params(resumed, config)
  assert step == 8
  _assert_params_equal(got, want)
  assert set(os.listdir(cache)) == compiled   # every program came from the cache

  state_dir = os.path.join(resumed, "checkpoints", "8", "state")
  files = [os.path.join(root, f) for root, _, names in os.walk(state_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  log = _run(resumed, CANVASES, env, module).stderr
  assert "cannot be restored" in log and "resumed from checkpoint step 4" in log
  step, got = test_train.load_params(resumed, config)
  assert step == 8
  _assert_params_equal(got, want)


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path, tmp_path_factory):
  env = _env(str(tmp_path_factory.getbasetemp() / "jax_cache"))
  overrides = {**RESUME, "train.num_steps": 10000, "train.checkpoint_every": 10000}
  workdir = str(tmp_path / "run")
  process = subprocess.Popen(_command(workdir, overrides), env=env, cwd=test_train.ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  while True:
    line = process.stdout.readline()
    assert line, "".join(lines[-50:])
    lines.append(line)
    if line.startswith("step 3/"):
      break
  process.send_signal(signal.SIGTERM)
  out = "".join(lines) + process.communicate(timeout=120)[0]
  assert process.returncode == 0, out[-3000:]
  assert "preempted at step" in out
  config = test_train.tiny_config(**{k.replace(".", "__"): v for k, v in overrides.items()})
  step, params = test_train.load_params(workdir, config)
  assert 3 <= step < 10000
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
