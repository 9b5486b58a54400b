"""PASCAL VOC 2007 with the paper's 4-step alternating training (py-faster-rcnn `alt_opt`).

Command (one command runs the four stages; run it again to resume):

  python scripts/convert_vgg16.py --input VGG16.v2.caffemodel --output weights/vgg16_caffe.npz
  python -m frcnn_jax.alt_opt --config experiments/voc_alt_opt.py --workdir runs/voc07_alt_opt

The final detector is runs/voc07_alt_opt/stage4_fast_rcnn (evaluate, detect and export it with
that --workdir); runs/voc07_alt_opt/alt_opt.json summarises the stages and the proposal recall
of both RPN stages on VOC07 test. Expected: VOC07 test mAP about 0.699 (the paper's Table 3,
"RPN+VGG, shared", 69.9, is this training); several times the end-to-end run's hours (240k
iterations against 70k updates of 2 images).

The recipe, as py-faster-rcnn's `tools/train_faster_rcnn_alt_opt.py` and
`models/pascal_voc/VGG16/faster_rcnn_alt_opt/*.pt`: stage 1 RPN and stage 3 RPN 80k iterations
of 1 image (lr 1e-3, x0.1 after 60k), stage 2 and stage 4 Fast R-CNN 40k iterations of 2 images
with 128 RoIs per iteration (64 per image; lr 1e-3, x0.1 after 30k); SGD momentum 0.9, weight
decay 5e-4, biases at twice the learning rate; conv1 / conv2 frozen in stages 1 and 2, every
conv layer frozen in stages 3 and 4 (`lr_mult: 0`); stages 1 and 2 start from the ImageNet
weights, stage 3 from stage 2, stage 4 from stage 3; the proposals each Fast R-CNN stage trains
on are the previous RPN's 2000 best per training image after NMS 0.7 with every anchor entering
NMS (`rpn_generate`: RPN_PRE_NMS_TOP_N -1, RPN_POST_NMS_TOP_N 2000), the ground-truth boxes
added as RoIs (`roidb` merge), background RoIs from IoU 0 (`faster_rcnn_alt_opt.yml`
BG_THRESH_LO 0.0). Everything else is `experiments/voc.py`'s (Caffe geometry, anchors,
horizontal flips, images without objects left out). One difference: py-faster-rcnn's alt-opt
Fast R-CNN stages normalise the box targets by their means and deviations measured on the
training RoIs (BBOX_NORMALIZE_TARGETS_PRECOMPUTED False); here they use the fixed (0.1, 0.1,
0.2, 0.2) of its end-to-end training (`roi.box_weights`).
"""

import os

import ml_collections

from frcnn_jax.config import flags as config_flags

voc = config_flags.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"))


def get_config() -> ml_collections.ConfigDict:
  """The VOC07 alternating-training config (see the module docstring)."""
  c = voc.get_config()
  c.train.learning_rate = 1e-3          # per iteration, every stage (base_lr)
  c.train.warmup_steps = 0
  c.train.grad_accum_steps = 1
  c.train.checkpoint_every = 5000
  c.roi.bg_iou_lo = 0.0
  c.alt_opt.num_steps = (80000, 40000, 80000, 40000)
  c.alt_opt.lr_boundaries = ((60000,), (30000,), (60000,), (30000,))
  c.alt_opt.batch_size = (1, 2, 1, 2)
  c.alt_opt.roi_batch_size_per_image = 64
  c.alt_opt.num_proposals = 2000
  c.alt_opt.pre_nms_top_n = -1
  return c
