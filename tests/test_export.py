"""Tests for frcnn_jax/export.py: the exported program equals the live model."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from frcnn_jax import detect
from frcnn_jax import detector
from frcnn_jax import evaluate
from frcnn_jax import export
from tests.evaluation.tiny_run import STEP
from tests.evaluation.tiny_run import tiny_run  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loads and runs an export in a fresh interpreter, then lists the frcnn_jax modules it imported.
_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from frcnn_jax import export
    model = export.load(sys.argv[1])
    image = np.load(sys.argv[2])
    out = model.detect(image)
    print(json.dumps({"boxes": out["boxes"].tolist(), "scores": out["scores"].tolist(),
                      "labels": out["labels"].tolist(), "class_names": model.class_names,
                      "modules": sorted(m for m in sys.modules if m.startswith("frcnn_jax"))}))
    """)


@pytest.fixture(scope="module")
def exported_file(tiny_run, tmp_path_factory):
  path = tmp_path_factory.mktemp("export") / "model.bin"
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.export", "--config", str(tiny_run.config_path),
       "--workdir", str(tiny_run.workdir), "--output", str(path)],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"step {STEP}" in proc.stdout
  return path


def test_exported_program_equals_live_model(tiny_run, exported_file):
  loaded = export.load(exported_file)
  assert loaded.meta["step"] == STEP and loaded.meta["batch_size"] == 1
  batch = detect.prepare(tiny_run.source[2]["image"], tiny_run.config)
  got = loaded(batch["image"], batch["image_hw"], batch["scale"])
  want = detector.predict(tiny_run.params, batch, model=tiny_run.model,
                          settings=tiny_run.settings)
  assert got["valid"].any()
  np.testing.assert_array_equal(got["valid"], np.asarray(want["valid"]))
  np.testing.assert_array_equal(got["labels"], np.asarray(want["labels"]))
  np.testing.assert_allclose(got["boxes"], np.asarray(want["boxes"]), atol=1e-4)
  np.testing.assert_allclose(got["scores"], np.asarray(want["scores"]), atol=1e-6)


def test_loader_needs_no_model_code(tiny_run, exported_file, tmp_path):
  image = tiny_run.source[3]["image"]
  np.save(tmp_path / "image.npy", image)
  proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(exported_file),
                         str(tmp_path / "image.npy")],
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                        cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["modules"] == ["frcnn_jax", "frcnn_jax.config_flags", "frcnn_jax.export"]
  assert result["class_names"] == list(tiny_run.source.classes)
  out = detector.predict(tiny_run.params, detect.prepare(image, tiny_run.config),
                         model=tiny_run.model, settings=tiny_run.settings)
  keep = np.asarray(out["valid"][0])
  np.testing.assert_allclose(np.asarray(result["boxes"]).reshape(-1, 4),
                             evaluate.clip_to_image(np.asarray(out["boxes"][0])[keep],
                                                    *image.shape[:2]), atol=1e-4)
  np.testing.assert_allclose(result["scores"], np.asarray(out["scores"][0])[keep], atol=1e-6)


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, meta=np.frombuffer(b'{"format": "x"}', np.uint8))
  with pytest.raises(ValueError, match="not a frcnn_jax.export/1 file"):
    export.load(path)


@pytest.mark.parametrize("hw", [(50, 70), (64, 64), (130, 20), (7, 300)])
def test_loader_resize_equals_the_pipeline(tiny_run, hw):
  image = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
  d = tiny_run.config.data
  canvas, image_hw, scale = export.resize_and_pad(image, min_size=d.min_size,
                                                  max_size=d.max_size, pad_hw=tuple(d.pad_hw))
  want = detect.prepare(image, tiny_run.config)
  np.testing.assert_array_equal(canvas, want["image"][0])
  np.testing.assert_array_equal(image_hw, want["image_hw"][0])
  assert scale == want["scale"][0]
