"""torchvision's Faster R-CNN built like ours, for each of our backbones, timed on the same
device: the peer.

Needs torch and torchvision (optional: `pip install torch torchvision`); without them every
entry point raises `PeerUnavailable` saying what is missing. `scripts/benchmark.py --peer`
times `measure` beside our rows; `--mix ... --peer` uses `size_runners` (one model, one image
per step at each image's own size, timed interleaved with ours); `scripts/bench_backbones.py`
times `runners` interleaved with ours; `scripts/peer_torchvision.py` times it alone.
`frcnn_jax.benchmarking.peer` reads every number below from an experiment config.

The models (`PEERS`, keyed by our `model.backbone` name; random weights):

* vgg16: torchvision's `vgg16().features[:-1]` (conv1_1 .. conv5_3, stride 16, 512 channels;
  the first `frozen_blocks` blocks frozen, the pools in ceil mode where ours round up) and a
  `TwoMLPHead` of `fc_dim` (fc6, fc7; no dropout).
* zf: py-faster-rcnn's ZF as an `nn.Sequential` of torch layers (the table of
  `frcnn_jax/models/backbones/zf.py`: conv1 7x7/2, conv2 5x5/2, conv3 .. conv5 3x3 with 96,
  256, 384, 384, 256 channels; after conv1 and conv2 Caffe's WITHIN_CHANNEL LRN (`WithinLRN`:
  torch's `nn.LocalResponseNorm` normalises across channels, ZF within a channel) and a 3x3/2
  pad 1 max pool, ceil mode as ours), stride 16, 256 channels, and the same `TwoMLPHead`.
* resnet_c4: torchvision's `resnet50` / `resnet101` (`FrozenBatchNorm2d`) stem + layer1 ..
  layer3 as the backbone (stride 16, 1024 channels; the first `frozen_stages` of stem, layer1,
  layer2, layer3 frozen), the RoI op of torchvision.ops on it, and layer4 + global average
  pooling as the box head (`FastRCNNPredictor` on 2048).
* resnet_fpn: torchvision's own `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)`
  as it is built with ImageNet weights (`FrozenBatchNorm2d` everywhere; the first
  `frozen_stages` of stem, layer1 .. layer4 frozen, 2 = its default trainable_backbone_layers
  of 3), its `MultiScaleRoIAlign` on P2 .. P5 and a `TwoMLPHead` of `fc_dim` (its own: 1024).

Shared by all (`DetectorArgs`, from our `anchors`, `rpn`, `roi`, `test` and `model.roi_*`
keys): anchor sizes per feature map and aspect ratios, proposal counts before / after NMS in
training and at test, the RPN's NMS, IoU thresholds, sampled anchors and minimum box size, the
RoI op of the single-map models (`roi_pool` or `roi_align` of torchvision.ops at 1 / stride,
our size, sampling ratio and alignment), sampled RoIs, foreground fraction and IoU, box
weights, and the test NMS, score threshold and detections per image. Images are not resized
(min_size / max_size are the image's own sides) nor padded beyond their size (size_divisible
1; FPN keeps its 32), so both models see the same pixels.

Timed: a training step (forward with targets, the summed losses' backward, SGD with momentum
0.9 and weight decay 5e-4 over the parameters that are not frozen) and inference
(`model.eval()`, `torch.inference_mode()`), each after one warm-up run, the median of `steps`
runs, synchronising the device around each. bfloat16 runs under `torch.autocast`.
"""

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from frcnn_jax.models.backbones import resnet as resnet_layout
from frcnn_jax.models.backbones import zf as zf_layout

DTYPES = ("float32", "bfloat16")
FPN_MAPS = ("0", "1", "2", "3", "pool")   # torchvision's FPN levels P2 .. P6 (P6: the RPN's only)
FPN_ROI_MAPS = FPN_MAPS[:4]
FPN_ANCHOR_SIZES = ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))   # torchvision's, per map


class PeerUnavailable(RuntimeError):
  """torch or torchvision is not installed (or too old), or the config's model has no
  torchvision peer; the message says which."""


