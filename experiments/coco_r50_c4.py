"""MS COCO 2017 with ResNet-50 C4: Detectron2's `faster_rcnn_R_50_C4_1x` recipe (as far as the
config keys go).

Command (COCO 2017 under data/coco: train2017/, val2017/, annotations/instances_{train,val}2017
.json; torchvision's ImageNet ResNet-50 converted with
`python scripts/convert_resnet.py --input resnet50-0676ba61.pth --output weights/resnet50_tv.npz`):

  python -m frcnn_jax.train --config experiments/coco_r50_c4.py --workdir runs/coco_r50_c4

Reference (not our measurement): Detectron2's model zoo reports 35.7 box AP for R50-C4 1x.

Each value and its source (Detectron2 `configs/Base-RCNN-C4.yaml`, `faster_rcnn_R_50_C4_1x.yaml`
and the `detectron2/config/defaults.py` defaults they inherit, each checked against that file):
  * backbone res2 .. res4 of ResNet-50, FREEZE_AT 2 (stem + res2), frozen BN (RESNETS.NORM);
    RoI head Res5ROIHeads (`model.roi_head=res5`), ROIAlignV2 (`roi_align`, aligned) 14 x 14
    (POOLER_RESOLUTION 14);
  * anchors 32, 64, 128, 256, 512 x ratios 0.5, 1, 2 (ANCHOR_GENERATOR defaults);
  * RPN: 12000 / 2000 boxes before / after NMS in training (defaults), 6000 / 1000 at test
    (Base-RCNN-C4), NMS 0.7, 256 anchors per image, half positive, IoU 0.7 / 0.3, MIN_SIZE 0,
    every anchor in the loss (BOUNDARY_THRESH -1);
  * RoIs: 512 per image, 25 % foreground at IoU 0.5, background [0, 0.5); box weights
    10, 10, 5, 5; test: score > 0.05, NMS 0.5, 100 detections;
  * SGD: 16 images per step, lr 0.02, x0.1 at 60k and 80k, 90k steps, momentum 0.9, weight
    decay 1e-4 on weights and biases, linear warmup 1000 steps (IMS_PER_BATCH, BASE_LR, STEPS,
    MAX_ITER of Base-RCNN-C4; WARMUP_ITERS, WEIGHT_DECAY defaults);
  * input: shorter side 800, longer at most 1333 (MIN_SIZE_TEST / MAX_SIZE_*), flips.
Differences: Detectron2 trains at a random shorter side in 640 .. 800 (one size here), starts
from MSRA's Caffe ResNet-50 (`stride_in_1x1`, BGR) where this starts from torchvision's
(v1.5, `input_norm=torchvision`), samples RoIAlign bins adaptively (SAMPLING_RATIO 0; 2 here)
and uses an L1 box loss (SMOOTH_L1_BETA 0; smooth L1 here), warming up from 0.001 x lr.
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

coco = config_flags.load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "coco.py"))


def get_config() -> ml_collections.ConfigDict:
  """The R50-C4 COCO 2017 config."""
  c = coco.get_config()
  c.data.coco_json.train_json = "annotations/instances_train2017.json"
  c.data.coco_json.train_images = "train2017"
  c.data.coco_json.eval_json = "annotations/instances_val2017.json"
  c.data.coco_json.eval_images = "val2017"
  c.data.min_size = 800
  c.data.max_size = 1333
  c.model.backbone = "resnet_c4"
  c.model.resnet_c4.depth = 50
  c.model.resnet_c4.frozen_stages = 2
  c.model.roi_head = "res5"
  c.model.roi_op = "roi_align"
  c.model.roi_size = 14
  c.model.roi_aligned = True
  c.model.pretrained = "weights/resnet50_tv.npz"
  c.model.input_norm = "torchvision"
  c.model.roi_pool_coordinates = "torchvision"
  c.model.legacy_plus_one = False
  c.anchors.style = "exact"
  c.anchors.sizes = (32, 64, 128, 256, 512)
  c.anchors.ratios = (0.5, 1.0, 2.0)
  c.rpn.pre_nms_top_n_train = 12000
  c.rpn.post_nms_top_n_train = 2000
  c.rpn.pre_nms_top_n_test = 6000
  c.rpn.post_nms_top_n_test = 1000
  c.rpn.nms_threshold = 0.7
  c.rpn.min_size = 0.0
  c.rpn.allowed_border = -1.0
  c.roi.batch_size_per_image = 512
  c.roi.fg_fraction = 0.25
  c.roi.fg_iou = 0.5
  c.roi.bg_iou_lo = 0.0
  c.test.nms_threshold = 0.5
  c.test.score_threshold = 0.05
  c.test.detections_per_image = 100
  c.train.batch_size = 16
  c.train.grad_accum_steps = 1
  c.train.learning_rate = 0.02
  c.train.lr_boundaries = (60000, 80000)
  c.train.num_steps = 90000
  c.train.warmup_steps = 1000
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-4
  c.train.bias_weight_decay = True
  c.train.bias_lr_mult = 1.0
  return c
