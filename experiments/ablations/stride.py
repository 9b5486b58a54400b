"""Ablation: trunk and anchor stride 16 (VGG16, the paper) vs 8 (no pool after block 4), on shapes.

Command:

  python -m frcnn_jax.sweep --config experiments/ablations/stride.py --workdir runs/abl_stride

Runs experiments/shapes.py once per stride and writes runs/abl_stride/results.{md,csv}.
At stride 16 a 17-30 px shape covers one or two feature cells; stride 8 costs four times the
block-5 and RPN convolutions. Measured: benchmarks/RESULTS.md, "shapes ablations".
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes.py")


def get_config() -> ml_collections.ConfigDict:
  return config_flags.load_module(_BASE).get_config()


def get_sweep() -> list[dict]:
  return [{"model.vgg16.stride": 16}, {"model.vgg16.stride": 8}]
