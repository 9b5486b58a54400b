"""Tiny Faster R-CNN models and cheap deterministic parameters shared by the model tests.

Parameters come from NumPy (shapes by `jax.eval_shape`), so tests do not pay the XLA compile
of the random initialisers; `init_params` itself is tested once in test_faster_rcnn.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.detection import settings as detection_settings
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models.backbones import vgg16
from frcnn_jax.models.roi_heads import fc
from frcnn_jax.models.roi_heads.pooling import RoIPooler

_SMALL_STD = {"conv": 0.01, "objectness": 0.01, "deltas": 0.01, "cls": 0.01, "box": 0.001}


def model(*, num_classes: int = 2, fc_dim: int = 16, dropout: float = 0.5,
          num_anchors: int = 6, input_norm: str = "torchvision",
          rpn_objectness: str = "softmax", conv_grad: str = "xla", dtype=jnp.float32,
          roi_op: str = "roi_pool", roi_size: int = 7, roi_pool_coordinates: str = "torchvision",
          **trunk) -> faster_rcnn.FasterRCNN:
  """A VGG16 trunk of width 1/16 with one conv per block (`trunk` overrides its settings) and
  the fc head with 16-wide layers (2 classes)."""
  backbone = vgg16.VGG16(**{"width": 1 / 16, "convs_per_block": (1, 1, 1, 1, 1), **trunk},
                         conv_grad=conv_grad, dtype=dtype)
  pooler = RoIPooler(op=roi_op, size=roi_size, spatial_scale=1.0 / backbone.stride,
                     pool_coordinates=roi_pool_coordinates)
  head = fc.FCHead(dim=fc_dim, dropout=dropout, num_classes=num_classes, pooler=pooler,
                   dtype=dtype)
  return faster_rcnn.FasterRCNN(trunk=backbone, head=head, num_anchors=num_anchors,
                                input_norm=input_norm, rpn_objectness=rpn_objectness,
                                conv_grad=conv_grad, dtype=dtype)


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


def settings(**flat) -> detection_settings.DetectorSettings:
  """DetectorSettings from section-prefixed keywords: `anchor_sizes=...` (anchors.sizes),
  `rpn_min_size=...`, `roi_...`, `test_...`, `loss_...`; others (stride, legacy_plus_one,
  loss_mode) as they are."""
  sections = {"anchor_": "anchors", "rpn_": "rpn", "roi_": "roi", "test_": "test",
              "loss_": "loss"}
  grouped: dict[str, dict] = {name: {} for name in sections.values()}
  top = {}
  for key, value in flat.items():
    prefix = next((p for p in sections if key.startswith(p)), None)
    if prefix is None:
      top[key] = value
    else:
      grouped[sections[prefix]][key[len(prefix):]] = value
  return detection_settings.DetectorSettings(
      **{name: cls(**grouped[name]) for name, cls in detection_settings.SECTIONS.items()},
      **top)
