"""PASCAL VOC 2007: the paper's end-to-end setting (Faster R-CNN, VGG16, VOC07 trainval -> test).

Command (one GPU, one image per step, as in the paper / py-faster-rcnn `faster_rcnn_end2end`):

  python scripts/convert_vgg16.py --output weights/vgg16_caffe.npz   # once, ImageNet VGG16
  python -m frcnn_jax.train --config experiments/voc.py --workdir runs/voc07

Expected: VOC07 test mAP about 0.70 (paper: 69.9) after 70k iterations (several hours on one
modern GPU). Evaluation at the end writes runs/voc07/eval/*.json.

Setting: shorter side 600 (longer at most 1000), horizontal flips, VGG16 from converted ImageNet
weights with conv1/conv2 frozen, SGD momentum 0.9, weight decay 5e-4, learning rate 1e-3 for
50k iterations then 1e-4 until 70k, biases at twice the learning rate and without decay.

Scaling rule for more devices: `--config experiments/voc.py:N` (N = global batch, one image per
device is the natural choice) scales linearly from the one-image recipe: learning rate
1e-3 * N, iterations and the decay step divided by N (70000 / N and 50000 / N, so the model sees
the same number of images), and for N >= 8 a linear warmup over the first 500 images' worth of
steps (at least 50 steps) keeps the large early learning rate stable. Gradients are averaged
over the global batch, so N images per step on N devices equal one N-image step on one device.
"""

import ml_collections

from frcnn_jax import defaults

IMAGES_PER_RECIPE = 70000   # the paper's 70k iterations at one image per iteration
DECAY_AT_IMAGES = 50000


def get_config(batch_size: str | None = None) -> ml_collections.ConfigDict:
  """The VOC07 config; `batch_size` (the `:N` after the file name) applies the scaling rule."""
  c = defaults.get_config()
  c.data.name = "voc_tfds"
  c.data.years = ("2007",)
  c.data.train_split = "trainval"
  c.data.eval_year = "2007"
  c.data.eval_split = "test"
  c.model.pretrained = "weights/vgg16_caffe.npz"
  c.train.checkpoint_every = 5000
  c.train.eval_every = 0
  scale_to_batch(c, int(batch_size) if batch_size else 1)
  return c


def scale_to_batch(c: ml_collections.ConfigDict, batch: int) -> None:
  """Applies the linear batch / learning-rate scaling rule of the module docstring in place."""
  if batch < 1:
    raise ValueError(f"global batch size must be >= 1, got {batch}")
  c.train.batch_size = batch
  c.eval.batch_size = max(batch, 1)
  c.train.learning_rate = 1e-3 * batch
  c.train.num_steps = IMAGES_PER_RECIPE // batch
  c.train.lr_boundaries = (DECAY_AT_IMAGES // batch,)
  c.train.warmup_steps = max(500 // batch, 50) if batch >= 8 else 0
  c.train.checkpoint_every = max(5000 // batch, 100)
