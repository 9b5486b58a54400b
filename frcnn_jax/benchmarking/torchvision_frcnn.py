"""torchvision's Faster R-CNN built like ours, timed on the same device: the peer.

Needs torch and torchvision (optional: `pip install torch torchvision`); without them every
entry point raises `PeerUnavailable` saying what is missing. `scripts/benchmark.py
--peer` times `measure` beside our rows; `--mix ... --peer` uses `size_runners` (one model,
one image per step at each image's own size, timed interleaved with ours);
`scripts/peer_torchvision.py` times it alone.

The model: torchvision's `FasterRCNN` with the VGG16 trunk `vgg16().features[:-1]` (conv1_1 ..
conv5_3, stride 16, 512 channels; conv1/conv2 frozen as in ours), one feature map "0" with
anchors of sizes (128, 256, 512) and aspect ratios (0.5, 1, 2), `MultiScaleRoIAlign(["0"], 7, 2)`,
a 4096-wide two-layer MLP head (`TwoMLPHead`, no dropout) and `FastRCNNPredictor` for C + 1
classes, the same proposal counts (pre/post NMS 12000/2000 in training, 6000/300 at test), 256
sampled anchors, 128 sampled RoIs, test NMS 0.3, score 0.05, 100 detections, random weights.
Images are not resized (min_size / max_size are the image's own sides) nor padded beyond their
size (size_divisible 1), so both models see the same pixels.

Timed: a training step (forward with targets, the summed losses' backward, SGD with momentum
0.9 and weight decay 5e-4) and inference (`model.eval()`, `torch.inference_mode()`), each after
one warm-up run, the median of `steps` runs, synchronising the device around each. bfloat16
runs under `torch.autocast`.
"""

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DTYPES = ("float32", "bfloat16")


class PeerUnavailable(RuntimeError):
  """torch or torchvision is not installed (or too old); the message says which."""


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


