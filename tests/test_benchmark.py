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

from frcnn_jax import flops
from frcnn_jax.config import flags as config_flags
from frcnn_jax.ops import images as image_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")

# A tiny detector on 64 x 64 images; the XLA flags only make its compile cheap (this is a test
# of the script's contract, not a measurement).
TINY_MODEL_ARGS = [
    "--config.model.width=0.0625", "--config.model.fc_dim=16",
    "--config.rpn.pre_nms_top_n_train=32", "--config.rpn.post_nms_top_n_train=16",
    "--config.rpn.pre_nms_top_n_test=32", "--config.rpn.post_nms_top_n_test=8",
    "--config.rpn.batch_size_per_image=16", "--config.roi.batch_size_per_image=8",
    "--config.test.detections_per_image=5", "--config.data.max_gt=4",
]
TINY_ARGS = [f"--config={SHAPES}", "--height=64", "--width=64", "--steps=1", "--peak_size=256",
             *TINY_MODEL_ARGS]
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


# The dataset-shaped mode (--mix). A hand-computed mix: data.min_size 64, max_size 96 resize
# 100x150 -> 64x96 (x3), 150x100 -> 96x64 (x1), 120x120 -> 64x64 (x2): 6 images, content
# 3*6144 + 6144 + 2*4096 = 32768 pixels.
MIX = "100x150:3,150x100:1,120x120:2"
MIX_CONTENT = 3 * 64 * 96 + 96 * 64 + 2 * 64 * 64


def _mix_config():
  config = config_flags.load_config(SHAPES)
  config.data.min_size, config.data.max_size = 64, 96
  return config


def test_parse_mix_list_and_bad_entries():
  hw, counts = benchmark.parse_mix_list("375x500:3, 500x375")
  np.testing.assert_array_equal(hw, [[375, 500], [500, 375]])
  np.testing.assert_array_equal(counts, [3, 1])
  for text, message in (("600x", "HEIGHTxWIDTH"), ("600x800:two", "integer"),
                        ("600x800:0", ">= 1")):
    with pytest.raises(ValueError, match=message):
      benchmark.parse_mix_list(text)


def test_voc07_table_is_voc2007_test():
  hw, counts = benchmark.read_size_table(benchmark.VOC07_SIZES)
  assert counts.sum() == 4952 and len(hw) == len(np.unique(hw, axis=0)) == 514
  assert hw.max() == 500   # VOC images are at most 500 px on a side
  assert tuple(hw[0]) == (375, 500) and counts[0] == 2090   # 500x375 landscape first
  sizes, merged = benchmark.resized_mix(hw, counts, 600, 1000)
  assert merged.sum() == 4952 and (np.diff(merged) <= 0).all()
  assert tuple(sizes[0]) == (600, 800) and tuple(sizes[2]) == (800, 600)
  assert sizes.min(axis=1).max() <= 600 and sizes.max() <= 1000


def test_mix_layouts_hand_computed():
  plan = benchmark.plan_mix(_mix_config(), MIX, [1, 2], (96, 96), 32)
  np.testing.assert_array_equal(plan.sizes, [[64, 96], [64, 64], [96, 64]])
  np.testing.assert_array_equal(plan.counts, [3, 2, 1])
  single, k1, k2 = plan.layouts
  assert (single.name, single.canvases, single.shares) == ("single 96x96", ((96, 96),), (1.0,))
  assert single.useful == pytest.approx(MIX_CONTENT / (6 * 96 * 96))
  assert k1.canvases == ((96, 96),) and k1.useful == single.useful
  # Two canvases: 64x96 holds the landscape and the square images (5 of 6; the square one
  # ties in area and takes the first), 96x64 the portrait one.
  assert k2.canvases == ((64, 96), (96, 64))
  assert k2.shares == pytest.approx((5 / 6, 1 / 6))
  assert k2.useful == pytest.approx(MIX_CONTENT / (6 * 64 * 96))
  assert benchmark.canvas_contents(plan.layouts, plan.sizes, plan.counts) == {
      (96, 96): (64, 96), (64, 96): (64, 96), (96, 64): (96, 64)}
  assert benchmark.exact_flop_sizes(plan.sizes, plan.counts, 1) == [(64, 96), (64, 64)]
  with pytest.raises(ValueError, match="--mix_single 64x96: no canvas holds .*96x64"):
    benchmark.plan_mix(_mix_config(), MIX, [1], (64, 96), 32)
  with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
    benchmark.plan_mix(_mix_config(), "100x", [1], (96, 96), 32)


