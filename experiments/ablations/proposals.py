"""Ablation: number of RPN proposals kept after NMS at test time, on shapes.

Command:

  python -m frcnn_jax.sweep --config experiments/ablations/proposals.py --workdir runs/abl_props

Only a test-time key changes, so the sweep trains experiments/shapes.py once (in
runs/abl_props/train) and evaluates that model with 8, 16, 32 and 64 test proposals
(frcnn_jax/sweep.py); results in runs/abl_props/results.{md,csv}.
Expected: mAP grows with the proposal count and saturates well below 64 on images holding at
most six objects (the paper's Table 2 shows the same saturation on VOC at ~300).
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes.py")


def get_config() -> ml_collections.ConfigDict:
  return config_flags.load_module(_BASE).get_config()


def get_sweep() -> list[dict]:
  return [{"rpn.post_nms_top_n_test": n} for n in (8, 16, 32, 64)]
