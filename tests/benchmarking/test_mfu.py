"""frcnn_jax.benchmarking.mfu: the matmul peak, MFU of a row, content MFU."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.benchmarking import mfu


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_matmul_peak_is_flops_over_time():
  peak = mfu.matmul_peak(64, jnp.float32, repeats=2, chain=3)
  assert _positive_finite(peak["flops_per_s"]) and _positive_finite(peak["flops_per_cpu_s"])
  np.testing.assert_allclose(peak["flops_per_s"], 2 * 64**3 * 3 / peak["seconds"])
  assert (peak["n"], peak["chain"]) == (64, 3)
  with pytest.raises(ValueError, match="n, repeats and chain"):
    mfu.matmul_peak(0, jnp.float32)


def test_best_peaks_keep_the_faster_measurement_and_both_figures():
  before = {"float32": {"flops_per_s": 10.0, "flops_per_cpu_s": 4.0, "n": 8}}
  after = {"float32": {"flops_per_s": 12.0, "flops_per_cpu_s": 3.0, "n": 8}}
  peak = mfu.best_peaks(before, after)["float32"]
  assert peak["flops_per_s"] == 12.0 and peak["flops_per_cpu_s"] == 4.0
  assert (peak["before_flops_per_s"], peak["after_flops_per_s"]) == (10.0, 12.0)


def test_mfu_uses_whole_steps_and_the_per_device_batch():
  row = {"device": "cpu:cpu", "batch": 2}
  for part in ("train", "infer"):
    row.update({f"{part}_flops_per_image": 30.0, f"{part}_step_time_s": 4.0,
                f"{part}_cpu_step_time_s": 3.0})
  row["infer_flops_per_image"] = None
  mfu.add_mfu(row, {"flops_per_s": 50.0, "flops_per_cpu_s": 40.0})
  assert row["peak_flops_per_s"] == 50.0
  assert row["train_mfu"] == pytest.approx(60.0 / 4.0 / 50.0)
  assert row["train_mfu_cpu_time"] == pytest.approx(60.0 / 3.0 / 40.0)
  assert row["train_cores_used"] == pytest.approx(0.75)
  assert row["infer_mfu"] is None and row["infer_mfu_cpu_time"] is None


def test_content_hw_is_the_largest_voc_shape_in_the_canvas():
  assert mfu.content_hw(608, 800, 600) == (600, 800)     # 4:3 landscape
  assert mfu.content_hw(800, 608, 600) == (800, 600)     # portrait
  assert mfu.content_hw(608, 928, 600) == (600, 900)     # 3:2
  assert mfu.content_hw(1000, 1000, 600) == (600, 900)   # the old square canvas
  assert mfu.content_hw(64, 64, 600) == (64, 64)         # too small for either aspect
  assert mfu.content_hw(64, 96, 600) == (64, 96)         # 3:2 fits exactly


def test_content_mfu_scales_mfu_by_the_content_fraction():
  row = {"height": 608, "width": 800, "train_mfu": 0.5, "infer_mfu": None}
  mfu.add_content_mfu(row, 600)
  assert row["content_hw"] == [600, 800]
  assert row["content_fraction"] == pytest.approx(600 / 608)
  assert row["train_mfu_content"] == pytest.approx(0.5 * 600 / 608)
  assert row["infer_mfu_content"] is None