def test_mix_from_a_voc_folder(tmp_path):
  from tests.data import conftest as data  # pylint: disable=g-import-not-at-top
  sizes = {"a": (48, 64), "b": (48, 64), "c": (64, 48)}
  records = {name: {"objects": [("dog", 2, 2, 20, 20, 0, 0)], "size": (w, h),
                    "image": data.encode(data.pixels(name, (h, w)))}
             for name, (h, w) in sizes.items()}
  data.write_voc_year(tmp_path / "VOCdevkit", "2007", records, {"trainval": list(records)})
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py"))
  config.data.name, config.data.data_dir = "voc_folder", str(tmp_path)
  hw, counts, description = benchmark.mix_sizes("train", config)
  np.testing.assert_array_equal(hw, [[48, 64], [64, 48]])
  np.testing.assert_array_equal(counts, [2, 1])
  assert "voc_folder train" in description and "3 records" in description


def test_pixel_line_known_exact_others_on_the_line():
  sizes = np.array([[10, 10], [10, 20], [20, 20], [5, 10]])
  values, residual = benchmark.pixel_line({(10, 10): 205.0, (20, 20): 805.0}, sizes)
  np.testing.assert_allclose(values, [205.0, 405.0, 805.0, 105.0])   # 5 + 2 * pixels
  assert residual == pytest.approx(0.0, abs=1e-9)
  values, _ = benchmark.pixel_line({(10, 20): 400.0}, sizes)   # one pixel count: proportional
  np.testing.assert_allclose(values, [200.0, 400.0, 800.0, 100.0])
  assert benchmark.mix_mean(np.array([1.0, 3.0]), np.array([3, 1])) == pytest.approx(1.5)
  assert benchmark.mix_mean(np.array([1.0, 3.0]), np.array([3, 1]),
                            np.array([False, True])) == pytest.approx(3.0)


def test_mix_time_speedups_and_targets_hand_computed():
  plan = benchmark.plan_mix(_mix_config(), MIX, [1, 2], (96, 96), 32)
  train = {(96, 96): 6.0, (64, 96): 3.0, (96, 64): 4.0}
  infer = {(96, 96): 2.0, (64, 96): 1.0, (96, 64): 1.5}
  single, k1, k2 = plan.layouts
  assert benchmark.layout_per_image(single, train) == 6.0
  assert benchmark.layout_per_image(k2, train) == pytest.approx(5 / 6 * 3.0 + 1 / 6 * 4.0)
  rows = [{"layout": l.name, "canvases": l.canvases, "useful_pixels": l.useful,
           "train_s_per_image": benchmark.layout_per_image(l, train),
           "infer_s_per_image": benchmark.layout_per_image(l, infer)} for l in plan.layouts]
  for row in rows:
    row["train_vs_single"] = row["train_s_per_image"] / 6.0
  # torchvision timed at 64x96 and 64x64 only; 96x64 (6144 pixels) lies on their line.
  peer = {"sizes": {(64, 96): {"train_s": 7.0, "infer_s": 2.0},
                    (64, 64): {"train_s": 5.0, "infer_s": 1.0}}}
  benchmark._add_peer_mix(peer, rows, plan.layouts, plan.sizes, plan.counts,
                          {"train": train, "infer": infer})
  assert peer["timed_share"] == pytest.approx(5 / 6)
  assert peer["train_s_per_image"] == pytest.approx((3 * 7.0 + 2 * 5.0 + 7.0) / 6)
  assert peer["train_s_per_image_timed_sizes"] == pytest.approx((3 * 7.0 + 2 * 5.0) / 5)
  assert peer["infer_s_per_image"] == pytest.approx((3 * 2.0 + 2 * 1.0 + 2.0) / 6)
  assert rows[2]["train_speedup_vs_peer"] == pytest.approx(
      peer["train_s_per_image"] / (5 / 6 * 3.0 + 1 / 6 * 4.0))
  assert rows[2]["train_speedup_vs_peer_timed_sizes"] == pytest.approx(
      peer["train_s_per_image_timed_sizes"] / 3.0)   # the timed sizes all sit on 64x96
  targets = benchmark.mix_targets(rows, peer)
  assert targets["useful_pixels"] == {"layout": "K=2", "value": pytest.approx(8 / 9),
                                      "target": ">= 0.90", "met": False}
  assert targets["train_vs_single"]["value"] == pytest.approx((5 / 6 * 3 + 4 / 6) / 6)
  assert targets["train_vs_single"]["met"] is True
  assert targets["train_vs_torchvision"]["met"] is True


