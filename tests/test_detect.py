"""Tests for frcnn_jax/detect.py and frcnn_jax/drawing.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from frcnn_jax import detect
from frcnn_jax import detector
from frcnn_jax import drawing
from tests.evaluation.tiny_run import STEP
from tests.evaluation.tiny_run import tiny_run  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_draw_boxes_outlines_and_captions():
  image = np.zeros((40, 60, 3), np.uint8)
  out = np.asarray(drawing.draw_boxes(image, np.array([[10, 20, 30, 35.]]), np.array([2]),
                                      np.array([0.87]), ["a", "b"], width=1))
  assert out.shape == image.shape
  colour = drawing.class_colour(2)
  # The outline covers pixels x1 .. x2 - 1 of the continuous box; inside stays untouched.
  assert tuple(out[34, 15]) == colour and tuple(out[25, 29]) == colour
  assert tuple(out[25, 20]) == (0, 0, 0)
  assert (out[:20] != 0).any()                      # the caption sits above the box
  gray = drawing.draw_boxes(Image.new("L", (8, 8)), np.zeros((0, 4)))
  assert gray.mode == "RGB" and gray.size == (8, 8)


def test_list_images(tmp_path):
  for name in ("b.png", "a.jpg", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  single = tmp_path / "sub.png"
  single.write_bytes(b"x")
  paths = detect.list_images([str(tmp_path / "a.jpg"), str(tmp_path)])
  assert [p.name for p in paths] == ["a.jpg", "a.jpg", "b.png", "sub.png"]
  with pytest.raises(FileNotFoundError, match="missing.png"):
    detect.list_images([str(tmp_path / "missing.png")])


def test_detect_any_size_and_mode(tiny_run, tmp_path):
  rng = np.random.default_rng(0)
  gray = tmp_path / "gray.png"
  Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), "L").save(gray)
  rgba = tmp_path / "rgba.png"
  Image.fromarray(rng.integers(0, 255, (90, 40, 4), dtype=np.uint8), "RGBA").save(rgba)
  names = detect.class_names_from_config(tiny_run.config)
  assert names == tuple(tiny_run.source.classes)
  written = detect.run(tiny_run.config, tiny_run.params, [gray, rgba], tmp_path / "out",
                       class_names=names, threshold=0.0)
  assert [p.name for p in written] == ["gray.json", "rgba.json"]
  for path, (h, w) in zip(written, ((50, 70), (90, 40))):
    record = json.loads(path.read_text())
    assert (record["height"], record["width"]) == (h, w)
    assert record["detections"], "the tiny model detects something at score >= 0"
    boxes = np.array([d["box"] for d in record["detections"]])
    assert (boxes >= -1e-3).all() and (boxes[:, 2] <= w + 1e-2).all()
    assert (boxes[:, 3] <= h + 1e-2).all()
    assert all(d["class"] == names[d["label"] - 1] for d in record["detections"])
    with Image.open(path.with_suffix(".png")) as im:
      assert im.size == (w, h) and im.mode == "RGB"


def test_detect_json_matches_predict(tiny_run, tmp_path):
  example = tiny_run.source[0]
  path = tmp_path / "shape.png"
  Image.fromarray(example["image"]).save(path)
  names = tuple(tiny_run.source.classes)
  [json_path] = detect.run(tiny_run.config, tiny_run.params, [path], tmp_path, class_names=names)
  out = detector.predict(tiny_run.params, detect.prepare(example["image"], tiny_run.config),
                         model=tiny_run.model, settings=tiny_run.settings)
  keep = np.asarray(out["valid"][0])
  record = json.loads(json_path.read_text())
  h, w = example["image"].shape[:2]
  np.testing.assert_allclose([d["box"] for d in record["detections"]],
                             np.clip(np.asarray(out["boxes"][0])[keep], 0, [w, h, w, h]),
                             atol=0.01)
  np.testing.assert_allclose([d["score"] for d in record["detections"]],
                             np.asarray(out["scores"][0])[keep], atol=1e-5)


def test_cli(tiny_run, tmp_path):
  image = tmp_path / "in" / "x.jpg"
  image.parent.mkdir()
  Image.fromarray(tiny_run.source[1]["image"]).save(image)
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.detect", "--config", str(tiny_run.config_path),
       "--workdir", str(tiny_run.workdir), "--output", str(tmp_path / "out"),
       "--threshold=0.3", str(image.parent)],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"checkpoint step {STEP}" in proc.stdout
  assert (tmp_path / "out" / "x.json").exists() and (tmp_path / "out" / "x.png").exists()
