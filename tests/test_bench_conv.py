"""scripts/bench_conv.py end to end at a tiny size: every part runs and prints its table."""

import os
import subprocess
import sys

from tests import test_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_conv_runs_every_part():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=test_benchmark.CHEAP_COMPILE)
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_conv.py"),
       f"--config={test_benchmark.SHAPES}", "--height=64", "--width=96", "--repeats=1",
       "--steps=1", "--parts=layers,pool,train,train_pool", *test_benchmark.TINY_MODEL_ARGS],
      capture_output=True, text=True, env=env, timeout=600, check=True).stdout
  assert "conv5_1-3, rpn" in out and "pool4" in out
  assert "ratio xla / per_tap" in out and "ratio lax / pool" in out
