"""The tiny shapes run the plug-in tests train: a few steps, then the final evaluation."""

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")

TINY = {
    "data.shapes.num_train": 8, "data.shapes.num_test": 4, "data.shapes.image_size": 64,
    "data.min_size": 64, "data.max_size": 64, "data.pad_hw": (64, 64), "data.max_gt": 8,
    "data.num_workers": 0, "data.prefetch": 1,
    "model.vgg16.width": 0.125, "model.vgg16.convs_per_block": (1, 1, 1, 1, 1),
    "model.fc.dim": 32, "anchors.sizes": (16, 32), "anchors.ratios": (1.0,),
    "rpn.pre_nms_top_n_train": 64, "rpn.post_nms_top_n_train": 16,
    "rpn.pre_nms_top_n_test": 64, "rpn.post_nms_top_n_test": 8, "rpn.batch_size_per_image": 32,
    "roi.batch_size_per_image": 16, "test.detections_per_image": 10,
    "train.batch_size": 2, "train.num_steps": 3, "train.learning_rate": 0.01,
    "train.warmup_steps": 0, "train.lr_boundaries": (), "train.checkpoint_every": 3,
    "train.log_every": 1, "eval.batch_size": 4, "train.compilation_cache_dir": "",
}


def check_trained(result: dict, config) -> None:
  """The run took every step, its losses are finite and it was evaluated."""
  assert result["step"] == config.train.num_steps
  assert all(np.isfinite(v) for k, v in result["train"].items() if isinstance(v, float)), result
  assert 0.0 <= result["eval"]["map"] <= 1.0, result["eval"]
