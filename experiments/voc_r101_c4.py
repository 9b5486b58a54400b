"""PASCAL VOC 2007+2012 trainval -> VOC 2007 test with ResNet-101 C4 (the ResNet paper's
Faster R-CNN, He et al. 2016, Table 7).

Command (torchvision's ImageNet ResNet-101 converted with
`python scripts/convert_resnet.py --input resnet101-63fe2227.pth --output weights/resnet101_tv.npz`):

  python -m frcnn_jax.train --config experiments/voc_r101_c4.py --workdir runs/voc_r101_c4

Reference (not our measurement): the ResNet paper reports 76.4 mAP on VOC 2007 test for
ResNet-101 trained on 07+12 (73.2 for VGG16).

The model follows the paper's detector (its appendix A): conv1 .. conv4_x shared (stride 16),
RoI pooling of conv4_x, conv5_x as the per-RoI head (`model.roi_head=res5`, stride 2 then global
average pooling), batch norm frozen (fixed statistics, an affine transform). Our choices: RoI
pooling to 14 x 14 so conv5_x's stride gives 7 x 7 (Detectron2's C4 layout), stem and conv2_x
frozen (Detectron2's FREEZE_AT 2), torchvision's ResNet-101 weights (v1.5, its input
normalisation) instead of MSRA's. Everything else, including the schedule (110k updates of 2
images, lr 1e-3 then 1e-4 after 80k) and the scaling rule `:N` / `:BxK`, is
experiments/voc0712.py's.
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

voc0712 = config_flags.load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc0712.py"))


def get_config(batch: str | None = None) -> ml_collections.ConfigDict:
  """The R101-C4 07+12 config; `batch` applies voc0712's scaling rule."""
  c = voc0712.get_config(batch)
  c.model.backbone = "resnet_c4"
  c.model.resnet_c4.depth = 101
  c.model.resnet_c4.frozen_stages = 2
  c.model.roi_head = "res5"
  c.model.roi_op = "roi_pool"
  c.model.roi_size = 14
  c.model.roi_pool_coordinates = "torchvision"
  c.model.pretrained = "weights/resnet101_tv.npz"
  c.model.input_norm = "torchvision"
  return c
