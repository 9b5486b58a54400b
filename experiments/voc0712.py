"""PASCAL VOC 2007+2012 trainval -> VOC 2007 test (the paper's "07+12" row).

Command:

  python -m frcnn_jax.train --config experiments/voc0712.py --workdir runs/voc0712

Expected: VOC07 test mAP about 0.73 (paper: 73.2). Same recipe as experiments/voc.py (see its
docstring for the scaling rule, also available here as `--config experiments/voc0712.py:N`),
on 16.5k training images instead of 5k: 110k iterations at one image per step with the
learning-rate drop at 80k (our choice: longer than the 07 schedule in proportion to the number
of passes over the data that 70k/50k gives on VOC07, rounded down as 07+12 overfits less).
"""

import os

import ml_collections

from frcnn_jax import config_flags

voc = config_flags.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"))


def get_config(batch_size: str | None = None) -> ml_collections.ConfigDict:
  """The 07+12 config; `batch_size` (the `:N` after the file name) applies the scaling rule."""
  c = voc.get_config()
  c.data.years = ("2007", "2012")
  batch = int(batch_size) if batch_size else 1
  voc.scale_to_batch(c, batch)
  c.train.num_steps = 110000 // batch
  c.train.lr_boundaries = (80000 // batch,)
  return c
