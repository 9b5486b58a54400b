"""scripts/benchmark.py as a command: its JSON contract, the peer without torchvision, and
the dataset-shaped mode (--mix) end to end. The library under it: tests/benchmarking/."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.benchmarking import test_size_mix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")

# A tiny detector on 64 x 64 images; the XLA flags only make its compile cheap (this is a test
# of the script's contract, not a measurement).
TINY_DETECTOR_ARGS = [
    "--config.rpn.pre_nms_top_n_train=32", "--config.rpn.post_nms_top_n_train=16",
    "--config.rpn.pre_nms_top_n_test=32", "--config.rpn.post_nms_top_n_test=8",
    "--config.rpn.batch_size_per_image=16", "--config.roi.batch_size_per_image=8",
    "--config.test.detections_per_image=5", "--config.data.max_gt=4",
]
TINY_MODEL_ARGS = ["--config.model.vgg16.width=0.0625", "--config.model.fc.dim=16",
                   *TINY_DETECTOR_ARGS]
# Each backbone's experiment with a narrowed model: --config and its overrides.
TINY_BACKBONES = {
    "vgg16": [f"--config={SHAPES}", *TINY_MODEL_ARGS],
    "zf": [f"--config={os.path.join(ROOT, 'experiments', 'voc_zf.py')}",
           "--config.model.zf.width=0.0625", "--config.model.fc.dim=16", *TINY_DETECTOR_ARGS],
    "resnet_c4": [f"--config={os.path.join(ROOT, 'experiments', 'voc_r101_c4.py')}",
                  "--config.model.resnet_c4.width=0.03125",
                  "--config.model.resnet_c4.blocks=(1,1,1)", "--config.model.res5.width=0.03125",
                  "--config.model.res5.blocks=1", *TINY_DETECTOR_ARGS],
}
TINY_ARGS = [f"--config={SHAPES}", "--height=64", "--width=64", "--steps=1", "--peak_size=256",
             *TINY_MODEL_ARGS]
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MIX = test_size_mix.MIX
MIX_CONTENT = test_size_mix.MIX_CONTENT


def _run(args: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=CHEAP_COMPILE, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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
  else:  # torchvision is there, but the tiny trunk is not torchvision's VGG16
    assert out["peer"]["available"] is False
    assert "model.backbone=vgg16" in out["peer"]["error"]
    assert "model.vgg16.width=0.0625" in out["peer"]["error"]


@pytest.mark.parametrize("args, message", [
    (["--steps=0"], "--steps must be >= 1"),
    (["--sizes=600x"], "HEIGHTxWIDTH"),
    (["--mix=voc07", "--batch=2"], "--mix runs one image per device"),
    (["--mix=voc07", "--dtype=float16"], "--dtype"),
])
def test_bad_flags_are_usage_errors(args, message):
  result = _run([f"--config={SHAPES}", *args])
  assert result.returncode != 0
  assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_mix_end_to_end_fractions_times_and_useful_flops():
  args = [a for a in TINY_ARGS if not a.startswith(("--height", "--width"))]
  result = _run([*args, "--config.data.min_size=64", "--config.data.max_size=96",
                 f"--mix={MIX}", "--mix_canvases=1,2", "--mix_single=96x96", "--peer"])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  out = json.loads(lines[-1])
  assert out["mode"] == "mix" and out["mix"]["images"] == 6
  single, _, k2 = out["layouts"]
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
  assert out["peer"]["available"] is False   # the tiny trunk is not torchvision's VGG16
  assert any(line.startswith("K=2") for line in lines)
