"""Exact resume: SIGKILL mid-run, truncated latest checkpoint, SIGTERM (preemption)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import test_train

# Each test runs several training subprocesses (about a minute each on 2 busy cores).
pytestmark = pytest.mark.slow

RESUME = {**test_train.TINY, "train.num_steps": 8, "train.checkpoint_every": 4,
          "train.log_every": 1}


def _command(workdir, overrides):
  return [sys.executable, "-m", "frcnn_jax.train", "--config", test_train.SHAPES,
          "--workdir", workdir, *test_train.cli_args(overrides)]


def _env(cache_dir):
  env = test_train.subprocess_env(1)
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def _run(workdir, overrides, env):
  done = subprocess.run(_command(workdir, overrides), env=env, cwd=test_train.ROOT,
                        capture_output=True, text=True, timeout=300)
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


def test_sigkill_resume_and_truncated_checkpoint_are_bitwise_exact(tmp_path, tmp_path_factory):
  env = _env(str(tmp_path_factory.getbasetemp() / "jax_cache"))
  config = test_train.tiny_config(**{k.replace(".", "__"): v for k, v in RESUME.items()})
  straight = str(tmp_path / "straight")
  _run(straight, RESUME, env)
  step, want = test_train.load_params(straight, config)
  assert step == 8

  resumed = str(tmp_path / "resumed")
  process = subprocess.Popen(_command(resumed, RESUME), env=env, cwd=test_train.ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: os.path.isdir(os.path.join(resumed, "checkpoints", "4")), process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.isdir(os.path.join(resumed, "checkpoints", "8"))
  _run(resumed, RESUME, env)
  step, got = test_train.load_params(resumed, config)
  assert step == 8
  _assert_params_equal(got, want)

  state_dir = os.path.join(resumed, "checkpoints", "8", "state")
  files = [os.path.join(root, f) for root, _, names in os.walk(state_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  done = _run(resumed, RESUME, env)
  assert "cannot be restored" in done.stderr and "resumed from checkpoint step 4" in done.stderr
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
