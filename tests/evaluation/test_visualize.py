"""Smoke test for scripts/visualize.py (the debug pictures)."""

import importlib.util
import os

from PIL import Image

from frcnn_jax import detect
from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "visualize.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("visualize_script", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_draws_four_pictures_per_image(tiny_run, tmp_path):
  visualize = _load_script()
  paths = visualize.draw_examples(tiny_run.config, tmp_path, params=tiny_run.params,
                                  num_images=2, anchor_xy=(10.0, 50.0), threshold=0.0)
  kinds = [p.name.rsplit("_", 1)[1] for p in paths]
  assert kinds == ["gt.png", "anchors.png", "proposals.png", "detections.png"] * 2
  sizes = {}
  for p in paths:
    with Image.open(p) as im:
      sizes[p.name.rsplit("_", 1)[1]] = im.size
  # 64x64 images are enlarged 4x; legends go below, the detections beside the ground truth.
  assert sizes["gt.png"] == (256, 256)
  assert sizes["anchors.png"][0] == 256 and sizes["anchors.png"][1] > 256
  assert sizes["proposals.png"][0] == 256 and sizes["proposals.png"][1] > 256
  assert sizes["detections.png"][0] > 2 * 256 and sizes["detections.png"][1] > 256
  no_model = visualize.draw_examples(tiny_run.config, tmp_path / "data_only", num_images=1)
  assert [p.name.rsplit("_", 1)[1] for p in no_model] == ["gt.png", "anchors.png"]


def test_anchors_at_picks_the_cell_under_the_point(tiny_run):
  visualize = _load_script()
  image = tiny_run.source[0]["image"]
  batch = detect.prepare(image, tiny_run.config)
  anchors, cell = visualize.anchors_at(tiny_run.config, tiny_run.model, batch, 20.0, 40.0)
  assert cell.tolist() == [16.0, 32.0, 32.0, 48.0]          # stride 16, scale 1
  centres = (anchors[:, :2] + anchors[:, 2:]) / 2
  assert len(anchors) == 9 and abs(centres - [24.0, 40.0]).max() < 1e-4


def test_cli_reads_the_run_folder(tiny_run, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from tests.evaluation.run_folder import run_folder  # pylint: disable=g-import-not-at-top
  workdir = run_folder(tiny_run, tmp_path)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, _SCRIPT, "--workdir", str(workdir), "--output",
                         str(tmp_path / "new" / "vis"), "--num_images", "1"],
                        capture_output=True, text=True, cwd=repo, timeout=300, check=False,
                        env=dict(os.environ, PYTHONPATH=repo))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(list((tmp_path / "new" / "vis").glob("*.png"))) == 4
  assert "orbax" not in proc.stderr and "Traceback" not in proc.stderr