def build_model(torch, torchvision, *, height: int, width: int, num_classes: int,
                frozen_blocks: int = 2, fc_dim: int = 4096, pre_nms_train: int = 12000,
                post_nms_train: int = 2000, pre_nms_test: int = 6000, post_nms_test: int = 300,
                rpn_batch: int = 256, roi_batch: int = 128, test_nms: float = 0.3,
                score_threshold: float = 0.05, detections: int = 100):
  """torchvision FasterRCNN with the VGG16 trunk and our head sizes (random weights)."""
  detection = torchvision.models.detection
  trunk = torchvision.models.vgg16(weights=None).features[:-1]   # drop pool5: stride 16
  pools_seen = 0
  for layer in trunk:
    if pools_seen < frozen_blocks:
      for p in layer.parameters():
        p.requires_grad_(False)
    if isinstance(layer, torch.nn.MaxPool2d):
      pools_seen += 1
  trunk.out_channels = 512
  model = detection.FasterRCNN(
      trunk, num_classes=None,
      min_size=min(height, width), max_size=max(height, width),   # scale exactly 1
      rpn_anchor_generator=detection.rpn.AnchorGenerator(
          sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)),
      rpn_pre_nms_top_n_train=pre_nms_train, rpn_post_nms_top_n_train=post_nms_train,
      rpn_pre_nms_top_n_test=pre_nms_test, rpn_post_nms_top_n_test=post_nms_test,
      rpn_nms_thresh=0.7, rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3,
      rpn_batch_size_per_image=rpn_batch, rpn_positive_fraction=0.5,
      box_roi_pool=torchvision.ops.MultiScaleRoIAlign(featmap_names=["0"], output_size=7,
                                                      sampling_ratio=2),
      box_head=detection.faster_rcnn.TwoMLPHead(512 * 7 * 7, fc_dim),
      box_predictor=detection.faster_rcnn.FastRCNNPredictor(fc_dim, num_classes + 1),
      box_score_thresh=score_threshold, box_nms_thresh=test_nms,
      box_detections_per_img=detections, box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5,
      box_batch_size_per_image=roi_batch, box_positive_fraction=0.25,
      bbox_reg_weights=(10.0, 10.0, 5.0, 5.0))
  model.transform.size_divisible = 1   # no padding beyond the image (ours: the canvas itself)
  return model


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
    **model_args: forwarded to `build_model` (frozen_blocks, fc_dim, proposal counts, ...).

  Returns:
    {"train_step_s", "infer_s" (median seconds per image), "train_runs_s", "infer_runs_s"
     (seconds per step), "device", "dtype", "torch", "torchvision", "threads", "height",
     "width", "batch"}.

  Raises:
    PeerUnavailable: torch or torchvision is missing.
    ValueError: unknown dtype or device.
  """
  torch, torchvision = import_torch()
  device, sync = _device(torch, dtype, device, threads)
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
  images_np = batch_arrays["image"]
  b, height, width, _ = images_np.shape
  torch.manual_seed(0)
  model = build_model(torch, torchvision, height=height, width=width, num_classes=num_classes,
                      **model_args).to(device)
  images = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).to(device).float()
            / 255.0 for im in images_np]
  targets = []
  for boxes, labels, valid in zip(batch_arrays["gt_boxes"], batch_arrays["gt_labels"],
                                  batch_arrays["gt_valid"]):
    targets.append({"boxes": torch.from_numpy(boxes[valid]).to(device),
                    "labels": torch.from_numpy(labels[valid].astype(np.int64)).to(device)})
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.9, weight_decay=5e-4)
  autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16,
                                    enabled=dtype == "bfloat16")

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()

  def infer():
    with torch.inference_mode(), autocast():
      model(images)

  model.train()
  train_times = _run_seconds(train_step, steps, sync)
  model.eval()
  infer_times = _run_seconds(infer, steps, sync)
  result = {
      "train_step_s": statistics.median(train_times) / b,
      "infer_s": statistics.median(infer_times) / b,
      "train_runs_s": train_times, "infer_runs_s": infer_times,
      "device": device if device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
      "dtype": dtype, "torch": torch.__version__, "torchvision": torchvision.__version__,
      "threads": torch.get_num_threads(), "height": height, "width": width, "batch": b,
  }
  model = optimizer = images = targets = None   # frees their device memory
  if device == "cuda":
    torch.cuda.empty_cache()
  return result


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
    ValueError: unknown dtype or device, or no sizes.
  """
  torch, torchvision = import_torch()
  if not sizes:
    raise ValueError("no sizes to run the peer at")
  device, sync = _device(torch, dtype, device, threads)
  torch.manual_seed(0)
  height, width = sizes[0]
  model = build_model(torch, torchvision, height=height, width=width, num_classes=num_classes,
                      **model_args).to(device)
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.9, weight_decay=5e-4)
  autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16,
                                    enabled=dtype == "bfloat16")

  def runners(index: int, hw: tuple[int, int]):
    arrays = random_batch(1, hw[0], hw[1], num_gt, num_classes, seed=index)
    image = torch.from_numpy(np.ascontiguousarray(arrays["image"][0].transpose(2, 0, 1))
                             ).to(device).float() / 255.0
    target = {"boxes": torch.from_numpy(arrays["gt_boxes"][0]).to(device),
              "labels": torch.from_numpy(arrays["gt_labels"][0].astype(np.int64)).to(device)}

    def set_size():
      model.transform.min_size = (min(hw),)
      model.transform.max_size = max(hw)

    def train_step():
      set_size()
      model.train()
      optimizer.zero_grad(set_to_none=True)
      with autocast():
        losses = model([image], [target])
      sum(losses.values()).backward()
      optimizer.step()
      sync()

    def infer():
      set_size()
      model.eval()
      with torch.inference_mode(), autocast():
        model([image])
      sync()

    return train_step, infer

  out = {"train": {}, "infer": {}}
  for i, hw in enumerate(sizes):
    hw = (int(hw[0]), int(hw[1]))
    out["train"][hw], out["infer"][hw] = runners(i, hw)
  out["info"] = {
      "device": device if device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
      "dtype": dtype, "torch": torch.__version__, "torchvision": torchvision.__version__,
      "threads": torch.get_num_threads()}
  return out
