"""Ablation: RoI max pooling (the paper) vs RoIAlign, on the shapes setting.

Command:

  python -m frcnn_jax.sweep --config experiments/ablations/roi_op.py --workdir runs/abl_roi_op

Runs experiments/shapes.py once per RoI op and writes runs/abl_roi_op/results.{md,csv}.
Measured (with an earlier shapes setting): benchmarks/RESULTS.md, "shapes ablations".
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes.py")


def get_config() -> ml_collections.ConfigDict:
  return config_flags.load_module(_BASE).get_config()


def get_sweep() -> list[dict]:
  return [{"model.roi_op": "roi_pool"}, {"model.roi_op": "roi_align"}]
