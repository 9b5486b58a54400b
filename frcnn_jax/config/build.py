"""The one place that maps a config (`frcnn_jax/config/defaults.py`) to objects and plain arguments."""

import os

import jax
import jax.numpy as jnp
import ml_collections

from frcnn_jax.data import canvases as canvas_lib
from frcnn_jax.data import pipeline
from frcnn_jax.data import proposal_store
from frcnn_jax.data import shapes
from frcnn_jax.data import sources
from frcnn_jax.detection import detector
from frcnn_jax.models import conv
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models import heads
from frcnn_jax.models import rpn
from frcnn_jax.models import vgg
from frcnn_jax.ops import anchors as anchor_ops
from frcnn_jax.ops import roi as roi_ops
from frcnn_jax.runtime import parallel
from frcnn_jax.training import optim
from frcnn_jax.training import restore

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _choice(name: str, value: str, allowed) -> str:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
  return value


def _positive(name: str, value, minimum: float = 0.0, inclusive: bool = False):
  if value < minimum or (value == minimum and not inclusive):
    raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {minimum}, got {value!r}")
  return value


def _fraction(name: str, value: float) -> float:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  return float(value)


def model_from_config(config: ml_collections.ConfigDict,
                      num_classes: int) -> faster_rcnn.FasterRCNN:
  """Builds the network from `config.model` (and the anchor count from its anchors).

  Args:
    config: the experiment config.
    num_classes: C foreground classes (usually len(config.data.classes)).

  Raises:
    ValueError: naming the config key of an invalid value.
  """
  m = config.model
  _positive("num_classes", num_classes, 1, inclusive=True)
  convs = tuple(int(n) for n in m.convs_per_block)
  if len(convs) != len(vgg.BASE_CHANNELS) or min(convs) < 1:
    raise ValueError(f"model.convs_per_block must be {len(vgg.BASE_CHANNELS)} positive "
                     f"integers, got {m.convs_per_block!r}")
  if not 0 <= m.frozen_blocks <= len(convs):
    raise ValueError(f"model.frozen_blocks must be in [0, {len(convs)}], got "
                     f"{m.frozen_blocks!r}")
  if m.anchor_stride not in vgg.STRIDES:
    raise ValueError(f"model.anchor_stride is the trunk stride and must be one of {vgg.STRIDES}, "
                     f"got {m.anchor_stride!r}")
  conv_grad = _choice("model.conv_grad", m.conv_grad, ("auto",) + conv.CONV_GRADS)
  if conv_grad == "auto":
    conv_grad = "per_tap" if jax.default_backend() == "cpu" else "xla"
  return faster_rcnn.FasterRCNN(
      num_classes=int(num_classes),
      width=float(_positive("model.width", m.width)),
      convs_per_block=convs,
      frozen_blocks=int(m.frozen_blocks),
      stride=int(m.anchor_stride),
      pool_ceil_mode=bool(m.pool_ceil_mode),
      input_norm=_choice("model.input_norm", m.input_norm, faster_rcnn.INPUT_NORMS),
      num_anchors=len(m.anchor_sizes) * len(m.anchor_ratios),
      rpn_objectness=_choice("model.rpn_objectness", m.rpn_objectness, rpn.OBJECTNESS_MODES),
      roi_op=_choice("model.roi_op", m.roi_op, heads.ROI_OPS),
      roi_pool_coordinates=_choice("model.roi_pool_coordinates", m.roi_pool_coordinates,
                                   roi_ops.ROI_POOL_COORDINATES),
      roi_size=int(_positive("model.roi_size", m.roi_size, 1, inclusive=True)),
      roi_sampling_ratio=int(m.roi_sampling_ratio),
      roi_aligned=bool(m.roi_aligned),
      fc_dim=int(_positive("model.fc_dim", m.fc_dim, 1, inclusive=True)),
      dropout=_fraction("model.dropout", m.dropout),
      conv_grad=conv_grad,
      dtype=_DTYPES[_choice("model.dtype", m.dtype, _DTYPES)],
  )


