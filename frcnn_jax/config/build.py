"""The one place a config becomes objects: the network, the detector settings, the optimiser,
the dataset sources and the input loaders.

Every key is declared with the class that uses it (frcnn_jax/config/defaults.py assembles
them) and checked when that class is built here, so a bad value stops with the key's name.
"""

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from frcnn_jax.config import defaults
from frcnn_jax.config import fields
from frcnn_jax.config import legacy
from frcnn_jax.config import run as run_config
from frcnn_jax.data import batching
from frcnn_jax.data import canvases as canvas_lib
from frcnn_jax.data import eval_loader
from frcnn_jax.data import pipeline
from frcnn_jax.data import proposal_store
from frcnn_jax.data import settings as data_lib_settings
from frcnn_jax.data import sources  # noqa: F401  pylint: disable=unused-import  # registers
from frcnn_jax.data.sources import base
from frcnn_jax.detection import settings as detection_settings
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models.registry import BACKBONES
from frcnn_jax.models.registry import ROI_HEADS
from frcnn_jax.models.registry import strides_of
from frcnn_jax.models.roi_heads.pooling import MultiScaleRoIPooler
from frcnn_jax.models.roi_heads.pooling import RoIPooler
from frcnn_jax.runtime import parallel
from frcnn_jax.training import optim
from frcnn_jax.training import restore
from frcnn_jax.training import settings as training_settings


