"""Tests for frcnn_jax/detect.py and frcnn_jax/visualization/drawing.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from frcnn_jax import detect
from frcnn_jax.config import build as builders
from frcnn_jax.detection import detector
from frcnn_jax.visualization import drawing
from tests.evaluation.tiny_run import STEP
from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import

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


def test_list_images_says_what_it_skips(tmp_path, capsys):
  (tmp_path / "a.png").write_bytes(b"x")
  (tmp_path / "notes.txt").write_bytes(b"x")
  for name in ("day1", "day2", "looks_like.png"):
    (tmp_path / name).mkdir()
  paths = detect.list_images([str(tmp_path)])
  assert [p.name for p in paths] == ["a.png"]
  err = capsys.readouterr().err.splitlines()
  assert err == [f"{tmp_path}: skipped 3 subfolders (folders are not searched; give them as "
                 "inputs to include them): day1, day2, looks_like.png",
                 f"{tmp_path}: skipped 1 file without an image suffix "
                 f"({', '.join(detect.IMAGE_SUFFIXES)}): notes.txt"]
  detect.list_images([str(tmp_path / "a.png")])
  assert not capsys.readouterr().err


def test_output_names_tell_the_inputs_apart(tmp_path):
  flat = [tmp_path / "a" / "x.jpg", tmp_path / "a" / "y.png", tmp_path / "b" / "z.png"]
  assert detect.output_names(flat) == ["x", "y", "z"]             # unique stems: as before
  same_stem = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "c" / "x.jpg", tmp_path / "a" / "y.png"]
  assert detect.output_names(same_stem) == ["a/x", "b/c/x", "a/y"]
  one_folder = [tmp_path / "a" / "x.jpg", tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"]
  assert detect.output_names(one_folder) == ["a/x.jpg", "a/x.png", "b/x"]
  twice = [tmp_path / "a" / "x.jpg", tmp_path / "a" / "x.jpg"]
  assert detect.output_names(twice) == ["x", "x"]
  names = detect.output_names(same_stem + one_folder)
  assert len(set(names)) == len({str(p) for p in same_stem + one_folder})


def test_detect_any_size_and_mode(tiny_run, tmp_path):
  rng = np.random.default_rng(0)
  gray = tmp_path / "gray.png"
  Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), "L").save(gray)
  rgba = tmp_path / "rgba.png"
  Image.fromarray(rng.integers(0, 255, (90, 40, 4), dtype=np.uint8), "RGBA").save(rgba)
  names = builders.class_names(tiny_run.config)
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
      factor = drawing.display_factor((h, w))     # small images: enlarged for the labels
      assert factor > 1 and im.size == (w * factor, h * factor) and im.mode == "RGB"


def test_same_stems_get_mirrored_outputs_named_on_stdout(tiny_run, tmp_path, capsys):
  inputs = [tmp_path / "in" / "a" / "x.png", tmp_path / "in" / "b" / "x.png"]
  for k, path in enumerate(inputs):
    path.parent.mkdir(parents=True)
    Image.fromarray(tiny_run.source[k]["image"]).save(path)
  out = tmp_path / "out"
  written = detect.run(tiny_run.config, tiny_run.params, inputs, out,
                       class_names=tuple(tiny_run.source.classes))
  assert written == [out / "a" / "x.json", out / "b" / "x.json"]
  assert all(p.exists() and p.with_suffix(".png").exists() for p in written)
  assert [json.loads(p.read_text())["image"] for p in written] == [str(p) for p in inputs]
  lines = capsys.readouterr().out.splitlines()
  for path, json_path in zip(inputs, written):
    assert any(line.startswith(f"{path} -> {json_path}, x.png: ") for line in lines), lines


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


def _tree(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_never_overlaps_the_inputs(tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  Image.new("RGB", (8, 8)).save(folder / "a.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
  paths = detect.list_images([str(folder)])
  for output in (folder, folder / "out", tmp_path):    # equal, inside, containing
    with pytest.raises(ValueError, match="input folder"):
      detect.check_output(output, [str(folder)], paths)
  single = [tmp_path / "b.png"]
  with pytest.raises(ValueError, match="over an input image"):
    detect.check_output(tmp_path, [str(tmp_path / "b.png")], single)
  detect.check_output(tmp_path / "out", [str(folder)], paths)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "a.json").write_text("{}")
  with pytest.raises(ValueError, match="--overwrite"):
    detect.check_output(tmp_path / "out", [str(folder)], paths)
  detect.check_output(tmp_path / "out", [str(folder)], paths, overwrite=True)


def test_cli_refuses_to_write_over_its_input(tiny_run, tmp_path):
  from tests.evaluation.run_folder import run_folder  # pylint: disable=g-import-not-at-top
  workdir = run_folder(tiny_run, tmp_path)
  folder = tmp_path / "photos"
  folder.mkdir()
  Image.fromarray(tiny_run.source[1]["image"]).save(folder / "x.png")
  before = _tree(folder)
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.detect", "--workdir", str(workdir), "--output",
       str(folder), str(folder)],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
      timeout=300, check=False)
  assert proc.returncode != 0 and "input folder" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert _tree(folder) == before


def test_cli_skips_an_undecodable_image_and_fails_at_the_end(tiny_run, tmp_path):
  from tests.evaluation.run_folder import run_folder  # pylint: disable=g-import-not-at-top
  workdir = run_folder(tiny_run, tmp_path)
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "a_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  Image.fromarray(tiny_run.source[1]["image"]).save(folder / "b_good.png")
  out = tmp_path / "new" / "out"                   # does not exist yet: created
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.detect", "--workdir", str(workdir), "--output",
       str(out), "--config.test.score_threshold=0.2", str(folder)],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
      timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "a_broken.jpg" in proc.stderr and "1 of 2 images could not be read" in proc.stderr
  broken = folder / "a_broken.jpg"
  assert f"skipped {broken}: cannot decode image" in proc.stderr   # the path once
  assert f"{broken}: {broken}" not in proc.stderr
  assert "checkpoint step" in proc.stdout and "2 images" in proc.stdout
  assert "Traceback" not in proc.stderr
  record = json.loads((out / "b_good.json").read_text())
  assert record["step"] == STEP and record["overrides"] == {"test.score_threshold": 0.2}
  assert all(d["score"] >= 0.2 for d in record["detections"])
  assert (out / "b_good.png").exists() and not (out / "a_broken.json").exists()


def test_captions_stay_inside_the_image():
  image = np.zeros((40, 60, 3), np.uint8)
  colour = drawing.class_colour(1)
  out = np.asarray(drawing.draw_boxes(image, np.array([[50, 20, 60, 38.]]), np.array([1]),
                                      np.array([0.87]), ["diningtable"], width=1))
  caption = np.all(out[:20] == colour, axis=-1)   # the caption's background, above the box
  columns = np.flatnonzero(caption.any(axis=0))
  assert columns.size and columns.max() == 59      # reaches the right edge ...
  assert columns.min() < 50                        # ... by starting left of the box
  # At the bottom-right corner, with no room above, the caption stays inside too.
  assert drawing.caption_origin((55, 0, 60, 40), (30, 12), (60, 40)) == (30, 0)
  assert drawing.caption_origin((0, 35, 5, 40), (30, 12), (60, 40)) == (0, 23)
  assert drawing.caption_origin((10, 20, 30, 30), (15, 12), (60, 40)) == (10, 8)


def test_score_colours_legends_and_panels():
  assert drawing.score_colour(0.2, 0.2, 0.9) == (40, 80, 255)
  assert drawing.score_colour(0.9, 0.2, 0.9) == (255, 40, 20)
  assert drawing.score_colour(5.0, 0.2, 0.9) == (255, 40, 20)
  image = np.zeros((50, 80, 3), np.uint8)
  boxes = np.array([[10, 10, 40, 40], [10, 10, 30, 30.]])
  out = np.asarray(drawing.draw_scored_boxes(image, boxes, np.array([0.9, 0.5]), 0.5, 0.9,
                                             width=1))
  assert tuple(out[10, 15]) == drawing.score_colour(0.9, 0.5, 0.9)   # the best one on top
  assert tuple(out[29, 15]) == drawing.score_colour(0.5, 0.5, 0.9)
  picture = Image.fromarray(image)
  entries = [(drawing.class_colour(i), f"class number {i}") for i in range(8)]
  legend = drawing.add_legend(picture, entries, "a title longer than the picture is wide")
  assert legend.width == 80 and legend.height > 50 + 8 * 12    # wrapped into rows
  bar = drawing.add_colour_bar(picture, 0.5, 0.9, "objectness")
  assert bar.width == 80 and bar.height > 50
  assert tuple(np.asarray(bar)[50:].reshape(-1, 3).max(0)) == (255, 255, 255)
  both = drawing.side_by_side([picture, picture], ["left", "right"])
  assert both.width == 2 * 80 + 8 and both.height > 50


def test_detect_portrait_and_landscape_each_on_its_canvas(tiny_run, tmp_path):
  """With several canvases each image goes on the smallest that holds it; same as predict."""
  config = tiny_run.config.copy_and_resolve_references()
  config.data.pad_hw = ()
  config.data.canvases = ((48, 64), (64, 48))
  rng = np.random.default_rng(3)
  paths = []
  for name, hw in (("landscape", (45, 60)), ("portrait", (60, 45))):
    paths.append(tmp_path / f"{name}.png")
    Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(paths[-1])
  names = tuple(tiny_run.source.classes)
  written = detect.run(config, tiny_run.params, paths, tmp_path / "out", class_names=names,
                       threshold=0.0)
  for path, json_path, canvas in zip(paths, written, ((48, 64), (64, 48))):
    image = np.asarray(Image.open(path))
    batch = detect.prepare(image, config)
    assert batch["image"].shape[1:3] == canvas
    out = detector.predict(tiny_run.params, batch, model=tiny_run.model,
                           settings=tiny_run.settings)
    keep = np.asarray(out["valid"][0])
    assert keep.any(), "the tiny model detects something at score >= 0"
    record = json.loads(json_path.read_text())
    np.testing.assert_allclose([d["score"] for d in record["detections"]],
                               np.asarray(out["scores"][0])[keep], atol=1e-5)