def detector_settings_from_config(config: ml_collections.ConfigDict) -> detector.DetectorSettings:
  """Maps model anchors, rpn.*, roi.* and test.* to the static `DetectorSettings`.

  Raises:
    ValueError: naming the config key of an invalid value.
  """
  m, r, o, t = config.model, config.rpn, config.roi, config.test
  for name in ("pre_nms_top_n_train", "post_nms_top_n_train", "pre_nms_top_n_test",
               "post_nms_top_n_test", "batch_size_per_image"):
    _positive(f"rpn.{name}", r[name], 1, inclusive=True)
  _positive("roi.batch_size_per_image", o.batch_size_per_image, 1, inclusive=True)
  _positive("test.detections_per_image", t.detections_per_image, 1, inclusive=True)
  for name, values in (("model.anchor_sizes", m.anchor_sizes),
                       ("model.anchor_ratios", m.anchor_ratios)):
    if not values or min(values) <= 0:
      raise ValueError(f"{name} must be a non-empty tuple of positive numbers, got {values!r}")
  if len(o.box_weights) != 4:
    raise ValueError(f"roi.box_weights must have 4 entries, got {o.box_weights!r}")
  return detector.DetectorSettings(
      anchor_sizes=tuple(float(s) for s in m.anchor_sizes),
      anchor_ratios=tuple(float(s) for s in m.anchor_ratios),
      anchor_stride=int(m.anchor_stride),
      anchor_style=_choice("model.anchor_style", m.anchor_style, anchor_ops.ANCHOR_STYLES),
      legacy_plus_one=bool(m.legacy_plus_one),
      rpn_pre_nms_top_n_train=int(r.pre_nms_top_n_train),
      rpn_post_nms_top_n_train=int(r.post_nms_top_n_train),
      rpn_pre_nms_top_n_test=int(r.pre_nms_top_n_test),
      rpn_post_nms_top_n_test=int(r.post_nms_top_n_test),
      rpn_nms_threshold=_fraction("rpn.nms_threshold", r.nms_threshold),
      rpn_min_size=float(_positive("rpn.min_size", r.min_size, 0.0, inclusive=True)),
      rpn_batch_size_per_image=int(r.batch_size_per_image),
      rpn_positive_fraction=_fraction("rpn.positive_fraction", r.positive_fraction),
      rpn_positive_iou=_fraction("rpn.positive_iou", r.positive_iou),
      rpn_negative_iou=_fraction("rpn.negative_iou", r.negative_iou),
      rpn_allowed_border=float(r.allowed_border),
      rpn_box_loss_weight=float(r.box_loss_weight),
      rpn_sigma=float(_positive("rpn.sigma", r.sigma)),
      roi_batch_size_per_image=int(o.batch_size_per_image),
      roi_fg_fraction=_fraction("roi.fg_fraction", o.fg_fraction),
      roi_fg_iou=_fraction("roi.fg_iou", o.fg_iou),
      roi_bg_iou_lo=_fraction("roi.bg_iou_lo", o.bg_iou_lo),
      roi_box_weights=tuple(float(w) for w in o.box_weights),
      roi_box_loss_weight=float(o.box_loss_weight),
      roi_sigma=float(_positive("roi.sigma", o.sigma)),
      test_nms_threshold=_fraction("test.nms_threshold", t.nms_threshold),
      test_score_threshold=float(t.score_threshold),
      test_detections_per_image=int(t.detections_per_image),
      test_min_size=float(_positive("test.min_size", t.min_size, 0.0, inclusive=True)),
      loss_mode=_choice("train.loss_mode", config.train.loss_mode, detector.LOSS_MODES),
  )


# --- Training: parameters, optimizer and data sources from the config (training engineer). ---