@dataclasses.dataclass(frozen=True)
class DetectorArgs:
  """The numbers every peer takes from our config. The defaults are experiments/voc.py's but
  for the RoI op: RoIAlign 7 x 7 (sampling ratio 2), the VGG16 peer of earlier runs.

  Attributes:
    anchor_sizes: anchor sides of each feature map (one tuple per map, finest first).
    anchor_ratios: aspect ratios h / w (every map).
    pre_nms_train: boxes entering the RPN's NMS in training (per map in torchvision).
    post_nms_train: proposals kept in training.
    pre_nms_test: boxes entering NMS at test time.
    post_nms_test: proposals kept at test time.
    rpn_nms: the RPN's NMS IoU.
    rpn_fg_iou: IoU that makes an anchor positive.
    rpn_bg_iou: IoU under which an anchor is negative.
    rpn_batch: anchors sampled per image.
    rpn_positive_fraction: largest share of positives among them.
    rpn_min_size: proposals with a side under this many pixels are dropped.
    roi_op: "roi_align" or "roi_pool" (single-map models; FPN's is MultiScaleRoIAlign).
    roi_size: RoI op output side.
    sampling_ratio: roi_align's samples per bin side.
    aligned: roi_align's half-pixel offset (single-map models).
    stride: the single map's stride (RoI scale 1 / stride).
    roi_batch: RoIs sampled per image.
    roi_fg_fraction: largest foreground share among them.
    roi_fg_iou: IoU that makes a RoI foreground (background below it).
    box_weights: the box coder's weights.
    test_nms: per-class NMS IoU of the detections.
    score_threshold: detections scoring at most this are dropped.
    detections: detections kept per image.
  """
  anchor_sizes: tuple[tuple[float, ...], ...] = ((128.0, 256.0, 512.0),)
  anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  pre_nms_train: int = 12000
  post_nms_train: int = 2000
  pre_nms_test: int = 6000
  post_nms_test: int = 300
  rpn_nms: float = 0.7
  rpn_fg_iou: float = 0.7
  rpn_bg_iou: float = 0.3
  rpn_batch: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_min_size: float = 1e-3
  roi_op: str = "roi_align"
  roi_size: int = 7
  sampling_ratio: int = 2
  aligned: bool = False
  stride: int = 16
  roi_batch: int = 128
  roi_fg_fraction: float = 0.25
  roi_fg_iou: float = 0.5
  box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
  test_nms: float = 0.3
  score_threshold: float = 0.05
  detections: int = 100


def import_torch():
  """Returns (torch, torchvision) or raises PeerUnavailable naming what is missing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise PeerUnavailable(
        f"torch is not installed ({e}); the torchvision peer needs torch and torchvision "
        "(pip install torch torchvision)") from e
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    from torchvision.models import detection  # noqa: F401  pylint: disable=unused-import
  except (ImportError, RuntimeError) as e:
    raise PeerUnavailable(
        f"torchvision is not installed or does not load ({type(e).__name__}: {e}); the peer "
        f"needs torchvision matching torch {torch.__version__} (pip install torchvision)") from e
  return torch, torchvision


def _device(torch, dtype: str, device: str | None, threads: int | None):
  """Checks `dtype`, picks the device (CUDA when available) and returns (device, sync), where
  sync() waits for the device's queued work; on CPU it sets torch's thread count."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  if device not in ("cpu", "cuda"):
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
  if device == "cpu":
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return device, lambda: None
  return device, torch.cuda.synchronize


