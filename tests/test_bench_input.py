"""scripts/bench_input.py end to end on a few images: both resize settings, its JSON contract."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_input_measures_both_resize_settings():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_input.py"), "--num_images=4",
       "--repeats=1", "--workers=0,1", "--canvas=416x544"],
      capture_output=True, text=True, env=env, timeout=300, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result["canvas"] == [416, 544] and result["source_canvas"] == [384, 512]
  assert set(result["loader_images_per_s"]) == {"host/0", "host/1", "device/0", "device/1"}
  rates = [*result["per_core_images_per_s"].values(), *result["loader_images_per_s"].values(),
           result["device_resize_images_per_s"]]
  assert all(rate > 0 for rate in rates), result
  assert set(result["cores_to_feed_target"]) == {"host", "device"}


def test_loaders_option_compares_the_pool_and_grain():
  pytest.importorskip("grain")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_input.py"), "--num_images=4",
       "--repeats=1", "--workers=0,1", "--canvas=416x544", "--loaders=pool,grain"],
      capture_output=True, text=True, env=env, timeout=600, check=True).stdout
  lines = out.strip().splitlines()
  result = json.loads(lines[-1])
  keys = {f"{kind}/{mode}/{w}" for kind in ("pool", "grain") for mode in ("host", "device")
          for w in (0, 1)}
  assert set(result["loader_batches_per_s"]) == set(result["first_batch_s"]) == keys
  assert all(rate > 0 for rate in result["loader_batches_per_s"].values()), result
  assert set(result["ratio_to_pool"]) == {k for k in keys if k.startswith("grain/")}
  assert result["loaders"] == ["pool", "grain"] and set(result["versions"]) == {"pool", "grain"}
  assert lines[0].split()[:2] == ["resize_on", "workers"] and len(lines) == 1 + 4 + 1
  assert "per_core_images_per_s" not in result   # only the comparison runs


def test_bad_counts_are_usage_errors():
  for args, message in ((["--num_images=0"], "--num_images must be >= 1"),
                        (["--workers=a,b"], "--workers takes comma-separated counts"),
                        (["--loaders=pool,tf"], "--loaders takes distinct names")):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_input.py"),
                           *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
