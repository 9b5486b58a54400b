"""PASCAL VOC 2007 with the ZF backbone: py-faster-rcnn's ZF end-to-end recipe (VOC07 trainval
-> test).

Command:

  python scripts/convert_zf.py --input ZF.v2.caffemodel --output weights/zf_caffe.npz
  python -m frcnn_jax.train --config experiments/voc_zf.py --workdir runs/voc07_zf

(`ZF.v2.caffemodel` is the ImageNet ZF that py-faster-rcnn's
`data/scripts/fetch_imagenet_models.sh` downloads.)

Reference, not a measurement of this code: the paper reports VOC07 test mAP 59.9 for ZF with
shared convolutions and 300 proposals (its 4-step alternating training) and 17 fps on a K40
GPU; py-faster-rcnn's end-to-end training is its approximate joint variant of the same network.
Not run here.

The network, as py-faster-rcnn's `models/pascal_voc/ZF/faster_rcnn_end2end/train.prototxt`:
conv1 .. conv5 of ZF (frcnn_jax/models/backbones/zf.py: Caffe's LRN and rounded-up pools, 256
channels at stride 16), the RPN's 3x3 conv 256 wide (`rpn_conv/3x3`, the backbone's width) with
9 anchors, RoI pooling 6 x 6 at scale 1/16 (`roi_pool_conv5`), fc6 / fc7 of 4096 with dropout
0.5, every layer trained (each conv has lr_mult 1: `model.zf.frozen_layers = 0`) and biases at
lr_mult 2. The solver (`models/pascal_voc/ZF/faster_rcnn_end2end/solver.prototxt`) is VGG16's:
base_lr 0.001, lr_policy "step", gamma 0.1, stepsize 50000, momentum 0.9, weight_decay 0.0005,
iter_size 2, and py-faster-rcnn's `faster_rcnn_end2end.sh` runs 70000 iterations on
voc_2007_trainval; so the schedule, the data settings, Caffe's geometry and the scaling rule
(`--config experiments/voc_zf.py:N` or `:BxK`) are experiments/voc.py's, the backbone aside.
The prototxt's drop6 / drop7 do not scale while training and multiply by 0.5 at test
(`scale_train: false`): `model.fc.dropout_scale_train = False` does the same.
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

voc = config_flags.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"))

ROI_SIZE = 6            # roi_pool_conv5: pooled_w 6, pooled_h 6 (ZF's pool5 map for fc6)


def get_config(batch: str | None = None) -> ml_collections.ConfigDict:
  """The VOC07 ZF config; `batch` (the `:N` or `:BxK` after the file name) applies voc.py's
  scaling rule."""
  c = voc.get_config()
  c.model.backbone = "zf"
  c.model.pretrained = "weights/zf_caffe.npz"
  c.model.input_norm = "caffe"                  # ZF.v2.caffemodel, PIXEL_MEANS
  c.model.roi_size = ROI_SIZE
  c.model.zf.frozen_layers = 0                  # every conv has lr_mult 1 in the ZF prototxt
  c.model.zf.pool_ceil_mode = True              # Caffe pooling: 600 x 1000 -> 39 x 64
  c.model.fc.dropout_scale_train = False        # drop6 / drop7: scale_train: false
  voc.scale_to_batch(c, *voc.parse_batch(batch))
  return c