def random_batch(batch: int, height: int, width: int, num_gt: int = 5, num_classes: int = 20,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """Random uint8 images and `num_gt` random boxes per image (numpy, Batch-like keys).

  Returns:
    {"image": uint8 [B, H, W, 3], "gt_boxes": float32 [B, G, 4] xyxy, "gt_labels": int32 [B, G]
     in 1..C, "gt_valid": bool [B, G]}, G = num_gt.
  """
  rng = np.random.default_rng(seed)
  x1 = rng.uniform(0, 0.6 * width, (batch, num_gt))
  y1 = rng.uniform(0, 0.6 * height, (batch, num_gt))
  bw = rng.uniform(min(32, 0.2 * width), 0.4 * width, (batch, num_gt))
  bh = rng.uniform(min(32, 0.2 * height), 0.4 * height, (batch, num_gt))
  return {
      "image": rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
      "gt_boxes": np.stack([x1, y1, x1 + bw, y1 + bh], -1).astype(np.float32),
      "gt_labels": rng.integers(1, num_classes + 1, (batch, num_gt)).astype(np.int32),
      "gt_valid": np.ones((batch, num_gt), bool),
  }


# --- The parts: trunks, RoI ops and box heads in torch. ---


def within_channel_lrn(torch, local_size: int, alpha: float, beta: float):
  """Caffe's WITHIN_CHANNEL LRN as a torch module (ZF's norm1 / norm2; `frcnn_jax.ops.lrn`):
  y = x * (1 + alpha * a)^-beta, a the zero-padded n x n average of x^2 (divided by n^2)."""
  functional = torch.nn.functional

  class WithinLRN(torch.nn.Module):

    def forward(self, x):
      a = functional.avg_pool2d(x * x, local_size, 1, (local_size - 1) // 2,
                                count_include_pad=True)
      return x * (1.0 + alpha * a).pow(-beta)

  return WithinLRN()


def _single_map_roi(torch, torchvision, d: DetectorArgs):
  """The RoI op of `d` on the trunk's one map ("0"), as FasterRCNN calls its box_roi_pool."""
  ops = torchvision.ops

  class SingleMapRoI(torch.nn.Module):

    def forward(self, features, proposals, image_shapes):
      del image_shapes
      x = features["0"]
      if d.roi_op == "roi_pool":
        return ops.roi_pool(x, proposals, d.roi_size, 1.0 / d.stride)
      return ops.roi_align(x, proposals, d.roi_size, 1.0 / d.stride, d.sampling_ratio,
                           d.aligned)

  if d.roi_op not in ("roi_pool", "roi_align"):
    raise ValueError(f"roi_op must be roi_pool or roi_align, got {d.roi_op!r}")
  return SingleMapRoI()


def _freeze(modules) -> None:
  for module in modules:
    for p in module.parameters():
      p.requires_grad_(False)


def vgg16_parts(torch, torchvision, d: DetectorArgs, *, frozen_blocks: int = 2,
                fc_dim: int = 4096, pool_ceil_mode: bool = False):
  """(trunk, box_head, head_channels) of the VGG16 peer."""
  trunk = torchvision.models.vgg16(weights=None).features[:-1]   # drop pool5: stride 16
  pools_seen = 0
  for layer in trunk:
    if pools_seen < frozen_blocks:
      _freeze([layer])
    if isinstance(layer, torch.nn.MaxPool2d):
      layer.ceil_mode = pool_ceil_mode
      pools_seen += 1
  trunk.out_channels = 512
  head = torchvision.models.detection.faster_rcnn.TwoMLPHead(512 * d.roi_size**2, fc_dim)
  return trunk, head, fc_dim


def zf_parts(torch, torchvision, d: DetectorArgs, *, frozen_layers: int = 0,
             fc_dim: int = 4096, pool_ceil_mode: bool = True):
  """(trunk, box_head, head_channels) of the ZF peer (layers of `zf_layout`)."""
  nn = torch.nn
  layers, channels = [], 3
  for index, ((kernel, stride, pad), out) in enumerate(
      zip(zf_layout.CONVS, zf_layout.BASE_CHANNELS), 1):
    conv = nn.Conv2d(channels, out, kernel, stride, pad)
    if index <= frozen_layers:
      _freeze([conv])
    layers += [conv, nn.ReLU(inplace=True)]
    if index <= zf_layout.NORMED:
      layers += [within_channel_lrn(torch, zf_layout.LRN_SIZE, zf_layout.LRN_ALPHA,
                                    zf_layout.LRN_BETA),
                 nn.MaxPool2d(zf_layout.POOL_KERNEL, zf_layout.POOL_STRIDE, zf_layout.POOL_PAD,
                              ceil_mode=pool_ceil_mode)]
    channels = out
  trunk = nn.Sequential(*layers)
  trunk.out_channels = channels
  head = torchvision.models.detection.faster_rcnn.TwoMLPHead(channels * d.roi_size**2, fc_dim)
  return trunk, head, fc_dim


def _frozen_resnet(torchvision, depth: int):
  """torchvision's ResNet-`depth` (random weights) with FrozenBatchNorm2d."""
  builders = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
  if depth not in builders:
    raise ValueError(f"depth must be one of {sorted(builders)}, got {depth}")
  return builders[depth](weights=None, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)


def _stages(net) -> list[list[Any]]:
  """The stem (conv1, bn1) and layer1 .. layer4 of a torchvision ResNet, as module lists."""
  return [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]


def resnet_c4_parts(torch, torchvision, d: DetectorArgs, *, depth: int = 50,
                    frozen_stages: int = 2):
  """(trunk, box_head, head_channels) of the ResNet C4 peer: stem + layer1 .. layer3, and
  layer4 + average pooling as the box head."""
  del d
  nn = torch.nn
  net = _frozen_resnet(torchvision, depth)
  for stage in _stages(net)[:frozen_stages]:
    _freeze(stage)
  trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                        net.layer3)
  trunk.out_channels = resnet_layout.PLANES[2] * resnet_layout.EXPANSION
  head = nn.Sequential(net.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
  return trunk, head, resnet_layout.PLANES[3] * resnet_layout.EXPANSION


def _faster_rcnn(torch, torchvision, trunk, box_head, head_channels: int, d: DetectorArgs, *,
                 height: int, width: int, num_classes: int):
  """torchvision's FasterRCNN around a single-map trunk and box head, with `d`'s numbers."""
  detection = torchvision.models.detection
  model = detection.FasterRCNN(
      trunk, num_classes=None,
      min_size=min(height, width), max_size=max(height, width),   # scale exactly 1
      rpn_anchor_generator=detection.rpn.AnchorGenerator(
          sizes=tuple(tuple(s) for s in d.anchor_sizes),
          aspect_ratios=(tuple(d.anchor_ratios),) * len(d.anchor_sizes)),
      rpn_pre_nms_top_n_train=d.pre_nms_train, rpn_post_nms_top_n_train=d.post_nms_train,
      rpn_pre_nms_top_n_test=d.pre_nms_test, rpn_post_nms_top_n_test=d.post_nms_test,
      rpn_nms_thresh=d.rpn_nms, rpn_fg_iou_thresh=d.rpn_fg_iou, rpn_bg_iou_thresh=d.rpn_bg_iou,
      rpn_batch_size_per_image=d.rpn_batch, rpn_positive_fraction=d.rpn_positive_fraction,
      box_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0"], d.roi_size, d.sampling_ratio),
      box_head=box_head,
      box_predictor=detection.faster_rcnn.FastRCNNPredictor(head_channels, num_classes + 1),
      box_score_thresh=d.score_threshold, box_nms_thresh=d.test_nms,
      box_detections_per_img=d.detections, box_fg_iou_thresh=d.roi_fg_iou,
      box_bg_iou_thresh=d.roi_fg_iou, box_batch_size_per_image=d.roi_batch,
      box_positive_fraction=d.roi_fg_fraction, bbox_reg_weights=tuple(d.box_weights))
  # FasterRCNN takes a MultiScaleRoIAlign only; ours is the config's op at 1 / stride.
  model.roi_heads.box_roi_pool = _single_map_roi(torch, torchvision, d)
  model.transform.size_divisible = 1   # no padding beyond the image (ours: the canvas itself)
  model.rpn.min_size = d.rpn_min_size
  return model


def build_resnet_fpn(torch, torchvision, d: DetectorArgs, *, height: int, width: int,
                     num_classes: int, frozen_stages: int = 2, fc_dim: int = 1024,
                     canonical_scale: int = 224, canonical_level: int = 4):
  """torchvision's `fasterrcnn_resnet50_fpn` with `d`'s numbers, frozen batch norm and the
  first `frozen_stages` stages frozen (module docstring)."""
  detection = torchvision.models.detection
  frozen_bn = torchvision.ops.misc.FrozenBatchNorm2d
  if len(d.anchor_sizes) != len(FPN_MAPS):
    raise ValueError(f"the FPN peer has {len(FPN_MAPS)} feature maps, got anchor sizes for "
                     f"{len(d.anchor_sizes)}")
  model = detection.fasterrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=num_classes + 1,
      min_size=min(height, width), max_size=max(height, width),
      rpn_anchor_generator=detection.rpn.AnchorGenerator(
          sizes=tuple(tuple(s) for s in d.anchor_sizes),
          aspect_ratios=(tuple(d.anchor_ratios),) * len(FPN_MAPS)),
      rpn_pre_nms_top_n_train=d.pre_nms_train, rpn_post_nms_top_n_train=d.post_nms_train,
      rpn_pre_nms_top_n_test=d.pre_nms_test, rpn_post_nms_top_n_test=d.post_nms_test,
      rpn_nms_thresh=d.rpn_nms, rpn_fg_iou_thresh=d.rpn_fg_iou, rpn_bg_iou_thresh=d.rpn_bg_iou,
      rpn_batch_size_per_image=d.rpn_batch, rpn_positive_fraction=d.rpn_positive_fraction,
      box_roi_pool=torchvision.ops.MultiScaleRoIAlign(
          list(FPN_ROI_MAPS), d.roi_size, d.sampling_ratio, canonical_scale=canonical_scale,
          canonical_level=canonical_level),
      box_head=detection.faster_rcnn.TwoMLPHead(256 * d.roi_size**2, fc_dim),
      box_score_thresh=d.score_threshold, box_nms_thresh=d.test_nms,
      box_detections_per_img=d.detections, box_fg_iou_thresh=d.roi_fg_iou,
      box_bg_iou_thresh=d.roi_fg_iou, box_batch_size_per_image=d.roi_batch,
      box_positive_fraction=d.roi_fg_fraction, bbox_reg_weights=tuple(d.box_weights))
  model.roi_heads.box_predictor = detection.faster_rcnn.FastRCNNPredictor(fc_dim,
                                                                         num_classes + 1)
  body = model.backbone.body
  for block in list(body.modules()):   # batch norm as torchvision builds it with ImageNet weights
    for name, child in list(block.named_children()):
      if isinstance(child, torch.nn.BatchNorm2d):
        setattr(block, name, frozen_bn(child.num_features))
  for stage in [[body.conv1], [body.layer1], [body.layer2], [body.layer3],
                [body.layer4]][:frozen_stages]:
    _freeze(stage)
  model.rpn.min_size = d.rpn_min_size
  return model


