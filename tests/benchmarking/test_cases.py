"""frcnn_jax.benchmarking.cases: the rows the flags ask for, and synthetic batches."""

import os

import numpy as np
import pytest

from frcnn_jax.benchmarking import cases
from frcnn_jax.config import flags as config_flags
from frcnn_jax.ops import images as image_ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")


def test_grid_and_sweep_rows():
  config = config_flags.load_config(SHAPES)
  grid = cases.make_cases(config, dtypes=["float32", "bfloat16"], sizes=["600x800",
                          "600x1000"], batch=("1", "2"))
  assert len(grid) == 8
  assert (grid[0].dtype, grid[0].height, grid[0].width, grid[0].batch) == (
      "float32", 600, 800, 1)
  default = cases.make_cases(config, height=96)
  assert [(c.height, c.width, c.dtype, c.proposals, c.parts) for c in default] == [
      (96, config.data.pad_hw[1], "float32", config.rpn.post_nms_top_n_test,
       ("train", "infer"))]
  sweep = cases.make_cases(config, sweep=True, sweep_sizes=("100x200", "200x400"),
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
    cases.make_cases(config, **kwargs)


def test_case_config_sets_the_row_and_drops_pretrained_weights():
  config = config_flags.load_config(SHAPES)
  row = cases.Case("bfloat16", 64, 64, 1, 7, cases.PARTS)
  c = cases.case_config(config, row)
  assert (c.model.dtype, c.rpn.post_nms_top_n_test, c.model.pretrained) == ("bfloat16", 7, "")
  assert config.rpn.post_nms_top_n_test != 7   # the original is untouched


def test_synthetic_batch_content_is_top_left():
  batch = cases.synthetic_batch(2, 64, 96, 4, 3, 20, content_hw=(40, 50))
  assert batch["image"].shape == (2, 64, 96, 3)
  assert not batch["image"][:, 40:].any() and not batch["image"][:, :, 50:].any()
  np.testing.assert_array_equal(batch["image_hw"], [[40, 50], [40, 50]])
  boxes = batch["gt_boxes"][batch["gt_valid"]]
  assert (boxes[:, 2] <= 50).all() and (boxes[:, 3] <= 40).all()
  assert batch["gt_valid"].sum(axis=1).tolist() == [3, 3]
  with pytest.raises(ValueError, match="does not fit"):
    cases.synthetic_batch(1, 64, 96, 4, 3, 20, content_hw=(65, 50))


def test_synthetic_batch_for_the_device_resize_fills_the_content():
  batch = cases.synthetic_batch(2, 640, 832, 4, 3, 20, content_hw=(600, 800),
                                resize_on_device=True)
  assert "image" not in batch and batch["source_image"].shape == (2, 384, 512, 3)
  np.testing.assert_array_equal(batch["source_hw"], [[375, 500], [375, 500]])
  np.testing.assert_array_equal(batch["orig_hw"], batch["source_hw"])   # as the pipeline ships
  np.testing.assert_allclose(batch["scale"], 1.6)
  images = np.asarray(image_ops.batch_images(batch))
  assert images.shape == (2, 640, 832, 3)
  assert images[:, :600, :800].any(axis=(1, 2)).all()
  assert not images[:, 600:].any() and not images[:, :, 800:].any()
