"""Ablation: RPN objectness as a 2k-way softmax (the paper) vs k sigmoids, on shapes.

Command:

  python -m frcnn_jax.sweep --config experiments/ablations/objectness.py --workdir runs/abl_obj

Runs experiments/shapes.py once per variant and writes runs/abl_obj/results.{md,csv}.
Expected: no meaningful difference (the paper notes the two are equivalent in practice).
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes.py")


def get_config() -> ml_collections.ConfigDict:
  return config_flags.load_module(_BASE).get_config()


def get_sweep() -> list[dict]:
  return [{"model.rpn_objectness": "softmax"}, {"model.rpn_objectness": "sigmoid"}]
