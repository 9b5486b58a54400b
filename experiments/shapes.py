"""Synthetic shapes: the quick end-to-end check (no downloads, CPU friendly).

Command (the README's main command):

  python -m frcnn_jax.train --config experiments/shapes.py --workdir runs/shapes

Target: VOC07 mAP >= 0.90 on the 128-image shapes test split, trained from scratch in at most
10 minutes on 2 CPU cores (measured: benchmarks/RESULTS.md, "the main command end to end").
Evaluation at the end writes runs/shapes/eval/test-2200.json.

The detector is Faster R-CNN with every size scaled down to the task: a VGG-style trunk with
one conv per block and an eighth of the channels (8 ... 64) at stride 8 (no pool after block 4:
at VGG16's stride 16 the 17-30 px shapes cover one or two feature cells;
experiments/ablations/stride.py), 256 x 256 images, RoIAlign (better boxes for small shapes),
anchors of 16 to 256 pixels, fewer proposals and sampled RoIs, a 256-wide head, no pretrained
weights (so no frozen blocks), and AdamW (lr 2e-3, 100 warmup steps, x0.1 at step 1775 of
2200), which learns faster from scratch than the paper's SGD (benchmarks/RESULTS.md, "shapes
ablations"). 2200 steps leave room above the target: float rounding alone (`model.conv_grad`)
moves this small run's mAP by about 0.02.
"""

import ml_collections

from frcnn_jax.config import defaults


def get_config() -> ml_collections.ConfigDict:
  """The shapes config (see the module docstring)."""
  c = defaults.get_config()
  c.data.name = "shapes"
  c.data.shapes.num_train = 1024
  c.data.shapes.num_test = 128
  c.data.shapes.image_size = 256
  c.data.min_size = 256
  c.data.max_size = 256
  c.data.pad_hw = (256, 256)
  c.data.max_gt = 8
  c.data.num_workers = 1
  c.data.prefetch = 2

  c.model.vgg16.width = 0.125
  c.model.vgg16.convs_per_block = (1, 1, 1, 1, 1)
  c.model.vgg16.stride = 8         # trunk without pool4: 17-30 px shapes span 2-4 cells
  c.model.vgg16.frozen_blocks = 0
  c.model.input_norm = "torchvision"
  c.anchors.sizes = (16, 32, 64, 128, 256)
  c.model.roi_op = "roi_align"
  c.model.fc.dim = 256
  c.model.fc.dropout = 0.0

  c.rpn.pre_nms_top_n_train = 2000
  c.rpn.post_nms_top_n_train = 128
  c.rpn.pre_nms_top_n_test = 2000
  c.rpn.post_nms_top_n_test = 64
  c.rpn.min_size = 4.0
  c.rpn.batch_size_per_image = 128
  c.rpn.allowed_border = -1.0

  c.roi.batch_size_per_image = 64
  c.roi.fg_fraction = 0.5           # up to 32 foreground RoIs: 16 (0.25) was always saturated

  c.test.nms_threshold = 0.5        # shapes of one class overlap; 0.3 suppressed true objects

  c.train.optimizer = "adamw"
  c.train.learning_rate = 2e-3
  c.train.weight_decay = 1e-4
  c.train.bias_lr_mult = 1.0
  c.train.bias_weight_decay = False  # as measured (the paper configs decay biases)
  c.train.num_steps = 2200
  c.train.batch_size = 8
  c.train.warmup_steps = 100
  c.train.lr_boundaries = (1775,)
  c.train.checkpoint_every = 500
  c.train.log_every = 50
  c.train.grad_clip_norm = 10.0

  c.eval.batch_size = 16
  return c
