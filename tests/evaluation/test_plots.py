"""Tests for frcnn_jax/evaluation/plots.py."""

import numpy as np
from PIL import Image

from frcnn_jax.evaluation import plots
from frcnn_jax.evaluation import voc


def test_one_png_per_class(tmp_path):
  dets = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30.]]), "scores": np.array([.9, .8]),
           "labels": np.array([1, 1])}]
  gts = [{"boxes": np.array([[0, 0, 10, 10.]]), "labels": np.array([1]),
          "difficult": np.array([False])}]
  result = voc.evaluate(dets, gts, 3)
  paths = plots.plot_pr_curves(tmp_path, result, ["cat", "dog/wolf", "cow"])
  assert [p.name for p in paths] == ["001_cat.png", "002_dog_wolf.png", "003_cow.png"]
  for p in paths:
    with Image.open(p) as im:
      assert im.format == "PNG" and im.size == (400, 400)