PARTS = {"vgg16": vgg16_parts, "zf": zf_parts, "resnet_c4": resnet_c4_parts}
# The registry: our backbone name -> how torchvision's same architecture is built.
PEERS = (*PARTS, "resnet_fpn")


def build_model(torch, torchvision, *, height: int, width: int, num_classes: int,
                backbone: str = "vgg16", detector: DetectorArgs | None = None, **arch):
  """torchvision's FasterRCNN of our `backbone` with `detector`'s numbers (random weights).

  Args:
    torch: the torch module.
    torchvision: the torchvision module.
    height: image height (the transform keeps it: scale 1).
    width: image width.
    num_classes: C foreground classes.
    backbone: one of PEERS.
    detector: the shared numbers (default: `DetectorArgs()`).
    **arch: the backbone's own arguments (vgg16: frozen_blocks, fc_dim, pool_ceil_mode; zf:
      frozen_layers, fc_dim, pool_ceil_mode; resnet_c4: depth, frozen_stages; resnet_fpn:
      frozen_stages, fc_dim, canonical_scale, canonical_level).

  Raises:
    ValueError: an unknown backbone or a bad argument.
  """
  d = detector or DetectorArgs()
  if backbone == "resnet_fpn":
    return build_resnet_fpn(torch, torchvision, d, height=height, width=width,
                            num_classes=num_classes, **arch)
  if backbone not in PARTS:
    raise ValueError(f"no torchvision peer for backbone {backbone!r}; peers: {PEERS}")
  trunk, head, channels = PARTS[backbone](torch, torchvision, d, **arch)
  return _faster_rcnn(torch, torchvision, trunk, head, channels, d, height=height, width=width,
                      num_classes=num_classes)


