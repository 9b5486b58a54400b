"""Tiny Faster R-CNN models and cheap deterministic parameters shared by the model tests.

Parameters come from NumPy (shapes by `jax.eval_shape`), so tests do not pay the XLA compile
of the random initialisers; `init_params` itself is tested once in test_faster_rcnn.py.
"""

import jax
import numpy as np

from frcnn_jax.models import faster_rcnn

_SMALL_STD = {"conv": 0.01, "objectness": 0.01, "deltas": 0.01, "cls": 0.01, "box": 0.001}


def model(**overrides) -> faster_rcnn.FasterRCNN:
  """A trunk of width 1/16 with one conv per block and 16-wide fc layers (2 classes)."""
  args = dict(num_classes=2, width=1 / 16, convs_per_block=(1, 1, 1, 1, 1), fc_dim=16,
              num_anchors=6, input_norm="torchvision")
  args.update(overrides)
  return faster_rcnn.FasterRCNN(**args)


def numpy_params(net: faster_rcnn.FasterRCNN, seed: int = 0):
  """He-normal kernels (the paper's small std for RPN / cls / box layers), zero biases."""
  shapes = jax.eval_shape(lambda key: faster_rcnn.init_params(net, key), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    layer, name = path[-2].key, path[-1].key
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    std = _SMALL_STD.get(layer, np.sqrt(2.0 / np.prod(leaf.shape[:-1])))
    return rng.normal(0.0, std, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)
