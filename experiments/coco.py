"""MS COCO 2014: the paper's COCO setting (Faster R-CNN, VGG16, COCO train2014 -> val2014).

Command (COCO 2014 from https://cocodataset.org unpacked under data/coco: train2014/, val2014/,
annotations/instances_{train,val}2014.json; weights as in experiments/voc.py):

  python -m frcnn_jax.train --config experiments/coco.py --workdir runs/coco

Expected (paper, Table 11, VGG16 trained on COCO train): about 42 AP50 and 21-22 AP
(AP@[.5:.95]; val 41.5 / 21.2, test-dev 42.1 / 21.5). COCO AP is the evaluation metric
(`eval.metric=coco`, pycocotools, crowd regions ignored): runs/coco/eval/*.json holds AP as
"map" and the AP50, AP75, APs/m/l numbers. Long: 2.56M training images, then 40k val images.

The setting (paper, section 4.2 "Experiments on MS COCO"): anchors of 4 sizes 64, 128, 256,
512 x 3 ratios (12 per location; py-faster-rcnn's coco models: scales 4, 8, 16, 32 x 16 px),
Fast R-CNN negatives with IoU in [0, 0.5), 8 images per update (the paper's 8 GPUs, one image
each), learning rate 0.003 for 240k updates then 0.0003 for 80k more. Everything else is the
VOC end-to-end recipe of experiments/voc.py (600 px shorter side, flips, SGD momentum 0.9,
weight decay 5e-4 on weights and biases, biases at 2x lr, conv1/conv2 frozen, training images
without a non-crowd object left out), and, as py-faster-rcnn's coco prototxts, no dropout in
fc6/fc7. py-faster-rcnn's own end-to-end COCO solver differs: 490k updates of 2 images, lr 1e-3
dropped at 350k (not reproduced here; `--config.train.*` overrides can).

Data: COCO-format json folders (`data.name=coco_json`), the official distribution, which also
serves the subsets other work uses (minival2014 / valminusminival2014 jsons from Detectron:
set data.coco_json.eval_json); tfds `coco/2014` is not read (it must be downloaded and re-encoded
through tfds and has no minival split).

Scaling rule: `--config experiments/coco.py:N` or `:BxK` as for experiments/voc.py (learning
rate per image and the schedule in images kept, relative to 8 images per update; warmup only
above 8 images per update).
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

voc = config_flags.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"))

IMAGES_PER_UPDATE = 8
LR_PER_UPDATE = 0.003
UPDATES = 320000          # 240k + 80k
DECAY_AT_UPDATE = 240000
WARMUP_FROM = 16          # the paper's own 8-image updates need no warmup


def get_config(batch: str | None = None) -> ml_collections.ConfigDict:
  """The COCO config; `batch` (the `:N` or `:BxK` after the file name) applies the scaling rule."""
  c = voc.get_config()
  c.data.name = "coco_json"
  c.data.coco_json.data_dir = "data/coco"
  c.data.coco_json.train_json = "annotations/instances_train2014.json"
  c.data.coco_json.train_images = "train2014"
  c.data.coco_json.eval_json = "annotations/instances_val2014.json"
  c.data.coco_json.eval_images = "val2014"
  c.data.max_gt = 100               # COCO images hold more than 64 boxes (up to about 90)
  c.anchors.sizes = (64, 128, 256, 512)
  c.model.fc.dropout = 0.0
  c.roi.bg_iou_lo = 0.0
  c.eval.metric = "coco"
  b, k = voc.parse_batch(batch) if batch else (IMAGES_PER_UPDATE, 1)
  voc.scale_to_batch(c, b, k, updates=UPDATES, decay_at_update=DECAY_AT_UPDATE,
                     lr_per_update=LR_PER_UPDATE, images_per_update=IMAGES_PER_UPDATE,
                     warmup_from=WARMUP_FROM)
  return c
