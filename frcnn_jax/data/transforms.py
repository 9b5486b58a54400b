"""Per-image transforms: one Example (docs/conventions.md) -> the per-image fields of a Batch.

Pure NumPy/Pillow functions, no JAX: they run in the input pipeline's worker processes.

Resizing (py-faster-rcnn's rule): the image is scaled by one factor

  scale = min(min_size / shorter side, max_size / longer side),

i.e. the shorter side becomes `min_size` unless that would make the longer side exceed
`max_size`; the resized size is (round(H * scale), round(W * scale)). The canvas an image is
placed on (`canvases.assign_canvases`: the smallest that holds this size) never shrinks it.
Only a fixed canvas smaller than the resized size (one explicit `pad_hw`) caps the factor
further, by pad_h / H and pad_w / W, and clamps the size to it. Boxes are multiplied by `scale`
(the same factor for x and y; detections map back by dividing by it) and clipped to the resized
image. Pixels are resampled with Pillow's bilinear filter (antialiased when shrinking).

The image stays uint8 RGB: the model normalises pixels on device (`model.input_norm`). It is
padded with zeros at the bottom and right to the canvas; the true size is `image_hw`. Where the
device resizes (`data.resize_on`), the host ships the decoded image on a fixed source canvas
instead, with the same boxes and sizes, and `frcnn_jax.ops.images` resizes, flips and pads it
as Pillow does here.
"""

import logging
from typing import Any

import numpy as np
from PIL import Image

COUNT_KEYS = ("gt_overflow", "degenerate_boxes")


def resize_scale(hw: tuple[int, int], min_size: int, max_size: int,
                 pad_hw: tuple[int, int] | None = None) -> float:
  """The single resize factor of an image (see the module docstring).

  Args:
    hw: (height, width) of the original image.
    min_size: target of the shorter side.
    max_size: cap on the longer side.
    pad_hw: (height, width) of the canvas the resized image must fit in; None: no canvas cap
      (py-faster-rcnn's rule alone).

  Returns:
    The factor resized / original.

  Raises:
    ValueError: a non-positive size.
  """
  h, w = int(hw[0]), int(hw[1])
  canvas = () if pad_hw is None else tuple(pad_hw)
  if min(h, w) <= 0 or min_size <= 0 or max_size <= 0 or min(canvas, default=1) <= 0:
    raise ValueError(f"sizes must be positive: image {h}x{w}, min_size={min_size}, "
                     f"max_size={max_size}, pad_hw={pad_hw if pad_hw is None else canvas}")
  caps = (canvas[0] / h, canvas[1] / w) if canvas else ()
  return min(min_size / min(h, w), max_size / max(h, w), *caps)


def scaled_hw(hw: tuple[int, int], scale: float,
              pad_hw: tuple[int, int] | None = None) -> tuple[int, int]:
  """The size of an image resized by `scale`: (round(H * scale), round(W * scale)).

  Args:
    hw: (height, width) of the original image.
    scale: resize factor (`resize_scale`).
    pad_hw: clamp the size to this canvas; None: no clamp.

  Returns:
    (h, w), each at least 1 (and at most the canvas).
  """
  h = max(int(round(int(hw[0]) * scale)), 1)
  w = max(int(round(int(hw[1]) * scale)), 1)
  if pad_hw is not None:
    h, w = min(h, int(pad_hw[0])), min(w, int(pad_hw[1]))
  return h, w


def fit_scale(hw: tuple[int, int], min_size: int, max_size: int,
              pad_hw: tuple[int, int]) -> float:
  """The resize factor of an image placed on canvas `pad_hw`.

  py-faster-rcnn's factor when the image it gives fits the canvas (always the case on the
  canvas `canvases.assign_canvases` picks); otherwise also capped by the canvas (one fixed
  canvas smaller than some images).

  Args:
    hw: (height, width) of the original image.
    min_size: target of the shorter side.
    max_size: cap on the longer side.
    pad_hw: (height, width) canvas.

  Returns:
    The factor resized / original.
  """
  scale = resize_scale(hw, min_size, max_size)
  h, w = scaled_hw(hw, scale)
  if h <= pad_hw[0] and w <= pad_hw[1]:
    return scale
  return resize_scale(hw, min_size, max_size, pad_hw)