def init_params_from_config(config: ml_collections.ConfigDict, model: faster_rcnn.FasterRCNN,
                            key) -> dict:
  """Initial parameters: random init, then `model.pretrained` weights merged in if given.

  Raises:
    FileNotFoundError: `model.pretrained` names a file that does not exist.
  """
  params = faster_rcnn.init_params(model, key)
  path = config.model.pretrained
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"model.pretrained={path!r} does not exist; create it from ImageNet VGG16 weights "
          f"with `python scripts/convert_vgg16.py --input VGG16.v2.caffemodel --output {path}` "
          "(or a Keras .h5 / torchvision .pth, see the README) or set "
          "--config.model.pretrained=''")
    params = faster_rcnn.load_pretrained(params, path, input_norm=config.model.input_norm)
  if config.train.init_from:
    params = _params_of_run(config.train.init_from, params)
  return params


def _params_of_run(workdir: str, like: dict) -> dict:
  """The newest checkpoint's parameters of the run in `workdir` (`train.init_from`).

  Raises:
    FileNotFoundError: no checkpoint there.
    ValueError: its parameters differ from `like`'s in structure, shape or dtype.
  """
  params, step = restore.restore_params(workdir, parallel.make_mesh())
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), like)
  found = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if jax.tree.structure(like) != jax.tree.structure(params) or expected != found:
    raise ValueError(f"train.init_from={workdir!r}: its checkpoint {step} holds parameters of "
                     "another model (layers, shapes or dtypes differ from this config's)")
  return params


# What each train.loss_mode trains (the frozen trunk blocks aside); README "Alternating training".
TRAINED_PARTS = {"joint": ("trunk", "rpn", "head"), "rpn": ("trunk", "rpn"),
                 "head": ("trunk", "head")}


