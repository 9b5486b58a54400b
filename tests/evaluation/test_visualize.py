"""Smoke test for scripts/visualize.py (the debug pictures)."""

import importlib.util
import os

import numpy as np
from PIL import Image

from frcnn_jax import detect
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import
from tests.models.backbones import test_resnet_fpn
from tests.plugins import common

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
  anchors, sizes, cells = visualize.anchors_at(tiny_run.config, tiny_run.model, batch, 20.0,
                                               40.0)
  assert cells.tolist() == [[16.0, 32.0, 32.0, 48.0]]        # stride 16, scale 1
  centres = (anchors[:, :2] + anchors[:, 2:]) / 2
  assert len(anchors) == 9 and abs(centres - [24.0, 40.0]).max() < 1e-4
  assert sizes.tolist() == [0, 1, 2] * 3                     # ratio-major, size-minor


def test_anchors_at_picks_a_cell_on_every_pyramid_level():
  visualize = _load_script()
  config = config_flags.load_config(common.SHAPES, {**common.TINY, **test_resnet_fpn.FPN_RUN})
  model = builders.model_from_config(config, 6)
  batch = detect.prepare(np.zeros((64, 64, 3), np.uint8), config)
  anchors, sizes, cells = visualize.anchors_at(config, model, batch, 20.0, 40.0)
  assert cells.tolist() == [[20, 40, 24, 44], [16, 40, 24, 48], [16, 32, 32, 48],
                            [0, 32, 32, 64], [0, 0, 64, 64]]   # strides 4 .. 64: corners
  assert len(anchors) == 15 and sizes.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  np.testing.assert_array_equal(anchors[4], [8, 32, 24, 48])   # P3's 16-px square on the
                                                               # cell's corner (16, 40)


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