def resize_boxes(boxes: np.ndarray, scale: float, resized_hw: tuple[int, int]) -> np.ndarray:
  """Scales [N, 4] xyxy boxes by `scale` and clips them to the resized image (h, w).

  Returns:
    float32 [N, 4] = boxes * scale, clipped to [0, w] x [0, h].
  """
  h, w = resized_hw
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(scale)
  return np.clip(boxes, 0.0, np.array([w, h, w, h], np.float32))


def resize(image: np.ndarray, boxes: np.ndarray, scale: float,
           pad_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Resizes an image by `scale` (Pillow bilinear) and scales its boxes by the same factor.

  Args:
    image: uint8 [H, W, 3].
    boxes: [N, 4] xyxy boxes in original pixels.
    scale: resize factor (`resize_scale`).
    pad_hw: the canvas; the resized size is clamped to it.

  Returns:
    image: uint8 [h, w, 3] with h = round(H * scale), w = round(W * scale) (clamped to
      [1, canvas]).
    boxes: float32 [N, 4] = boxes * scale, clipped to [0, w] x [0, h].
  """
  h0, w0 = image.shape[:2]
  h, w = scaled_hw((h0, w0), scale, pad_hw)
  if (h, w) != (h0, w0):
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  return image, resize_boxes(boxes, scale, (h, w))


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
  """Mirrors [N, 4] xyxy boxes in an image `width` wide: x1' = W - x2, x2' = W - x1."""
  width = np.float32(width)
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors an image left-right, with its boxes (`hflip_boxes`).

  Args:
    image: [H, W, C].
    boxes: [N, 4] xyxy boxes in pixels of this image.

  Returns:
    (mirrored image [H, W, C], mirrored boxes float32 [N, 4]).
  """
  return np.ascontiguousarray(image[:, ::-1]), hflip_boxes(boxes, image.shape[1])


def pad_image(image: np.ndarray, pad_hw: tuple[int, int]) -> np.ndarray:
  """Places an image at the top-left of a zero canvas.

  Args:
    image: uint8 [h, w, 3] with h <= pad_h, w <= pad_w.
    pad_hw: (pad_h, pad_w).

  Returns:
    uint8 [pad_h, pad_w, 3].

  Raises:
    ValueError: the image is larger than the canvas.
  """
  h, w = image.shape[:2]
  if h > pad_hw[0] or w > pad_hw[1]:
    raise ValueError(f"image {h}x{w} does not fit the canvas pad_hw={tuple(pad_hw)}")
  canvas = np.zeros((int(pad_hw[0]), int(pad_hw[1]), image.shape[2]), image.dtype)
  canvas[:h, :w] = image
  return canvas


def pad_ground_truth(boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray,
                     max_gt: int, name: str = "") -> tuple[dict[str, np.ndarray], int]:
  """Pads (or cuts) ground truth to `max_gt` slots with a valid mask.

  With more than `max_gt` objects the `max_gt` largest (by area) are kept, in their original
  order, and a warning names the image.

  Args:
    boxes: [N, 4] xyxy boxes.
    labels: [N] labels 1..C.
    difficult: [N] difficult flags.
    max_gt: G, the number of slots.
    name: the image named in the warning.

  Returns:
    ({"gt_boxes" float32 [G, 4], "gt_labels" int32 [G] (0 where invalid), "gt_valid" bool [G],
      "gt_difficult" bool [G]}, number of objects left out).
  """
  n = len(boxes)
  keep = np.arange(n)
  overflow = max(n - max_gt, 0)
  if overflow:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = np.sort(np.argsort(-area, kind="stable")[:max_gt])
    logging.warning("%s: %d objects but data.max_gt=%d; kept the %d largest, left out %d "
                    "(raise data.max_gt)", name, n, max_gt, max_gt, overflow)
  k = len(keep)
  out = {"gt_boxes": np.zeros((max_gt, 4), np.float32),
         "gt_labels": np.zeros((max_gt,), np.int32),
         "gt_valid": np.zeros((max_gt,), bool),
         "gt_difficult": np.zeros((max_gt,), bool)}
  out["gt_boxes"][:k] = boxes[keep]
  out["gt_labels"][:k] = labels[keep]
  out["gt_valid"][:k] = True
  out["gt_difficult"][:k] = difficult[keep]
  return out, overflow


def prepare(example: dict[str, Any], *, min_size: int, max_size: int, pad_hw: tuple[int, int],
            max_gt: int, training: bool, flip: bool = False,
            source_canvas: tuple[int, int] | None = None
            ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Turns one Example into the per-image fields of a Batch.

  Order: drop difficult objects (training only), resize, flip (when `flip`; in the resized
  frame, where image and boxes agree exactly), drop boxes that
  became degenerate (zero width or height after scaling and clipping; counted), pad the image
  to the canvas and the ground truth to `max_gt`.

  With `source_canvas` the pixels are left for the device (`frcnn_jax.ops.images`): the decoded
  image is placed on the zero source canvas unresized, and the fields say how to resize, flip
  and pad it; the boxes, sizes and scale are the same as without.

  Args:
    example: Example dict (docs/conventions.md).
    min_size: target of the shorter side.
    max_size: cap on the longer side.
    pad_hw: (height, width) canvas.
    max_gt: G ground-truth slots.
    training: drop difficult objects (True) or keep them flagged (False).
    flip: mirror the image and its boxes left-right.
    source_canvas: (Hs, Ws), at least the image's size: ship the decoded image on it; None:
      resize, flip and pad here.

  Returns:
    fields: {"image" uint8 [Hp, Wp, 3], "image_hw" int32 [2], "scale" float32 [],
      "gt_boxes" float32 [G, 4] (resized pixels), "gt_labels" int32 [G], "gt_valid" bool [G],
      "gt_difficult" bool [G], "image_id" int32 [], "orig_hw" int32 [2], "valid" bool []};
      with `source_canvas`, "source_image" uint8 [Hs, Ws, 3], "source_hw" int32 [2] (=
      orig_hw), "flip" bool [] and "canvas" uint8 [Hp, Wp, 0] instead of "image".
    counts: {"gt_overflow": objects left out for lack of slots,
      "degenerate_boxes": boxes dropped as degenerate after resizing}.

  Raises:
    ValueError: not a uint8 RGB image, an image id beyond int32, or an image larger than
      `source_canvas`.
  """
  image = example["image"]
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{example.get('name', '?')}: image must be uint8 [H, W, 3], got "
                     f"{image.dtype} {image.shape}")
  name = str(example.get("name", example["image_id"]))
  boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
  labels = np.asarray(example["labels"], np.int32).reshape(-1)
  difficult = np.asarray(example["difficult"], bool).reshape(-1)
  if training:
    easy = ~difficult
    boxes, labels, difficult = boxes[easy], labels[easy], difficult[easy]
  orig_hw = image.shape[:2]
  scale = fit_scale(orig_hw, min_size, max_size, pad_hw)
  if source_canvas is None:
    image, boxes = resize(image, boxes, scale, pad_hw)
    if flip:
      image, boxes = hflip(image, boxes)
    resized_hw = image.shape[:2]
    pixels = {"image": pad_image(image, pad_hw)}
  else:
    if orig_hw[0] > source_canvas[0] or orig_hw[1] > source_canvas[1]:
      raise ValueError(f"{name}: image {orig_hw[0]}x{orig_hw[1]} is larger than its source "
                       f"canvas {tuple(source_canvas)} (its annotation gave a smaller size; "
                       "set data.resize_on=host)")
    resized_hw = scaled_hw(orig_hw, scale, pad_hw)
    boxes = resize_boxes(boxes, scale, resized_hw)
    if flip:
      boxes = hflip_boxes(boxes, resized_hw[1])
    pixels = {"source_image": pad_image(image, source_canvas),
              "source_hw": np.array(orig_hw, np.int32), "flip": np.bool_(flip),
              "canvas": np.zeros((int(pad_hw[0]), int(pad_hw[1]), 0), np.uint8)}
  ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  degenerate = int((~ok).sum())
  if degenerate:
    logging.warning("%s: %d boxes degenerate after resizing by %.4f, dropped", name,
                    degenerate, scale)
  gt, overflow = pad_ground_truth(boxes[ok], labels[ok], difficult[ok], max_gt, name)
  image_id = int(example["image_id"])
  if not 0 <= image_id < 2**31:
    raise ValueError(f"{name}: image_id {image_id} does not fit int32")
  fields = {
      **pixels,
      "image_hw": np.array(resized_hw, np.int32),
      "scale": np.float32(scale),
      **gt,
      "image_id": np.int32(image_id),
      "orig_hw": np.array(orig_hw, np.int32),
      "valid": np.bool_(True),
  }
  if "proposals" in example:
    fields.update(proposal_fields(example["proposals"], example["proposals_valid"], scale,
                                  resized_hw, flip))
  return fields, {"gt_overflow": overflow, "degenerate_boxes": degenerate}


def proposal_fields(proposals: np.ndarray, valid: np.ndarray, scale: float,
                    resized_hw: tuple[int, int], flip: bool) -> dict[str, np.ndarray]:
  """Stored proposals (`proposal_store.WithProposals`) through the ground truth's transforms.

  Scaled by `scale` and clipped to the resized image exactly as `resize` does the boxes, then
  mirrored as `hflip` does when `flip`. Static shape: a proposal that became degenerate is
  masked, not removed.

  Args:
    proposals: [R, 4] xyxy proposals in original-image pixels.
    valid: [R] bool.
    scale: the image's resize factor.
    resized_hw: (h, w) of the resized image.
    flip: the image was mirrored left-right.

  Returns:
    {"proposals" float32 [R, 4] (resized pixels, 0 where invalid), "proposals_valid" bool [R]}.
  """
  boxes = resize_boxes(proposals, scale, resized_hw)
  if flip:
    boxes = hflip_boxes(boxes, resized_hw[1])
  ok = (np.asarray(valid, bool).reshape(-1) & (boxes[:, 2] > boxes[:, 0])
        & (boxes[:, 3] > boxes[:, 1]))
  return {"proposals": np.where(ok[:, None], boxes, 0.0).astype(np.float32),
          "proposals_valid": ok}


def padding_example(pad_hw: tuple[int, int], max_gt: int,
                    source_canvas: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """A black canvas-sized example with valid=False (fills the last eval batch).

  Its image_hw and orig_hw are the canvas (not 0x0) so that no degenerate size reaches the
  model; `valid` False tells consumers to ignore it.

  Returns:
    The per-image Batch fields of `prepare` (with the device's fields when `source_canvas`
    is given; source_hw is then the source canvas): zero image and ground truth, image_id -1.
  """
  canvas = np.array(pad_hw, np.int32)
  if source_canvas is None:
    pixels = {"image": np.zeros((int(pad_hw[0]), int(pad_hw[1]), 3), np.uint8)}
  else:
    pixels = {"source_image": np.zeros((int(source_canvas[0]), int(source_canvas[1]), 3),
                                       np.uint8),
              "source_hw": np.array(source_canvas, np.int32), "flip": np.bool_(False),
              "canvas": np.zeros((int(pad_hw[0]), int(pad_hw[1]), 0), np.uint8)}
  return {
      **pixels,
      "image_hw": canvas.copy(),
      "scale": np.float32(1.0),
      "gt_boxes": np.zeros((max_gt, 4), np.float32),
      "gt_labels": np.zeros((max_gt,), np.int32),
      "gt_valid": np.zeros((max_gt,), bool),
      "gt_difficult": np.zeros((max_gt,), bool),
      "image_id": np.int32(-1),
      "orig_hw": canvas.copy(),
      "valid": np.bool_(False),
  }
