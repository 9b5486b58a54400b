"""The default configuration: the paper's PASCAL VOC 2007 setting.

Every experiment file in `experiments/` starts from `get_config()` and overrides what it
changes. The returned ConfigDict is locked, so a misspelt key fails at start instead of being
silently ignored.
"""

import ml_collections

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (VOC07, VGG16) configuration, locked against new keys."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "voc_tfds"          # shapes | voc_tfds | voc_folder | coco_json
  c.data.data_dir = ""              # tfds data_dir, VOCdevkit root, or COCO root
  c.data.years = ("2007",)          # VOC years whose train_split is concatenated
  c.data.train_split = "trainval"
  c.data.eval_year = "2007"
  c.data.eval_split = "test"
  c.data.classes = VOC_CLASSES      # class names; label c is classes[c - 1]
  c.data.coco_train_json = ""
  c.data.coco_train_images = ""
  c.data.coco_eval_json = ""
  c.data.coco_eval_images = ""
  c.data.shapes_num_train = 512
  c.data.shapes_num_test = 128
  c.data.shapes_image_size = 128
  c.data.shapes_cache_mb = 512      # rendered images kept per process (0: render every time)
  c.data.min_size = 600             # shorter side after resizing
  c.data.max_size = 1000            # cap on the longer side
  c.data.canvases = ()              # static canvases ((h, w), ...), multiples of the trunk
                                    # stride; () chooses data.num_canvases from the split's
                                    # resized sizes (least padding; README "Canvases")
  c.data.num_canvases = 4           # K canvases chosen when data.canvases is ()
  c.data.canvas_multiple = 32       # sides of chosen canvases are multiples of this (a
                                    # multiple of the trunk's stride)
  c.data.pad_hw = ()                # one fixed canvas (h, w) instead (the shapes config):
                                    # larger images are scaled down to fit; () = unused
  c.data.max_gt = 64                # ground-truth boxes per image after padding
  c.data.flip = True                # random horizontal flip in training
  c.data.drop_images_without_objects = True   # train split: leave out images with no object
                                    # left after difficult / crowd ones are removed (counted,
                                    # logged), as py-faster-rcnn's filter_roidb
  c.data.bad_input = "skip"         # skip (counted warning) | error
  c.data.proposals = ""             # stored proposals of the train split (.npz from
                                    # frcnn_jax.dump_proposals) that train.loss_mode=head
                                    # trains on ("": none)
  c.data.num_proposals = 2000       # the best R stored proposals per image used
  c.data.num_workers = ml_collections.config_dict.placeholder(int)   # worker processes per
                                    # host (0: in the main process); None: from the host's
                                    # cores and local devices (README "Input pipeline")
  c.data.prefetch = 2
  c.data.resize_on = "auto"         # host | device | auto (device on GPU/TPU, host on CPU):
                                    # where images are resized, flipped and padded (README
                                    # "Input on the device")

  c.model = ml_collections.ConfigDict()
  c.model.width = 1.0               # channel multiplier of the trunk and heads
  c.model.convs_per_block = (2, 2, 3, 3, 3)   # VGG16; fewer for tiny test trunks
  c.model.frozen_blocks = 2         # conv1 and conv2 frozen, as in the paper
  c.model.pretrained = ""           # .npz from scripts/convert_vgg16.py
  c.model.input_norm = "caffe"      # the pretrained weights' own (convert_vgg16.py prints it):
                                    # caffe (BGR - py-faster-rcnn's mean pixel) | keras (BGR -
                                    # the Keras VGG16 mean pixel) | torchvision (RGB mean/std)
  c.model.anchor_sizes = (128, 256, 512)
  c.model.anchor_ratios = (0.5, 1.0, 2.0)
  c.model.anchor_stride = 16
  c.model.anchor_style = "exact"    # exact (area s^2, h / w = r) | py-faster-rcnn (its
                                    # generate_anchors' rounded shapes: 184 x 96, not 181 x 91)
  c.model.pool_ceil_mode = False    # trunk max pools round up as Caffe (600 x 1000 -> 38 x 63
                                    # conv5 cells, not 37 x 62)
  c.model.legacy_plus_one = False   # decoded proposals / detections 1 px wider and taller, as
                                    # py-faster-rcnn's bbox_transform_inv (inclusive x2, y2)
  c.model.rpn_objectness = "softmax"  # softmax (2k, the paper) | sigmoid (k)
  c.model.roi_op = "roi_pool"       # roi_pool | roi_align
  c.model.roi_pool_coordinates = "torchvision"  # roi_pool rounds x2 * scale (torchvision) |
                                    # caffe: (x2 - 1) * scale, the inclusive end pixel
  c.model.roi_size = 7
  c.model.roi_sampling_ratio = 2
  c.model.roi_aligned = False
  c.model.fc_dim = 4096
  c.model.dropout = 0.5
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16
  c.model.conv_grad = "auto"        # 3x3 conv gradients: xla (lax's) | per_tap (weight
                                    # gradients as per-tap matmuls, models/conv.py; faster on
                                    # CPU) | auto (per_tap on CPU, else xla); same parameters

  c.rpn = ml_collections.ConfigDict()
  c.rpn.pre_nms_top_n_train = 12000
  c.rpn.post_nms_top_n_train = 2000
  c.rpn.pre_nms_top_n_test = 6000
  c.rpn.post_nms_top_n_test = 300
  c.rpn.nms_threshold = 0.7
  c.rpn.min_size = 16.0             # in original-image pixels (scaled by the image scale)
  c.rpn.batch_size_per_image = 256
  c.rpn.positive_fraction = 0.5
  c.rpn.positive_iou = 0.7
  c.rpn.negative_iou = 0.3
  c.rpn.allowed_border = 0.0        # < 0 keeps anchors that cross the image border
  c.rpn.box_loss_weight = 1.0
  c.rpn.sigma = 3.0

  c.roi = ml_collections.ConfigDict()
  c.roi.batch_size_per_image = 128
  c.roi.fg_fraction = 0.25
  c.roi.fg_iou = 0.5
  c.roi.bg_iou_lo = 0.0             # 0.1 in the paper, 0.0 in py-faster-rcnn end-to-end
  c.roi.box_weights = (10.0, 10.0, 5.0, 5.0)   # 1 / (0.1, 0.1, 0.2, 0.2)
  c.roi.box_loss_weight = 1.0
  c.roi.sigma = 1.0

  c.test = ml_collections.ConfigDict()
  c.test.nms_threshold = 0.3
  c.test.score_threshold = 0.05
  c.test.detections_per_image = 100
  c.test.min_size = 0.01            # drop detections with a side under this (resized-image
                                    # pixels; torchvision's 1e-2); 0 keeps zero-area boxes

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 70000
  c.train.batch_size = 1            # global, over all devices and hosts
  c.train.optimizer = "sgd"         # sgd (Caffe SGD, the paper) | adamw
  c.train.learning_rate = 1e-3      # per update (batch_size x grad_accum_steps images); the
                                    # exact py-faster-rcnn recipe (1e-3 per 2 images) and its
                                    # scaling rule: experiments/voc.py
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.bias_lr_mult = 2.0        # py-faster-rcnn: biases learn twice as fast (lr_mult 2) ...
  c.train.bias_weight_decay = True  # ... and are decayed too (no decay_mult: Caffe's default 1)
  c.train.schedule = "piecewise"    # piecewise | cosine
  c.train.warmup_steps = 0
  c.train.lr_boundaries = (50000,)
  c.train.lr_decay = 0.1
  c.train.grad_clip_norm = 0.0      # 0 disables
  c.train.grad_accum_steps = 1
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.log_every = 20
  c.train.eval_every = 0            # 0: evaluate only at the end
  c.train.nonfinite = "error"       # error | skip (skip the update, count it)
  c.train.loss_mode = "joint"       # joint (end to end) | rpn (RPN only) | head (detection
                                    # head on data.proposals): the stages of alt_opt; the
                                    # part not trained is neither updated nor decayed
  c.train.init_from = ""            # run dir whose newest checkpoint's parameters start this
                                    # run (instead of model.pretrained; "": none)
  c.train.reuse_host_memory = "auto"  # glibc keeps freed memory: auto (XLA:CPU only) | on | off
  c.train.compilation_cache_dir = "~/.cache/frcnn_jax/jax_cache"  # JAX's persistent
                                    # compilation cache ("": off)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 1             # global
  c.eval.metric = "voc07"           # voc07 | voc12 | coco
  c.eval.iou_threshold = 0.5

  c.alt_opt = ml_collections.ConfigDict()   # the paper's 4-step training (frcnn_jax.alt_opt):
                                    # 1 RPN, 2 Fast R-CNN on 1's proposals, 3 RPN and 4 Fast
                                    # R-CNN with the shared convs frozen; per-stage values
  c.alt_opt.num_steps = (80000, 40000, 80000, 40000)   # steps of stages 1-4 (these
                                    # replace train.num_steps; py-faster-rcnn VGG16 VOC07)
  c.alt_opt.lr_boundaries = ((60000,), (30000,), (60000,), (30000,))   # each stage's drops
  c.alt_opt.batch_size = (1, 2, 1, 2)   # images per step (py-faster-rcnn: IMS_PER_BATCH)
  c.alt_opt.roi_batch_size_per_image = 64   # Fast R-CNN stages: 128 RoIs per 2 images
  c.alt_opt.num_proposals = 2000    # proposals dumped per training image (RPN_POST_NMS_TOP_N)
  c.alt_opt.pre_nms_top_n = -1      # boxes entering the dump's NMS (<= 0: every anchor)

  c.lock()
  return c