def _run_seconds(fn: Callable[[], Any], steps: int, sync: Callable[[], None]) -> list[float]:
  """Wall seconds of `steps` calls of `fn` after one warm-up call, the device synchronised
  around each."""
  fn()
  sync()
  times = []
  for _ in range(steps):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return times


def _tensors(torch, batch_arrays: dict[str, np.ndarray], device: str):
  """Images (float [3, H, W] in 0..1) and targets of a numpy batch, on `device`."""
  images = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).to(device).float()
            / 255.0 for im in batch_arrays["image"]]
  targets = []
  for boxes, labels, valid in zip(batch_arrays["gt_boxes"], batch_arrays["gt_labels"],
                                  batch_arrays["gt_valid"]):
    targets.append({"boxes": torch.from_numpy(boxes[valid]).to(device),
                    "labels": torch.from_numpy(labels[valid].astype(np.int64)).to(device)})
  return images, targets


class _Peer:
  """A built peer on its device: the model, its optimizer and the two steps."""

  def __init__(self, height: int, width: int, *, dtype: str, num_classes: int,
               device: str | None, threads: int | None, model_args: dict[str, Any]):
    torch, torchvision = import_torch()
    self.torch, self.torchvision = torch, torchvision
    self.device, self.sync = _device(torch, dtype, device, threads)
    self.dtype = dtype
    if self.device == "cuda":
      torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    self.model = build_model(torch, torchvision, height=height, width=width,
                             num_classes=num_classes, **model_args).to(self.device)
    self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad],
                                     lr=1e-3, momentum=0.9, weight_decay=5e-4)

  def autocast(self):
    return self.torch.autocast(device_type=self.device, dtype=self.torch.bfloat16,
                               enabled=self.dtype == "bfloat16")

  def train_step(self, images, targets) -> None:
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with self.autocast():
      losses = self.model(images, targets)
    sum(losses.values()).backward()
    self.optimizer.step()

  def infer(self, images) -> None:
    self.model.eval()
    with self.torch.inference_mode(), self.autocast():
      self.model(images)

  def info(self) -> dict[str, Any]:
    torch = self.torch
    return {"device": self.device if self.device == "cpu"
            else f"cuda:{torch.cuda.get_device_name()}",
            "dtype": self.dtype, "torch": torch.__version__,
            "torchvision": self.torchvision.__version__, "threads": torch.get_num_threads()}

  def release(self) -> None:
    """Frees the model's device memory."""
    self.model = self.optimizer = None
    if self.device == "cuda":
      self.torch.cuda.empty_cache()


