"""The detector's static numbers: anchors, RPN, RoI sampling, test-time decoding, loss weights.

Each class is a config section (`anchors`, `rpn`, `roi`, `test`, `loss`) declared with
`frcnn_jax.config.fields.setting`; `DetectorSettings.from_config` builds them all, checked, in
one call. They are frozen and hashable: the jitted detector functions take them as static
arguments.
"""

import dataclasses
import math

import ml_collections

from frcnn_jax.config import fields
from frcnn_jax.config.fields import setting
from frcnn_jax.ops import anchors as anchor_ops

PROPOSAL_STYLES = ("py-faster-rcnn", "torchvision")
LOSS_MODES = ("joint", "rpn", "head")   # joint (end to end) | rpn (RPN terms only) | head
                                        # (detection terms on stored proposals)


def _non_empty(value: tuple) -> str:
  return "" if len(value) else "must not be empty"


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
  """`anchors`: the reference boxes at every feature-map cell (the stride is the backbone's)."""
  sizes: tuple[float, ...] = setting((128.0, 256.0, 512.0), "anchor sides (sqrt of the area), "
                                     "pixels of the resized image", above=0.0, check=_non_empty)
  ratios: tuple[float, ...] = setting((0.5, 1.0, 2.0), "anchor aspect ratios h / w",
                                      above=0.0, check=_non_empty)
  style: str = setting("exact", "exact (area s^2, h / w = r) | py-faster-rcnn (its "
                       "generate_anchors' rounded shapes: 184 x 96, not 181 x 91) | "
                       "torchvision (its AnchorGenerator: rounded corners, cells' top-left "
                       "corners, stride canvas // feature size)",
                       choices=anchor_ops.ANCHOR_STYLES)

  def per_level(self, num_levels: int) -> tuple[tuple[float, ...], ...]:
    """The sizes of each of `num_levels` feature levels: consecutive equal shares of `sizes`
    (FPN: one size per level, torchvision's 32 .. 512 on P2 .. P6).

    Raises:
      ValueError: `sizes` does not split evenly over the levels.
    """
    if len(self.sizes) % num_levels:
      raise ValueError(f"anchors.sizes={tuple(self.sizes)} must split evenly over the "
                       f"backbone's {num_levels} feature levels (e.g. one size per level)")
    share = len(self.sizes) // num_levels
    return tuple(tuple(self.sizes[i * share:(i + 1) * share]) for i in range(num_levels))

  def per_cell(self, num_levels: int = 1) -> int:
    """Anchors at each location of one level."""
    return len(self.per_level(num_levels)[0]) * len(self.ratios)


@dataclasses.dataclass(frozen=True)
class RPNSettings:
  """`rpn`: proposal generation and the RPN's anchor targets."""
  proposal_style: str = setting(
      "py-faster-rcnn", "py-faster-rcnn (drop boxes under min_size and anchors centred "
      "outside the image, then top-k, NMS) | torchvision (top-k of each feature level, then "
      "clip, drop sides under min_size, NMS that never crosses levels: needed by multi-level "
      "backbones)", role="test", choices=PROPOSAL_STYLES)
  pre_nms_top_n_train: int = setting(12000, "boxes entering NMS per image in training "
                                     "(per feature level in the torchvision style)",
                                     role="training", minimum=1)
  post_nms_top_n_train: int = setting(2000, "proposals kept per image in training",
                                      role="training", minimum=1)
  pre_nms_top_n_test: int = setting(6000, "boxes entering NMS per image at test time "
                                    "(per feature level in the torchvision style)",
                                    role="test", minimum=1)
  post_nms_top_n_test: int = setting(300, "proposals kept per image at test time",
                                     role="test", minimum=1)
  nms_threshold: float = setting(0.7, "IoU above which NMS suppresses a proposal", role="test",
                                 minimum=0.0, maximum=1.0)
  min_size: float = setting(16.0, "proposals with a side under this are dropped (py-faster-"
                            "rcnn style: original-image pixels, scaled by the image scale; "
                            "torchvision style: resized-image pixels, its 1e-3)", role="test",
                            minimum=0.0)
  batch_size_per_image: int = setting(256, "anchors sampled per image for the RPN loss",
                                      role="training", minimum=1)
  positive_fraction: float = setting(0.5, "largest fraction of positives among them",
                                     role="training", minimum=0.0, maximum=1.0)
  positive_iou: float = setting(0.7, "IoU with a ground-truth box that makes an anchor "
                                "positive", role="training", minimum=0.0, maximum=1.0)
  negative_iou: float = setting(0.3, "IoU under which an anchor is negative",
                                role="training", minimum=0.0, maximum=1.0)
  allowed_border: float = setting(0.0, "anchors crossing the image border by more are "
                                  "ignored; < 0 keeps them all", role="training")
  sigma: float = setting(3.0, "smooth L1's sigma of the RPN box loss", role="training",
                         above=0.0)


