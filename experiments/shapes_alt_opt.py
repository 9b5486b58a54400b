"""Synthetic shapes with the paper's 4-step alternating training: the CI-sized check of
`frcnn_jax.alt_opt` against end-to-end shapes training (`experiments/shapes.py`).

Command:

  python -m frcnn_jax.alt_opt --config experiments/shapes_alt_opt.py --workdir runs/shapes_alt

Everything is `experiments/shapes.py`'s (the detector, data, AdamW, 8 images per step) except
the stages: the paper's 2 : 1 : 2 : 1 split of iterations (1200 / 600 / 1200 / 600 steps, each
with its own 100-step warmup and a x0.1 drop at 80 %), 64 sampled RoIs per image in the Fast
R-CNN stages (as the end-to-end config), and 128 stored proposals per training image (the
end-to-end config's post-NMS training count) with at most 2000 boxes entering NMS. With no
pretrained weights here, "from ImageNet weights" (stages 1 and 2) means from the same random
initialisation. Measured: benchmarks/RESULTS.md, "shapes end to end against alternating
training"; how it works: docs/alternating_training.md.
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

shapes = config_flags.load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.py"))


def get_config() -> ml_collections.ConfigDict:
  """The shapes alternating-training config (see the module docstring)."""
  c = shapes.get_config()
  c.alt_opt.num_steps = (1200, 600, 1200, 600)
  c.alt_opt.lr_boundaries = ((960,), (480,), (960,), (480,))
  c.alt_opt.batch_size = (8, 8, 8, 8)
  c.alt_opt.roi_batch_size_per_image = 64
  c.alt_opt.num_proposals = 128
  c.alt_opt.pre_nms_top_n = 2000
  return c