def measure(batch_arrays: dict[str, np.ndarray], *, steps: int = 3, dtype: str = "float32",
            num_classes: int = 20, device: str | None = None, threads: int | None = None,
            **model_args) -> dict[str, Any]:
  """Times torchvision's training step and inference on one batch.

  Args:
    batch_arrays: numpy {"image" uint8 [B, H, W, 3], "gt_boxes" [B, G, 4], "gt_labels" [B, G],
      "gt_valid" [B, G]} (e.g. `random_batch`, or the batch our benchmark uses).
    steps: timed runs of each (after one warm-up run); the median is reported.
    dtype: "float32" or "bfloat16" (autocast).
    num_classes: C foreground classes.
    device: "cpu" or "cuda" (default: cuda when available).
    threads: CPU intra-op threads (default: every core, as XLA uses).
    **model_args: forwarded to `build_model` (backbone, detector and the backbone's own).

  Returns:
    {"train_step_s", "infer_s" (median seconds per image), "train_runs_s", "infer_runs_s"
     (seconds per step), "device", "dtype", "torch", "torchvision", "threads", "height",
     "width", "batch", "backbone"}.

  Raises:
    PeerUnavailable: torch or torchvision is missing.
    ValueError: unknown dtype, device or backbone.
  """
  b, height, width, _ = batch_arrays["image"].shape
  peer = _Peer(height, width, dtype=dtype, num_classes=num_classes, device=device,
               threads=threads, model_args=model_args)
  images, targets = _tensors(peer.torch, batch_arrays, peer.device)
  train_times = _run_seconds(lambda: peer.train_step(images, targets), steps, peer.sync)
  infer_times = _run_seconds(lambda: peer.infer(images), steps, peer.sync)
  result = {
      "train_step_s": statistics.median(train_times) / b,
      "infer_s": statistics.median(infer_times) / b,
      "train_runs_s": train_times, "infer_runs_s": infer_times, **peer.info(),
      "height": height, "width": width, "batch": b,
      "backbone": model_args.get("backbone", "vgg16"),
  }
  peer.release()
  return result