@dataclasses.dataclass(frozen=True)
class RoISettings:
  """`roi`: the RoIs sampled for the detection loss, and the box coder's weights."""
  batch_size_per_image: int = setting(128, "RoIs sampled per image", role="training",
                                      minimum=1)
  fg_fraction: float = setting(0.25, "largest fraction of foreground RoIs", role="training",
                               minimum=0.0, maximum=1.0)
  fg_iou: float = setting(0.5, "IoU that makes a RoI foreground", role="training",
                          minimum=0.0, maximum=1.0)
  bg_iou_lo: float = setting(0.0, "background RoIs have IoU in [this, fg_iou) (0.1 in the "
                             "paper, 0.0 in py-faster-rcnn end-to-end)", role="training",
                             minimum=0.0, maximum=1.0)
  box_weights: tuple[float, float, float, float] = setting(
      (10.0, 10.0, 5.0, 5.0), "box-delta weights of the detection head (1 / (0.1, 0.1, 0.2, "
      "0.2))", above=0.0, check=lambda w: "" if len(w) == 4 else "must have 4 entries")
  sigma: float = setting(1.0, "smooth L1's sigma of the detection box loss",
                         role="training", above=0.0)


@dataclasses.dataclass(frozen=True)
class TestTimeSettings:
  """`test`: turning class scores and box deltas into detections."""
  nms_threshold: float = setting(0.3, "per-class NMS IoU threshold", role="test",
                                 minimum=0.0, maximum=1.0)
  score_threshold: float = setting(0.05, "detections scoring at most this are dropped",
                                   role="test")
  detections_per_image: int = setting(100, "detections kept per image", role="test",
                                      minimum=1)
  min_size: float = setting(0.01, "drop detections with a side under this (resized-image "
                            "pixels; torchvision's 1e-2); 0 keeps zero-area boxes",
                            role="test", minimum=0.0)


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """`loss`: the weight of each term of the training loss."""
  rpn_cls: float = setting(1.0, "RPN objectness log loss", role="training", minimum=0.0)
  rpn_box: float = setting(1.0, "RPN smooth L1 box loss", role="training", minimum=0.0)
  det_cls: float = setting(1.0, "detection (C+1)-way log loss", role="training", minimum=0.0)
  det_box: float = setting(1.0, "detection smooth L1 box loss", role="training", minimum=0.0)


SECTIONS = {"anchors": AnchorSettings, "rpn": RPNSettings, "roi": RoISettings,
            "test": TestTimeSettings, "loss": LossWeights}


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
  """Everything static about the detector besides the network.

  Attributes:
    anchors, rpn, roi, test, loss: the config sections of the same names.
    strides: the backbone's output stride of each feature level (anchor spacing), finest
      first; one entry for single-map backbones.
    legacy_plus_one: decoded boxes 1 px wider and taller, as py-faster-rcnn's
      bbox_transform_inv (`model.legacy_plus_one`).
    loss_mode: one of `LOSS_MODES` (`train.loss_mode`).
  """
  anchors: AnchorSettings = AnchorSettings()
  rpn: RPNSettings = RPNSettings()
  roi: RoISettings = RoISettings()
  test: TestTimeSettings = TestTimeSettings()
  loss: LossWeights = LossWeights()
  strides: tuple[int, ...] = (16,)
  legacy_plus_one: bool = False
  loss_mode: str = "joint"

  def __post_init__(self):
    if self.loss_mode not in LOSS_MODES:
      raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
    if not self.strides or any(s < 1 or not math.log2(s).is_integer() for s in self.strides):
      raise ValueError(f"strides must be powers of 2, got {self.strides}")
    self.anchors.per_level(len(self.strides))
    if self.legacy_plus_one and self.rpn.proposal_style != "py-faster-rcnn":
      raise ValueError("model.legacy_plus_one reproduces py-faster-rcnn's proposals: it needs "
                       f"rpn.proposal_style='py-faster-rcnn', got {self.rpn.proposal_style!r}")
    if len(self.strides) > 1 and self.rpn.proposal_style != "torchvision":
      raise ValueError(f"a backbone with {len(self.strides)} feature levels needs "
                       "rpn.proposal_style='torchvision' (per-level top-k, NMS within a "
                       f"level), got {self.rpn.proposal_style!r}")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  strides: tuple[int, ...]) -> "DetectorSettings":
    """The settings of `config`'s sections, for a backbone of output strides `strides`.

    Raises:
      frcnn_jax.config.fields.ConfigError: naming the first bad key.
      ValueError: anchors.sizes that do not split over the levels, or a multi-level backbone
        without rpn.proposal_style='torchvision'.
    """
    sections = {name: fields.build(kind, config[name], name) for name, kind in SECTIONS.items()}
    return cls(**sections, strides=tuple(int(s) for s in strides),
               legacy_plus_one=bool(config.model.legacy_plus_one),
               loss_mode=config.train.loss_mode)
