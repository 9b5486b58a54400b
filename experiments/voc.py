"""PASCAL VOC 2007: the paper's end-to-end setting (Faster R-CNN, VGG16, VOC07 trainval -> test).

Command (py-faster-rcnn `faster_rcnn_end2end` recipe, two images per update):

  python scripts/convert_vgg16.py --input VGG16.v2.caffemodel --output weights/vgg16_caffe.npz
  python -m frcnn_jax.train --config experiments/voc.py --workdir runs/voc07

(`VGG16.v2.caffemodel` is the ImageNet VGG16 that py-faster-rcnn's
`data/scripts/fetch_imagenet_models.sh` downloads; Keras or torchvision VGG16 weights work too,
with the `model.input_norm` the converter prints.) Expected: VOC07 test mAP about 0.70 (paper:
69.9; py-faster-rcnn end-to-end 69.8-71.2 in its own and its ports' reports); several hours on
one modern accelerator. Evaluation at the end writes runs/voc07/eval/*.json.

The recipe, as in py-faster-rcnn (`models/pascal_voc/VGG16/faster_rcnn_end2end/solver.prototxt`,
`experiments/cfgs/faster_rcnn_end2end.yml`): Caffe SGD with `iter_size: 2`, i.e. every update
averages the gradients of two one-image passes: 70k updates of 2 images (140k images), momentum
0.9, weight decay 5e-4 on weights and biases (the prototxt gives biases `lr_mult: 2` and the
default `decay_mult: 1`), learning rate 1e-3 (2e-3 for biases) for 50k updates then 1e-4.
conv1/conv2 frozen (`lr_mult: 0`), shorter side 600 (longer at most 1000), horizontal flips,
images without a non-difficult object left out of training (`filter_roidb`), and Caffe's
geometry: `generate_anchors`' rounded anchor shapes, ceil-mode trunk pooling, RoIPool's
coordinate rounding, and `bbox_transform_inv`'s decoded boxes (1 px wider and taller). Here the two images of an update are one batch of 2 (the loss is the mean
over images, so this is Caffe's averaged accumulation); `voc.py:1x2` runs them as 2 accumulated
one-image steps instead.
Remaining differences from py-faster-rcnn: docs/training.md, "Deviations from py-faster-rcnn".

Scaling rule, `--config experiments/voc.py:N` (N images per update = global batch) or `:BxK`
(global batch B, K accumulated steps per update, N = B * K images per update): the learning rate
per image of the reference is kept (lr = 1e-3 * N / 2), and the schedule is counted in images
(140k images, the drop after 100k images), so every N trains on the same images with the same
learning rate per image: 140000 / B train steps, the drop after 100000 / B steps (step counts in
the config are train steps; with K > 1 an update happens every K steps). For N >= 8 a linear
warmup over the first 500 images (at least 50 updates) keeps the large early learning rate
stable (a deviation from the reference, which never runs such batches).
"""

import ml_collections

from frcnn_jax.config import defaults

IMAGES_PER_UPDATE = 2       # py-faster-rcnn: IMS_PER_BATCH 1 x solver iter_size 2
LR_PER_UPDATE = 1e-3        # solver base_lr, for IMAGES_PER_UPDATE images
UPDATES = 70000             # faster_rcnn_end2end.sh ITERS for pascal_voc
DECAY_AT_UPDATE = 50000     # solver stepsize (gamma 0.1)
WARMUP_IMAGES = 500         # only for N >= WARMUP_FROM images per update
WARMUP_FROM = 8
CHECKPOINT_IMAGES = 5000


def get_config(batch: str | None = None) -> ml_collections.ConfigDict:
  """The VOC07 config; `batch` (the `:N` or `:BxK` after the file name) applies the scaling rule."""
  c = defaults.get_config()
  c.data.name = "voc_tfds"
  c.data.voc_tfds.years = ("2007",)
  c.data.voc_tfds.train_split = "trainval"
  c.data.voc_tfds.eval_year = "2007"
  c.data.voc_tfds.eval_split = "test"
  c.data.drop_images_without_objects = True
  c.model.pretrained = "weights/vgg16_caffe.npz"
  c.model.input_norm = "caffe"                   # VGG16.v2.caffemodel, PIXEL_MEANS
  c.anchors.style = "py-faster-rcnn"        # generate_anchors' rounded shapes
  c.model.vgg16.pool_ceil_mode = True                  # Caffe pooling: 600 x 1000 -> 38 x 63
  c.model.roi_pool_coordinates = "caffe"         # Caffe RoIPool's rounding of the end pixel
  c.model.legacy_plus_one = True                 # bbox_transform_inv's 1 px larger boxes
  c.train.bias_lr_mult = 2.0
  c.train.bias_weight_decay = True
  c.train.eval_every = 0
  scale_to_batch(c, *parse_batch(batch))
  return c


def parse_batch(batch: str | None) -> tuple[int, int]:
  """Parses the config argument: None -> (2, 1); "N" -> (N, 1); "BxK" -> (B, K).

  Raises:
    ValueError: not of that form, or a count below 1.
  """
  if not batch:
    return IMAGES_PER_UPDATE, 1
  parts = str(batch).lower().split("x")
  try:
    if len(parts) > 2:
      raise ValueError
    values = [int(p) for p in parts]
  except ValueError:
    raise ValueError(f"config argument must be N (images per update) or BxK (batch B, K "
                     f"accumulated steps), got {batch!r}") from None
  b, k = values if len(values) == 2 else (values[0], 1)
  if b < 1 or k < 1:
    raise ValueError(f"batch and accumulation steps must be >= 1, got {batch!r}")
  return b, k


def scale_to_batch(c: ml_collections.ConfigDict, batch: int, accum: int = 1, *,
                   updates: int = UPDATES, decay_at_update: int = DECAY_AT_UPDATE,
                   lr_per_update: float = LR_PER_UPDATE,
                   images_per_update: int = IMAGES_PER_UPDATE,
                   warmup_from: int = WARMUP_FROM) -> None:
  """Applies the scaling rule of the module docstring in place.

  Args:
    c: the config to change.
    batch: B, global images per train step (`train.batch_size`).
    accum: K, train steps accumulated per update (`train.grad_accum_steps`).
    updates: length of the reference schedule, in its updates.
    decay_at_update: the reference's learning-rate drops, in its updates (one int or a tuple).
    lr_per_update: the reference's base learning rate.
    images_per_update: images per update of the reference.
    warmup_from: images per update from which the warmup is added.

  Raises:
    ValueError: B or K below 1.
  """
  if batch < 1 or accum < 1:
    raise ValueError(f"batch and grad_accum_steps must be >= 1, got {batch}, {accum}")
  images_per_step = batch
  images_per_new_update = batch * accum
  total_images = updates * images_per_update
  drops = decay_at_update if isinstance(decay_at_update, tuple) else (decay_at_update,)
  c.train.batch_size = batch
  c.train.grad_accum_steps = accum
  c.eval.batch_size = batch
  c.train.learning_rate = lr_per_update / images_per_update * images_per_new_update
  c.train.num_steps = total_images // images_per_step // accum * accum
  c.train.lr_boundaries = tuple(d * images_per_update // images_per_step for d in drops)
  c.train.warmup_steps = (max(WARMUP_IMAGES // images_per_step, 50 * accum)
                          if images_per_new_update >= warmup_from else 0)
  c.train.checkpoint_every = max(CHECKPOINT_IMAGES // images_per_step // accum * accum, 100)
