"""MS COCO 2017 with ResNet-50-FPN: torchvision's `fasterrcnn_resnet50_fpn` and its reference
recipe (`references/detection`, "fasterrcnn_resnet50_fpn": 26 epochs, lr steps at 16 and 22).

Command (COCO 2017 under data/coco as for experiments/coco_r50_c4.py; torchvision's ImageNet
ResNet-50 converted with
`python scripts/convert_resnet.py --input resnet50-0676ba61.pth --output weights/resnet50_tv.npz`):

  python -m frcnn_jax.train --config experiments/coco_r50_fpn.py --workdir runs/coco_r50_fpn

Reference (not our measurement): torchvision reports 37.0 box AP for these weights
(`FasterRCNN_ResNet50_FPN_Weights.COCO_V1`). Its trained detector converts with
`python scripts/convert_torchvision_detector.py`, and this config with that file as
`model.pretrained` runs it (docs/training.md, "Backbones").

Each value and its source (torchvision 0.29 `models/detection/faster_rcnn.py` defaults,
`backbone_utils.py`, `references/detection/train.py` and its README):
  * ResNet-50 body, trainable_backbone_layers 3 (layer2 .. layer4; the stem and layer1
    frozen), frozen BN; FPN P2 .. P5 of 256 channels plus P6 by max pool (LastLevelMaxPool);
  * anchors 32, 64, 128, 256, 512, one per level P2 .. P6, x ratios 0.5, 1, 2, as
    AnchorGenerator (rounded, on the cells' corners: `anchors.style=torchvision`);
  * RPN: 2000 boxes per level before NMS and 2000 after in training, 1000 / 1000 at test, NMS
    0.7, min size 1e-3 px, per-level top-k and NMS within a level
    (`rpn.proposal_style=torchvision`), sigmoid objectness; 256 anchors per image, half
    positive, IoU 0.7 / 0.3, every anchor (no border rule);
  * RoIs: MultiScaleRoIAlign 7 x 7, sampling ratio 2, levels by sqrt(area) / 224 around P4;
    TwoMLPHead 1024 (no dropout); 512 RoIs per image, 25 % foreground at IoU 0.5, background
    [0, 0.5); box weights 10, 10, 5, 5; smooth L1 with beta 1/9 in both heads (sigma 3);
    test: score > 0.05, NMS 0.5, 100 detections;
  * input: RGB / 255 minus ImageNet's mean over its std; shorter side 800, longer at most
    1333; canvases multiples of 32 (size_divisible); horizontal flips;
  * SGD: 16 images per step (8 GPUs x 2), lr 0.02, momentum 0.9, weight decay 1e-4 on every
    trained parameter, x0.1 at epochs 16 and 22 of 26; linear warm-up over the first 1000
    steps; an epoch is 117,266 images (train2017 without the images that have no object) /
    16 = 7,330 steps.
Differences: torchvision normalises the losses by the sampled anchors / RoIs of the whole
batch (ours: per image, then the mean), warms up from 0.001 x lr (ours from 0), groups images by
aspect ratio into batches (ours: static canvases per aspect, docs/data.md), and resizes the
normalised float image with bilinear interpolation (ours: the uint8 image, then normalises).
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

coco_r50_c4 = config_flags.load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "coco_r50_c4.py"))

STEPS_PER_EPOCH = 7330     # 117,266 images / 16
EPOCHS = 26
LR_EPOCHS = (16, 22)


def get_config() -> ml_collections.ConfigDict:
  """The R50-FPN COCO 2017 config: coco_r50_c4.py's values where torchvision's are the same
  (data, anchor sizes and ratios, RPN NMS and sampling, every-anchor RPN loss, RoI sampling,
  test thresholds, SGD), these where they differ."""
  c = coco_r50_c4.get_config()
  c.model.backbone = "resnet_fpn"
  c.model.resnet_fpn.depth = 50
  c.model.resnet_fpn.trainable_layers = 3
  c.model.resnet_fpn.fpn_channels = 256
  c.model.roi_head = "fc"
  c.model.fc.dim = 1024
  c.model.fc.dropout = 0.0
  c.model.roi_size = 7
  c.model.roi_sampling_ratio = 2
  c.model.roi_aligned = False
  c.model.roi_canonical_scale = 224.0
  c.model.roi_canonical_level = 4
  c.model.rpn_objectness = "sigmoid"
  c.data.canvas_multiple = 32
  c.anchors.style = "torchvision"
  c.rpn.proposal_style = "torchvision"
  c.rpn.pre_nms_top_n_train = 2000
  c.rpn.post_nms_top_n_train = 2000
  c.rpn.pre_nms_top_n_test = 1000
  c.rpn.post_nms_top_n_test = 1000
  c.rpn.min_size = 1e-3
  c.roi.sigma = 3.0
  c.train.lr_boundaries = tuple(e * STEPS_PER_EPOCH for e in LR_EPOCHS)
  c.train.num_steps = EPOCHS * STEPS_PER_EPOCH
  return c
