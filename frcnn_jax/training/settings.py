"""The `train`, `eval` and `alt_opt` config sections (keys, defaults, meaning, allowed values)."""

import dataclasses

from frcnn_jax.config.fields import setting
from frcnn_jax.detection.settings import LOSS_MODES

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cosine")
NONFINITE = ("error", "skip")
METRICS = ("voc07", "voc12", "coco")


def _ascending(value: tuple) -> str:
  return "" if list(value) == sorted(value) else "must be ascending"


def _per_stage(value: tuple) -> str:
  return "" if len(value) == 4 else "needs one entry per stage (4)"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """`train`: the optimiser, its schedule, checkpoints and what the loss trains."""
  num_steps: int = setting(70000, "train steps", role="training", minimum=1)
  batch_size: int = setting(1, "images per step, over all devices and hosts",
                            role="training", minimum=1)
  optimizer: str = setting("sgd", "sgd (Caffe SGD, the paper) | adamw", role="training",
                           choices=OPTIMIZERS)
  learning_rate: float = setting(1e-3, "per update (batch_size x grad_accum_steps images); "
                                 "the scaling rule: experiments/voc.py", role="training",
                                 minimum=0.0)
  momentum: float = setting(0.9, "SGD momentum / AdamW b1", role="training", minimum=0.0,
                            check=lambda m: "" if m < 1 else "must be < 1")
  weight_decay: float = setting(5e-4, "L2 weight decay", role="training", minimum=0.0)
  bias_lr_mult: float = setting(2.0, "biases learn this much faster (py-faster-rcnn: 2)",
                                role="training", minimum=0.0)
  bias_weight_decay: bool = setting(True, "biases are decayed too (Caffe's default)",
                                    role="training")
  schedule: str = setting("piecewise", "piecewise | cosine", role="training",
                          choices=SCHEDULES)
  warmup_steps: int = setting(0, "linear warm-up steps", role="training", minimum=0)
  lr_boundaries: tuple[int, ...] = setting((50000,), "steps where the piecewise rate drops",
                                           role="training", minimum=0, check=_ascending)
  lr_decay: float = setting(0.1, "factor at each boundary", role="training", minimum=0.0)
  grad_clip_norm: float = setting(0.0, "global gradient-norm clip (0: off)", role="training",
                                  minimum=0.0)
  grad_accum_steps: int = setting(1, "steps whose gradients make one update",
                                  role="training", minimum=1)
  checkpoint_every: int = setting(5000, "steps between checkpoints", role="training",
                                  minimum=1)
  keep_checkpoints: int = setting(3, "newest checkpoints kept", role="training", minimum=1)
  log_every: int = setting(20, "steps between metric lines", role="training", minimum=1)
  eval_every: int = setting(0, "steps between evaluations (0: only at the end)",
                            role="training", minimum=0)
  nonfinite: str = setting("error", "a non-finite loss or gradient: error | skip (the "
                           "update is skipped and counted)", role="training", choices=NONFINITE)
  loss_mode: str = setting("joint", "joint (end to end) | rpn (RPN only) | head (detection "
                           "head on data.proposals): the stages of alt_opt", role="training",
                           choices=LOSS_MODES)
  init_from: str = setting("", "run folder whose newest checkpoint's parameters start this "
                           "run (instead of model.pretrained)", role="training")
  reuse_host_memory: str = setting("auto", "glibc keeps freed memory: auto (XLA:CPU only) | "
                                   "on | off", role="local", choices=("auto", "on", "off"))
  compilation_cache_dir: str = setting("~/.cache/frcnn_jax/jax_cache", "JAX's persistent "
                                       "compilation cache (\"\": off)", role="local")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """`eval`: how the eval split is scored."""
  batch_size: int = setting(1, "images per step, over all devices and hosts", role="local",
                            minimum=1)
  metric: str = setting("voc07", "voc07 (11-point AP) | voc12 (area) | coco (AP@[.5:.95])",
                        role="test", choices=METRICS)
  iou_threshold: float = setting(0.5, "IoU that makes a detection a match (VOC metrics)",
                                 role="test", above=0.0, maximum=1.0)


@dataclasses.dataclass(frozen=True)
class AltOptSettings:
  """`alt_opt`: the paper's 4-step training (frcnn_jax.alt_opt): 1 RPN, 2 Fast R-CNN on 1's
  proposals, 3 RPN and 4 Fast R-CNN with the shared convs frozen; per-stage values."""
  num_steps: tuple[int, ...] = setting((80000, 40000, 80000, 40000), "steps of stages 1-4 "
                                       "(they replace train.num_steps)", role="training",
                                       minimum=1, check=_per_stage)
  lr_boundaries: tuple[tuple[int, ...], ...] = setting(
      ((60000,), (30000,), (60000,), (30000,)), "each stage's learning-rate drops",
      role="training", minimum=0, check=_per_stage)
  batch_size: tuple[int, ...] = setting((1, 2, 1, 2), "images per step of each stage",
                                        role="training", minimum=1, check=_per_stage)
  roi_batch_size_per_image: int = setting(64, "sampled RoIs per image in the Fast R-CNN "
                                          "stages", role="training", minimum=1)
  num_proposals: int = setting(2000, "proposals dumped per training image", role="training",
                               minimum=1)
  pre_nms_top_n: int = setting(-1, "boxes entering the dump's NMS (<= 0: every anchor)",
                               role="training")