def runners(batch_arrays: dict[str, np.ndarray], *, dtype: str = "float32",
            num_classes: int = 20, device: str | None = None, threads: int | None = None,
            **model_args) -> dict[str, Any]:
  """One model and its training step and inference on one batch, to time beside ours.

  Args:
    batch_arrays: as `measure`'s.
    dtype: "float32" or "bfloat16" (autocast).
    num_classes: C foreground classes.
    device: "cpu" or "cuda" (default: cuda when available).
    threads: CPU intra-op threads (default: every core).
    **model_args: forwarded to `build_model`.

  Returns:
    {"train": fn, "infer": fn, "info": {"device", "dtype", "torch", "torchvision", "threads"},
     "model": the torch model, "release": fn}; each of train / infer runs one step and returns
    when the device is done; release() frees the model (drop "model" too).

  Raises:
    PeerUnavailable: torch or torchvision is missing.
    ValueError: unknown dtype, device or backbone.
  """
  _, height, width, _ = batch_arrays["image"].shape
  peer = _Peer(height, width, dtype=dtype, num_classes=num_classes, device=device,
               threads=threads, model_args=model_args)
  images, targets = _tensors(peer.torch, batch_arrays, peer.device)

  def train():
    peer.train_step(images, targets)
    peer.sync()

  def infer():
    peer.infer(images)
    peer.sync()

  return {"train": train, "infer": infer, "info": peer.info(), "model": peer.model,
          "release": peer.release}


def size_runners(sizes: list[tuple[int, int]], *, dtype: str = "float32", num_classes: int = 20,
                 device: str | None = None, threads: int | None = None, num_gt: int = 5,
                 **model_args) -> dict[str, Any]:
  """One model and, per image size, a training step and an inference on one image of it.

  For a size mix: torchvision trains and infers on each image at its own size (batch 1, no
  canvas). One model serves every size; before each call its transform is set to that size
  (`min_size` = the shorter side, `max_size` = the longer: scale exactly 1), so the runs of
  different sizes share weights and optimizer state as consecutive training steps do.

  Args:
    sizes: (height, width) of the images, one random uint8 image with `num_gt` random boxes
      each (`random_batch`, seed = the size's index).
    dtype: "float32" or "bfloat16" (autocast).
    num_classes: C foreground classes.
    device: "cpu" or "cuda" (default: cuda when available).
    threads: CPU intra-op threads (default: every core).
    num_gt: ground-truth boxes per image.
    **model_args: forwarded to `build_model`.

  Returns:
    {"train": {size: fn}, "infer": {size: fn}, "info": {"device", "dtype", "torch",
     "torchvision", "threads"}}; each fn runs one step and returns when the device is done.

  Raises:
    PeerUnavailable: torch or torchvision is missing.
    ValueError: unknown dtype, device or backbone, or no sizes.
  """
  import_torch()
  if not sizes:
    raise ValueError("no sizes to run the peer at")
  height, width = sizes[0]
  peer = _Peer(height, width, dtype=dtype, num_classes=num_classes, device=device,
               threads=threads, model_args=model_args)

  def runners_of(index: int, hw: tuple[int, int]):
    images, targets = _tensors(peer.torch, random_batch(1, hw[0], hw[1], num_gt, num_classes,
                                                        seed=index), peer.device)

    def set_size():
      peer.model.transform.min_size = (min(hw),)
      peer.model.transform.max_size = max(hw)

    def train_step():
      set_size()
      peer.train_step(images, targets)
      peer.sync()

    def infer():
      set_size()
      peer.infer(images)
      peer.sync()

    return train_step, infer

  out = {"train": {}, "infer": {}}
  for i, hw in enumerate(sizes):
    hw = (int(hw[0]), int(hw[1]))
    out["train"][hw], out["infer"][hw] = runners_of(i, hw)
  out["info"] = peer.info()
  return out