def optimizer_from_config(config: ml_collections.ConfigDict, params,
                          model: faster_rcnn.FasterRCNN):
  """The optimizer of `config.train` for `params` (frozen trunk blocks and the parts that
  `train.loss_mode` does not train masked: neither updated nor decayed).

  Step counts in the config (num_steps, warmup_steps, lr_boundaries) count train steps; with
  `train.grad_accum_steps = k` an update happens every k steps, so the schedule runs on
  step // k.

  Returns:
    (optax transformation, learning-rate schedule of the update count).
  """
  t = config.train
  _choice("train.optimizer", t.optimizer, ("sgd", "adamw"))
  k = int(_positive("train.grad_accum_steps", t.grad_accum_steps, 1, inclusive=True))
  lr_fn = optim.make_schedule(
      float(t.learning_rate), schedule=_choice("train.schedule", t.schedule,
                                               ("piecewise", "cosine")),
      num_steps=max(t.num_steps // k, 1), warmup_steps=t.warmup_steps // k,
      boundaries=tuple(b // k for b in t.lr_boundaries), decay=float(t.lr_decay))
  parts = TRAINED_PARTS[_choice("train.loss_mode", t.loss_mode, TRAINED_PARTS)]
  tx = optim.make_optimizer(
      params, lr_fn, optimizer=t.optimizer, momentum=float(t.momentum),
      weight_decay=float(t.weight_decay),
      bias_lr_mult=float(t.bias_lr_mult), bias_weight_decay=bool(t.bias_weight_decay),
      trainable=faster_rcnn.trainable_mask(model, params, parts),
      grad_clip_norm=float(t.grad_clip_norm), grad_accum_steps=k)
  return tx, lr_fn


def source_from_config(config: ml_collections.ConfigDict, split: str):
  """The dataset source of the train split ("train") or the eval split ("eval").

  The train split of a file-backed dataset leaves out images without an object that training
  uses when `data.drop_images_without_objects` (`sources.WithObjects`); the eval split is whole.

  The train split carries the stored proposals of `data.proposals` when given
  (`proposal_store.WithProposals`, for `train.loss_mode` "head").

  Raises:
    ValueError / FileNotFoundError: unknown dataset name or missing data (naming the path).
  """
  d = config.data
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if split == "train" and (config.train.loss_mode == "head") != bool(d.proposals):
    raise ValueError("train.loss_mode=head trains on stored proposals: give data.proposals "
                     "with it and only with it (python -m frcnn_jax.dump_proposals)")
  source = _dataset_source(config, split)
  if split == "train" and d.proposals:
    source = proposal_store.WithProposals(source, proposal_store.load(d.proposals),
                                          int(d.num_proposals))
  return source


def _dataset_source(config: ml_collections.ConfigDict, split: str):
  """The dataset's own source of "train" or "eval" (see `source_from_config`)."""
  d = config.data
  if d.name == "shapes":
    return shapes.ShapesSource(
        d.shapes_num_train if split == "train" else d.shapes_num_test,
        split="train" if split == "train" else "test", image_size=d.shapes_image_size,
        seed=config.seed,
        cache_bytes=int(_positive("data.shapes_cache_mb", d.shapes_cache_mb, 0, True) * 2**20))
  if split == "train":
    source = sources.make_source(d.name, d.train_split, data_dir=d.data_dir, years=d.years,
                                 classes=d.classes, bad_input=d.bad_input,
                                 annotation_file=d.coco_train_json,
                                 image_dir=d.coco_train_images, training=True)
    return sources.WithObjects(source) if d.drop_images_without_objects else source
  return sources.make_source(d.name, d.eval_split, data_dir=d.data_dir, years=(d.eval_year,),
                             classes=d.classes, bad_input=d.bad_input,
                             annotation_file=d.coco_eval_json, image_dir=d.coco_eval_images,
                             training=False)


def canvases_from_config(config: ml_collections.ConfigDict, source=None,
                         sizes=None) -> tuple[tuple[int, int], ...]:
  """The static canvases (h, w) of `config.data` (README "Canvases").

  `data.pad_hw` (one canvas) or `data.canvases` when given; otherwise `data.num_canvases`
  canvases chosen for the resized sizes of `source`'s records (or of `sizes`, original
  (height, width) pairs, e.g. the images `detect` is given), sides multiples of
  `data.canvas_multiple`; with neither, for `GENERIC_ASPECTS` (common photo shapes).

  Raises:
    ValueError: naming the key: both pad_hw and canvases given, a side of data.canvases
      that is not a positive multiple of the trunk's stride (`model.anchor_stride`; pad_hw,
      the fixed canvas of older configs, may be any size), or num_canvases < 1.
  """
  d = config.data
  stride = int(config.model.anchor_stride)
  if len(d.pad_hw) and len(d.canvases):
    raise ValueError("give data.canvases or data.pad_hw (one canvas), not both")
  multiple = int(d.canvas_multiple)
  if multiple <= 0 or multiple % stride:
    raise ValueError(f"data.canvas_multiple={multiple} must be a positive multiple of the "
                     f"trunk's stride model.anchor_stride={stride}")
  _positive("data.num_canvases", d.num_canvases, 1, inclusive=True)
  if len(d.pad_hw):   # the one fixed canvas of older configs: any size
    return pipeline.check_canvases([d.pad_hw], "data.pad_hw")
  if len(d.canvases):
    found = pipeline.check_canvases(d.canvases)
    bad = [c for c in found if c[0] % stride or c[1] % stride]
    if bad:
      raise ValueError(f"data.canvases: canvas sides must be multiples of the trunk's stride "
                       f"model.anchor_stride={stride}, got {bad}")
    return found
  kw = dict(min_size=int(d.min_size), max_size=int(d.max_size))
  if source is not None:
    return canvas_lib.canvases_for_source(source, num_canvases=int(d.num_canvases),
                                          multiple=multiple, **kw)
  hws = GENERIC_ASPECTS if sizes is None else sizes
  resized = [canvas_lib.resized_hw(hw, **kw) for hw in hws]
  return canvas_lib.choose_canvases(resized, int(d.num_canvases), multiple)


# (height, width) of common photo shapes: the canvases of an export (or of `detect` without
# images) when the config names none: 4:3, 3:2, 16:9, 1:1, 2:1, each both ways.
GENERIC_ASPECTS = ((3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9), (1, 1), (1, 2), (2, 1))


def compilation_cache_from_config(config: ml_collections.ConfigDict) -> str | None:
  """Turns on JAX's persistent compilation cache in `train.compilation_cache_dir` ("": off).

  Call before the first compilation. A resumed run, an evaluation or an export then loads
  the programs an earlier run compiled (one per canvas) instead of compiling them again.
  The environment variable JAX_COMPILATION_CACHE_DIR, when set, takes precedence.

  Returns:
    The cache folder, or None when off.
  """
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or config.train.compilation_cache_dir
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


RESIZE_ON = ("auto", "host", "device")   # data.resize_on
_WORKERS_PER_DEVICE = 4   # the most data.num_workers chooses per local accelerator


def resize_on_device(config: ml_collections.ConfigDict) -> bool:
  """Whether the device resizes, flips and pads the images (`data.resize_on`).

  "auto" is the device on GPUs and TPUs (the host then only decodes) and the host on the CPU
  backend (where the device op, dense products, costs more than Pillow).

  Raises:
    ValueError: an unknown value, naming the key.
  """
  value = _choice("data.resize_on", str(config.data.resize_on), RESIZE_ON)
  if value == "auto":
    return jax.default_backend() != "cpu"
  return value == "device"


def num_workers_from_config(config: ml_collections.ConfigDict) -> int:
  """Input worker processes on this host: `data.num_workers`, or chosen when it is None.

  The choice: 1 on the CPU backend (the step uses every core and consumes a few images per
  second; one worker decodes and transforms about a hundred). On GPUs and TPUs, the host's
  usable cores less two (the training process and its input thread), at most
  `_WORKERS_PER_DEVICE` per local device (a core decodes about 800 VOC images/s when the
  device resizes, about 150 when the host does: scripts/bench_input.py), and at least 1.

  Raises:
    ValueError: a negative count.
  """
  workers = config.data.num_workers
  if workers is not None:
    if int(workers) < 0:
      raise ValueError(f"data.num_workers must be >= 0 or None (auto), got {workers}")
    return int(workers)
  if jax.default_backend() == "cpu":
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min((cores or 1) - 2, _WORKERS_PER_DEVICE * jax.local_device_count()))


def train_data_from_config(config: ml_collections.ConfigDict, source, mesh):
  """The training input iterator: this process's shard, global Batches sharded on `mesh`.

  Its position can be saved and restored (`get_state` / `set_state`, see checkpointing.py).
  """
  d = config.data
  return pipeline.train_loader(
      source, batch_size=config.train.batch_size, seed=config.seed, min_size=d.min_size,
      max_size=d.max_size, canvases=canvases_from_config(config, source), max_gt=d.max_gt,
      flip=d.flip, num_workers=num_workers_from_config(config), prefetch=d.prefetch,
      mesh=mesh, resize_on_device=resize_on_device(config))


def eval_data_from_config(config: ml_collections.ConfigDict, source, mesh=None):
  """One pass over the eval split: this process's numpy slices of the eval Batches.

  Canvases are chosen for the eval split's own sizes (no image shrunk) unless the config
  names them. `mesh` is accepted for symmetry with `train_data_from_config`; the evaluator
  assembles the slices into global arrays itself.
  """
  del mesh
  d = config.data
  return pipeline.eval_batches(
      source, batch_size=config.eval.batch_size, min_size=d.min_size, max_size=d.max_size,
      canvases=canvases_from_config(config, source), max_gt=d.max_gt,
      num_workers=num_workers_from_config(config), resize_on_device=resize_on_device(config))
