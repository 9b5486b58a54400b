"""PASCAL VOC 2007 on GPUs and TPUs: experiments/voc.py's recipe in bfloat16 with bigger batches.

Command (N = global images per step = devices x per-device batch; default 8):

  python -m frcnn_jax.train --config experiments/voc_accel.py:N --workdir runs/voc07_accel

What changes from `experiments/voc.py` (everything else is its recipe):
- `model.dtype = "bfloat16"`: convolutions and fc layers compute in bfloat16; parameters,
  optimizer state, losses, box decoding, proposals and targets stay float32 (the model casts
  its outputs; tests/test_bf16.py checks one step's losses and gradients against float32).
- a global batch of N images per step, N = 8 by default: pick N so that every device gets at
  least 2 images (one image per device leaves an accelerator mostly idle: see
  `scripts/accelerator_check.py` for the images/s and MFU per per-device batch). N must be a
  multiple of the device count (the train command checks).
- the learning rate and schedule follow voc.py's scaling rule, which keeps py-faster-rcnn's
  learning rate per image (lr = 1e-3 * N / 2, the schedule counted in images, a 500-image
  warmup from N >= 8).
- `train.reuse_host_memory` stays "auto", which is off on accelerators (frcnn_jax/runtime/host_memory.py).

`voc_accel.py:BxK` accumulates K steps of B images per update, as in voc.py. On TPU use
`--config.model.roi_op=roi_align` (docs/accelerators.md says why).
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

voc = config_flags.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"))

DEFAULT_BATCH = "8"


def get_config(batch: str | None = None) -> ml_collections.ConfigDict:
  """voc.py's config for `batch` (N or BxK; default 8 images per step) in bfloat16."""
  c = voc.get_config(batch or DEFAULT_BATCH)
  c.model.dtype = "bfloat16"
  return c