def test_synthetic_batch_content_is_top_left():
  batch = benchmark.synthetic_batch(2, 64, 96, 4, 3, 20, content_hw=(40, 50))
  assert batch["image"].shape == (2, 64, 96, 3)
  assert not batch["image"][:, 40:].any() and not batch["image"][:, :, 50:].any()
  np.testing.assert_array_equal(batch["image_hw"], [[40, 50], [40, 50]])
  boxes = batch["gt_boxes"][batch["gt_valid"]]
  assert (boxes[:, 2] <= 50).all() and (boxes[:, 3] <= 40).all()
  with pytest.raises(ValueError, match="does not fit"):
    benchmark.synthetic_batch(1, 64, 96, 4, 3, 20, content_hw=(65, 50))


def test_synthetic_batch_for_the_device_resize_fills_the_content():
  batch = benchmark.synthetic_batch(2, 640, 832, 4, 3, 20, content_hw=(600, 800),
                                    resize_on_device=True)
  assert "image" not in batch and batch["source_image"].shape == (2, 384, 512, 3)
  np.testing.assert_array_equal(batch["source_hw"], [[375, 500], [375, 500]])
  np.testing.assert_array_equal(batch["orig_hw"], batch["source_hw"])   # as the pipeline ships
  np.testing.assert_allclose(batch["scale"], 1.6)
  images = np.asarray(image_ops.batch_images(batch))
  assert images.shape == (2, 640, 832, 3)
  assert images[:, :600, :800].any(axis=(1, 2)).all()
  assert not images[:, 600:].any() and not images[:, :, 800:].any()


@pytest.mark.slow
def test_mix_end_to_end_fractions_times_and_useful_flops():
  args = [a for a in TINY_ARGS if not a.startswith(("--height", "--width"))]
  result = _run([*args, "--config.data.min_size=64", "--config.data.max_size=96",
                 f"--mix={MIX}", "--mix_canvases=1,2", "--mix_single=96x96", "--peer"])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  out = json.loads(lines[-1])
  assert out["mode"] == "mix" and out["mix"]["images"] == 6
  single, k1, k2 = out["layouts"]
  assert [r["layout"] for r in out["layouts"]] == ["single 96x96", "K=1", "K=2"]
  assert single["useful_pixels"] == pytest.approx(MIX_CONTENT / (6 * 96 * 96))
  assert k2["useful_pixels"] == pytest.approx(MIX_CONTENT / (6 * 64 * 96))
  assert k2["canvases"] == [[64, 96], [96, 64]]
  assert sorted(out["canvases"]) == ["64x96", "96x64", "96x96"]
  for part in ("train", "infer"):
    canvas_s = {k: v[f"{part}_s"] for k, v in out["canvases"].items()}
    assert all(_positive_finite(s) for s in canvas_s.values())
    assert single[f"{part}_s_per_image"] == pytest.approx(canvas_s["96x96"])
    assert k2[f"{part}_s_per_image"] == pytest.approx(
        5 / 6 * canvas_s["64x96"] + 1 / 6 * canvas_s["96x64"])
    # Every distinct size has an exact XLA count (two are canvases, 64x64 was compiled).
    exact = {k: v[part] for k, v in out["exact_flop_sizes"].items()}
    assert sorted(exact) == ["64x64", "64x96", "96x64"]
    useful = (3 * exact["64x96"] + exact["96x64"] + 2 * exact["64x64"]) / 6
    assert out["useful_flops"][part]["flops_per_image"] == pytest.approx(useful)
    assert exact["64x96"] == out["canvases"]["64x96"][f"{part}_flops_per_image"]
    assert useful < out["canvases"]["96x96"][f"{part}_flops_per_image"]
    peak = out["matmul_peak"]["flops_per_s"]
    for row in out["layouts"]:
      assert row[f"{part}_content_mfu"] == pytest.approx(
          useful / row[f"{part}_s_per_image"] / peak)
  assert out["canvases"]["96x96"]["train_finite"] is True
  assert out["targets"]["useful_pixels"]["layout"] == "K=2"
  assert out["peer"]["available"] is False   # the tiny trunk is not the peer's VGG16
  assert any(line.startswith("K=2") for line in lines)