def check(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Everything about `config` that can be checked without the data, before a command
  creates anything: every key against its declaration, the network and the detector
  settings, the optimiser, static canvases, and (with `workdir`) that the run folder's
  config.json is not of an earlier key layout.

  Raises:
    ValueError: naming the key (a `fields.ConfigError`, or the message of the part's check).
  """
  defaults.validate(config)
  model_from_config(config, 1)
  detector_settings_from_config(config)
  fields.build(training_settings.TrainSettings, config.train, "train")
  if len(config.data.pad_hw) or len(config.data.canvases):
    canvases_from_config(config)
  if workdir is not None:
    renamed = run_config.legacy_renames(workdir)
    if renamed:
      raise ValueError(
          f"{run_config.config_path(workdir)} was written with config keys that have been "
          f"renamed since ({legacy.describe(renamed)}). Convert it once with `python -m "
          f"frcnn_jax.config --upgrade {workdir}` (the original is kept as config.legacy.json), "
          "then run this command again.")


def backbone_from_config(config: ml_collections.ConfigDict, *, dtype: Any = jnp.float32,
                         conv_grad: str = "xla") -> nn.Module:
  """The backbone `model.backbone` with its section `model.<backbone>`.

  Raises:
    ValueError / ConfigError: an unregistered name or a bad key, naming it.
  """
  name = config.model.backbone
  cls = BACKBONES.get(name)
  return fields.build(cls, config.model[name], f"model.{name}", dtype=dtype,
                      conv_grad=conv_grad)


def model_from_config(config: ml_collections.ConfigDict,
                      num_classes: int) -> faster_rcnn.FasterRCNN:
  """The network of `config.model` (parts by name), `anchors` and `num_classes`.

  Args:
    config: the experiment config.
    num_classes: C foreground classes (the dataset's).

  Raises:
    ValueError: naming the config key of an invalid value.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  m = fields.build(faster_rcnn.ModelSettings, fields.own_keys(config.model), "model")
  conv_grad = m.conv_grad
  if conv_grad == "auto":
    conv_grad = "per_tap" if jax.default_backend() == "cpu" else "xla"
  dtype = faster_rcnn.DTYPES[m.dtype]
  trunk = backbone_from_config(config, dtype=dtype, conv_grad=conv_grad)
  if m.input_norm not in trunk.input_norms:
    raise ValueError(f"model.input_norm={m.input_norm!r} does not fit model.backbone="
                     f"{m.backbone!r}, whose weights come with {trunk.input_norms}")
  pooler = _pooler(m, trunk)
  head_class = ROI_HEADS.get(m.roi_head)
  extra = {"conv_grad": conv_grad} if hasattr(head_class, "conv_grad") else {}
  head = fields.build(head_class, config.model[m.roi_head], f"model.{m.roi_head}",
                      num_classes=int(num_classes), pooler=pooler, dtype=dtype, **extra)
  anchors = fields.build(detection_settings.AnchorSettings, config.anchors, "anchors")
  return faster_rcnn.FasterRCNN(trunk=trunk, head=head, input_norm=m.input_norm,
                                num_anchors=anchors.per_cell(len(strides_of(trunk))),
                                rpn_objectness=m.rpn_objectness, conv_grad=conv_grad,
                                dtype=dtype)


def _pooler(m: faster_rcnn.ModelSettings, trunk) -> RoIPooler | MultiScaleRoIPooler:
  """The RoI feature extraction: on the backbone's one map, or on its first `roi_levels`
  levels by RoI size (multi-level backbones; RoIAlign only, as torchvision's).

  Raises:
    ValueError: model.roi_op='roi_pool' with a multi-level backbone.
  """
  if len(strides_of(trunk)) == 1:
    return RoIPooler(op=m.roi_op, size=m.roi_size, spatial_scale=1.0 / trunk.stride,
                     sampling_ratio=m.roi_sampling_ratio, aligned=m.roi_aligned,
                     pool_coordinates=m.roi_pool_coordinates)
  if m.roi_op != "roi_align":
    raise ValueError(f"model.roi_op={m.roi_op!r} does not fit model.backbone={m.backbone!r}, "
                     "whose RoIs are pooled from several levels: set model.roi_op=roi_align")
  return MultiScaleRoIPooler(
      size=m.roi_size, spatial_scales=tuple(1.0 / s for s in trunk.strides[:trunk.roi_levels]),
      sampling_ratio=m.roi_sampling_ratio, aligned=m.roi_aligned,
      canonical_scale=m.roi_canonical_scale, canonical_level=m.roi_canonical_level,
      gradient=m.roi_grad if m.roi_grad != "auto" else
      ("scatter" if jax.default_backend() == "cpu" else "dense"))


def detector_settings_from_config(config: ml_collections.ConfigDict
                                  ) -> detection_settings.DetectorSettings:
  """The `anchors`, `rpn`, `roi`, `test` and `loss` sections, for the configured backbone.

  Raises:
    ValueError: naming the config key of an invalid value.
  """
  trunk = backbone_from_config(config)
  return detection_settings.DetectorSettings.from_config(
      config, strides_of(trunk))


# --- Training: parameters, optimizer and data sources from the config. ---


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
          f"model.pretrained={path!r} does not exist; "
          f"{model.trunk.pretrained_hint.replace('FILE', path)}; or set "
          "--config.model.pretrained=''")
    params = model.trunk.load_pretrained(params, path, config.model.input_norm)
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


# What each train.loss_mode trains (the frozen trunk blocks aside); docs/alternating_training.md.
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
  t = fields.build(training_settings.TrainSettings, config.train, "train")
  k = t.grad_accum_steps
  lr_fn = optim.make_schedule(
      float(t.learning_rate), schedule=t.schedule,
      num_steps=max(t.num_steps // k, 1), warmup_steps=t.warmup_steps // k,
      boundaries=tuple(b // k for b in t.lr_boundaries), decay=float(t.lr_decay))
  parts = TRAINED_PARTS[t.loss_mode]
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
  uses when `data.drop_images_without_objects` (`base.WithObjects`); the eval split is whole.

  The train split carries the stored proposals of `data.proposals` when given
  (`proposal_store.WithProposals`, for `train.loss_mode` "head").

  Raises:
    ValueError / FileNotFoundError: unknown dataset name or missing data (naming the path).
  """
  d = data_settings(config)
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


def data_settings(config: ml_collections.ConfigDict) -> data_lib_settings.DataSettings:
  """The `data` section, checked (its datasets' subsections aside).

  Raises:
    ValueError: naming the first bad key.
  """
  return fields.build(data_lib_settings.DataSettings, fields.own_keys(config.data), "data")


def source_settings(config: ml_collections.ConfigDict) -> Any:
  """The settings object of the dataset `data.name` (its section `data.<name>`).

  Raises:
    ValueError: an unregistered name, or a bad key of its section, naming it.
  """
  name = config.data.name
  return fields.build(base.SOURCES.get(name), config.data[name], f"data.{name}")


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The dataset's class names (label c is names[c - 1]), read from the data only where the
  dataset keeps them there (COCO-format json)."""
  dataset = source_settings(config)
  return tuple(dataset.class_names() or dataset.make("eval", bad_input=config.data.bad_input,
                                                     seed=config.seed).classes)


def _dataset_source(config: ml_collections.ConfigDict, split: str):
  """The dataset's own source of "train" or "eval" (see `source_from_config`)."""
  dataset = source_settings(config)
  source = dataset.make(split, bad_input=config.data.bad_input, seed=config.seed)
  if (split == "train" and config.data.drop_images_without_objects
      and not getattr(dataset, "always_has_objects", False)):
    return base.WithObjects(source)
  return source


def canvases_from_config(config: ml_collections.ConfigDict, source=None,
                         sizes=None) -> tuple[tuple[int, int], ...]:
  """The static canvases (h, w) of `config.data` (docs/data.md, "Canvases").

  `data.pad_hw` (one canvas) or `data.canvases` when given; otherwise `data.num_canvases`
  canvases chosen for the resized sizes of `source`'s records (or of `sizes`, original
  (height, width) pairs, e.g. the images `detect` is given), sides multiples of
  `data.canvas_multiple`; with neither, for `GENERIC_ASPECTS` (common photo shapes).

  Raises:
    ValueError: naming the key: both pad_hw and canvases given, or a side of data.canvases
      that is not a positive multiple of the backbone's stride (pad_hw, the fixed canvas of
      older configs, may be any size).
  """
  d = data_settings(config)
  stride = backbone_from_config(config).stride
  if len(d.pad_hw) and len(d.canvases):
    raise ValueError("give data.canvases or data.pad_hw (one canvas), not both")
  multiple = int(d.canvas_multiple)
  if multiple <= 0 or multiple % stride:
    raise ValueError(f"data.canvas_multiple={multiple} must be a positive multiple of the "
                     f"backbone's stride {stride} (model.{config.model.backbone})")
  if len(d.pad_hw):   # the one fixed canvas of older configs: any size
    return batching.check_canvases([d.pad_hw], "data.pad_hw")
  if len(d.canvases):
    found = batching.check_canvases(d.canvases)
    bad = [c for c in found if c[0] % stride or c[1] % stride]
    if bad:
      raise ValueError(f"data.canvases: canvas sides must be multiples of the backbone's "
                       f"stride {stride} (model.{config.model.backbone}), got {bad}")
    return found
  kw = {"min_size": int(d.min_size), "max_size": int(d.max_size)}
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


_WORKERS_PER_DEVICE = 4   # the most data.num_workers chooses per local accelerator


def resize_on_device(config: ml_collections.ConfigDict) -> bool:
  """Whether the device resizes, flips and pads the images (`data.resize_on`).

  "auto" is the device on GPUs and TPUs (the host then only decodes) and the host on the CPU
  backend (where the device op, dense products, costs more than Pillow).

  """
  value = data_settings(config).resize_on
  if value == "auto":
    return jax.default_backend() != "cpu"
  return value == "device"


def num_workers_from_config(config: ml_collections.ConfigDict) -> int:
  """Input worker processes on this host: `data.num_workers`, or chosen when it is None.

  The choice: 1 on the CPU backend (the step uses every core and consumes far fewer images
  than one worker prepares). On GPUs and TPUs, the host's usable cores less two (the training
  process and its input thread), at most `_WORKERS_PER_DEVICE` per local device, and at least
  1 (a core's decoding rate, with the device resizing or the host: scripts/bench_input.py,
  docs/performance.md).

  Raises:
    ValueError: a negative count, naming the key.
  """
  workers = data_settings(config).num_workers
  if workers is not None:
    return int(workers)
  if jax.default_backend() == "cpu":
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min((cores or 1) - 2, _WORKERS_PER_DEVICE * jax.local_device_count()))


def train_data_from_config(config: ml_collections.ConfigDict, source, mesh):
  """The training input iterator: this process's shard, global Batches sharded on `mesh`.

  Its position can be saved and restored (`get_state` / `set_state`, see checkpointing.py).
  """
  d = data_settings(config)
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
  d = data_settings(config)
  return eval_loader.eval_batches(
      source, batch_size=config.eval.batch_size, min_size=d.min_size, max_size=d.max_size,
      canvases=canvases_from_config(config, source), max_gt=d.max_gt,
      num_workers=num_workers_from_config(config), resize_on_device=resize_on_device(config))
