"""Tests of the benchmark: FLOP counting, row planning, and scripts/benchmark.py end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import config_flags
from frcnn_jax import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")

# A tiny detector on 64 x 64 images; the XLA flags only make its compile cheap (this is a test
# of the script's contract, not a measurement).
TINY_ARGS = [
    f"--config={SHAPES}", "--height=64", "--width=64", "--steps=1", "--peak_size=256",
    "--config.model.width=0.0625", "--config.model.fc_dim=16",
    "--config.rpn.pre_nms_top_n_train=32", "--config.rpn.post_nms_top_n_train=16",
    "--config.rpn.pre_nms_top_n_test=32", "--config.rpn.post_nms_top_n_test=8",
    "--config.rpn.batch_size_per_image=16", "--config.roi.batch_size_per_image=8",
    "--config.test.detections_per_image=5", "--config.data.max_gt=4",
]
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _load_script():
  spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


benchmark = _load_script()


def _run(args: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=CHEAP_COMPILE, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_flops_of_a_matmul_are_2mnk():
  m, n, k = 48, 24, 40
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert flops.compiled_flops(compiled) == 2 * m * n * k


def test_flops_of_a_valid_convolution():
  x, w = jnp.ones((2, 10, 12, 8)), jnp.ones((3, 3, 8, 16))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  compiled = jax.jit(conv).lower(x, w).compile()
  assert flops.compiled_flops(compiled) == 2 * (2 * 8 * 10 * 16) * (3 * 3 * 8)


def test_flops_without_arithmetic_is_an_error():
  compiled = jax.jit(lambda x: x).lower(jnp.ones(3)).compile()
  with pytest.raises(ValueError, match="FLOP"):
    flops.compiled_flops(compiled)


def test_matmul_peak_is_flops_over_time():
  peak = flops.matmul_peak(64, jnp.float32, repeats=2, chain=3)
  assert _positive_finite(peak["flops_per_s"]) and _positive_finite(peak["flops_per_cpu_s"])
  np.testing.assert_allclose(peak["flops_per_s"], 2 * 64**3 * 3 / peak["seconds"])
  with pytest.raises(ValueError, match="n, repeats and chain"):
    flops.matmul_peak(0, jnp.float32)


def test_grid_and_sweep_rows():
  config = config_flags.load_config(SHAPES)
  grid = benchmark.make_cases(config, dtypes=["float32", "bfloat16"], sizes=["600x800",
                              "600x1000"], batch=("1", "2"))
  assert len(grid) == 8
  assert (grid[0].dtype, grid[0].height, grid[0].width, grid[0].batch) == (
      "float32", 600, 800, 1)
  default = benchmark.make_cases(config, height=96)
  assert [(c.height, c.width, c.dtype, c.proposals, c.parts) for c in default] == [
      (96, config.data.pad_hw[1], "float32", config.rpn.post_nms_top_n_test,
       ("train", "infer"))]
  sweep = benchmark.make_cases(config, sweep=True, sweep_sizes=("100x200", "200x400"),
                               sweep_proposals=("10", "50"))
  both = ("train", "infer")
  n = config.rpn.post_nms_top_n_test
  assert [(c.group, c.height, c.proposals, c.parts) for c in sweep] == [
      ("sweep_size", 100, n, both), ("sweep_size", 200, n, both),
      ("sweep_proposals", 100, 10, ("infer",)), ("sweep_proposals", 100, 50, ("infer",))]


@pytest.mark.parametrize("kwargs, message", [
    (dict(sizes=["600x"]), "HEIGHTxWIDTH"),
    (dict(sizes=["8x800"]), ">= 16"),
    (dict(sizes=["600x800"], height=600), "either --sizes"),
    (dict(batch=("0",)), "--batch"),
    (dict(dtypes=["float16"]), "--dtype"),
    (dict(parts=["eval"]), "--parts"),
])
def test_bad_flags_name_the_flag(kwargs, message):
  config = config_flags.load_config(SHAPES)
  with pytest.raises(ValueError, match=message):
    benchmark.make_cases(config, **kwargs)


def test_end_to_end_json_contract_and_peer_without_torchvision():
  result = _run([*TINY_ARGS, "--peer"])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  out = json.loads(lines[-1])
  for key in ("train_step_s", "infer_s", "compile_s", "device", "height", "width"):
    assert key in out, key
  assert (out["height"], out["width"], out["batch"]) == (64, 64, 1)
  assert out["device"].startswith("cpu")
  assert len(out["rows"]) == 1 and out["rows"][0]["train_step_s"] == out["train_step_s"]
  for key in ("train_step_s", "infer_s", "compile_s", "train_compile_s", "infer_compile_s",
              "train_images_per_s", "infer_images_per_s", "train_flops_per_image",
              "infer_flops_per_image", "peak_memory_mib", "train_program_mib",
              "peak_flops_per_s"):
    assert _positive_finite(out[key]), (key, out[key])
  for key in ("train_mfu", "infer_mfu", "train_mfu_cpu_time", "infer_mfu_cpu_time"):
    assert 0 < out[key] <= 1, (key, out[key])
  assert out["train_finite"] is True
  assert out["memory_source"] == "process peak RSS"
  assert out["xla_flags"] == CHEAP_COMPILE
  assert _positive_finite(out["matmul_peak"]["float32"]["flops_per_s"])
  assert any(line.startswith("float32") and "64x64" in line for line in lines)
  if importlib.util.find_spec("torchvision") is None:
    assert out["peer"]["available"] is False
    assert "torchvision" in out["peer"]["error"]
    assert any(line.startswith("peer: not measured") and "torchvision" in line
               for line in lines)
  else:  # torchvision is there, but the tiny trunk is not the peer's VGG16
    assert out["peer"]["available"] is False and "not VGG16" in out["peer"]["error"]


def test_mfu_uses_whole_steps_and_the_per_device_batch():
  row = {"device": "cpu:cpu", "batch": 2}
  for part in ("train", "infer"):
    row.update({f"{part}_flops_per_image": 30.0, f"{part}_step_time_s": 4.0,
                f"{part}_cpu_step_time_s": 3.0})
  row["infer_flops_per_image"] = None
  benchmark.add_mfu(row, {"flops_per_s": 50.0, "flops_per_cpu_s": 40.0})
  assert row["train_mfu"] == pytest.approx(60.0 / 4.0 / 50.0)
  assert row["train_mfu_cpu_time"] == pytest.approx(60.0 / 3.0 / 40.0)
  assert row["train_cores_used"] == pytest.approx(0.75)
  assert row["infer_mfu"] is None and row["infer_mfu_cpu_time"] is None
