"""Converts a torchvision Faster R-CNN ResNet-50-FPN (v1) state dict to the .npz of the whole
`resnet_fpn` network: trunk, RPN and `fc` RoI head.

Usage:
  python scripts/convert_torchvision_detector.py \
      --input fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --bn_eps 0 --output weights/r50_fpn.npz
  python scripts/convert_torchvision_detector.py --input state_dict.npz --output FILE

The input is the state dict of `fasterrcnn_resnet50_fpn(num_classes=N)` (any N; a .pth / .pt,
needs torch, or a .npz of its arrays; a training checkpoint's "model" entry is taken). Its keys
map to the parameter paths of `ResNetFPN` ("trunk/..."), `RPNHead` ("rpn/...") and `FCHead`
("head/...") with "/" between module, layer and leaf:

  backbone.body.<layer>.<leaf>           -> trunk/<layer>/<leaf> (as scripts/convert_resnet.py)
  backbone.fpn.inner_blocks.i.0.*        -> trunk/fpn/inner_blocks.i/{kernel, bias}
  backbone.fpn.layer_blocks.i.0.*        -> trunk/fpn/layer_blocks.i/{kernel, bias}
  rpn.head.conv.0.0.*                    -> rpn/conv
  rpn.head.cls_logits.*, bbox_pred.*     -> rpn/objectness (1 sigmoid logit per anchor), deltas
  roi_heads.box_head.fc6.*, fc7.*        -> head/fc6, head/fc7
  roi_heads.box_predictor.cls_score.*    -> head/cls
  roi_heads.box_predictor.bbox_pred.*    -> head/box ((N + 1) x 4, class-major)

Convolution kernels become HWIO and dense kernels [in, out]; fc6's rows are permuted from
torchvision's (C, 7, 7) flattening of the pooled RoI to ours (7, 7, C). `num_batches_tracked`
is dropped. Batch norm is our frozen one with eps 1e-5: a file whose model ran with another eps
(`--bn_eps`; torchvision's own COCO weights, FasterRCNN_ResNet50_FPN_Weights.COCO_V1, run with
eps 0: `overwrite_eps(model, 0.0)`) has its batch norm weights scaled by
sqrt((running_var + 1e-5) / (running_var + bn_eps)), which is the same transform. The
metadata: "source", "input_norm" ("torchvision": RGB / 255 with ImageNet's mean / std),
"pixel_mean", "pixel_std", "stride_in_1x1" (false), "num_classes" (N) and "bn_eps".
Run it with model.backbone=resnet_fpn, model.roi_head=fc, model.fc.dim=1024,
model.fc.dropout=0, model.rpn_objectness=sigmoid, three anchor ratios and the file's classes
(experiments/coco_r50_fpn.py). An existing output file is not overwritten unless `--overwrite`
is given.
"""

import argparse
import math
import re
from collections.abc import Mapping

import numpy as np

from frcnn_jax.models import pretrained

INPUT_NORM = "torchvision"
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-5          # our FrozenBatchNorm's; torchvision's BatchNorm2d / FrozenBatchNorm2d default
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
_BODY_KEY = re.compile(r"^backbone\.body\.(?:(layer\d+\.\d+)\.)?((?:conv|bn)\d+|downsample\.[01])"
                       r"\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_BN_LAYER = re.compile(r"^(bn\d+|downsample\.1)$")
# FPN and RPN keys, with or without the Conv2dNormActivation level (torchvision's _version 1).
_FPN_KEY = re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)(?:\.0)?\.(weight|bias)$")
_OTHER_KEYS = {
    re.compile(r"^rpn\.head\.conv(?:\.0\.0)?\.(weight|bias)$"): "rpn/conv",
    re.compile(r"^rpn\.head\.cls_logits\.(weight|bias)$"): "rpn/objectness",
    re.compile(r"^rpn\.head\.bbox_pred\.(weight|bias)$"): "rpn/deltas",
    re.compile(r"^roi_heads\.box_head\.fc6\.(weight|bias)$"): "head/fc6",
    re.compile(r"^roi_heads\.box_head\.fc7\.(weight|bias)$"): "head/fc7",
    re.compile(r"^roi_heads\.box_predictor\.cls_score\.(weight|bias)$"): "head/cls",
    re.compile(r"^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$"): "head/box",
}
# One array of each part the network needs (the others are checked by load_pretrained).
REQUIRED = ("trunk/conv1/kernel", "trunk/fpn/inner_blocks.0/kernel", "rpn/conv/kernel",
            "rpn/objectness/kernel", "rpn/deltas/kernel", "head/fc6/kernel", "head/fc7/kernel",
            "head/cls/kernel", "head/box/kernel")


def _name(key: str) -> tuple[str, str] | None:
  """(our layer path, torchvision leaf) of a state dict key; None for an unknown key."""
  match = _BODY_KEY.match(key)
  if match:
    block, layer, leaf = match.groups()
    return "/".join(p for p in ("trunk", block, layer) if p), leaf
  match = _FPN_KEY.match(key)
  if match:
    blocks, index, leaf = match.groups()
    return f"trunk/fpn/{blocks}.{index}", leaf
  for pattern, layer in _OTHER_KEYS.items():
    match = pattern.match(key)
    if match:
      return layer, match.group(1)
  return None


def _rank(layer: str, leaf: str) -> int:
  """Rank of a torchvision array: 4 for a convolution's weight, 2 for a linear layer's, else 1
  (biases, batch norm's four vectors)."""
  if leaf != "weight" or _BN_LAYER.match(layer.rsplit("/", 1)[-1]):
    return 1
  return 2 if layer.startswith("head/") else 4


def _fc6_kernel(weight: np.ndarray, channels: int) -> np.ndarray:
  """torchvision's fc6 weight [D, C * r * r] (inputs flattened C, H, W) -> our [r * r * C, D]
  kernel (inputs flattened H, W, C)."""
  dim, inputs = weight.shape
  side = math.isqrt(inputs // channels) if inputs % channels == 0 else 0
  if side * side * channels != inputs:
    raise ValueError(f"roi_heads.box_head.fc6.weight has {inputs} inputs, not C x r x r pooled "
                     f"features of the pyramid's C = {channels} channels")
  return weight.reshape(dim, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, dim)


def convert_detector(state_dict: Mapping[str, np.ndarray],
                     bn_eps: float = BN_EPS) -> dict[str, np.ndarray]:
  """Maps a `fasterrcnn_resnet50_fpn` state dict (numpy arrays) to frcnn_jax names.

  Args:
    state_dict: torchvision's keys ("backbone.body.conv1.weight" [out, in, kh, kw],
      "backbone.fpn.inner_blocks.0.0.bias", "rpn.head.cls_logits.weight",
      "roi_heads.box_predictor.bbox_pred.weight" [(N + 1) * 4, 1024] ...).
    bn_eps: the batch norm eps the state dict's model ran with (1e-5: torchvision's default;
      0 for FasterRCNN_ResNet50_FPN_Weights.COCO_V1); folded into the batch norm weights.

  Returns:
    {"trunk/conv1/kernel" HWIO, "trunk/layer1.0/bn1/running_var", "trunk/fpn/inner_blocks.0/
    kernel", "rpn/conv/kernel", "head/fc6/kernel" [7 * 7 * C, 1024], "head/box/bias", ...}
    float32 arrays: every parameter of ResNetFPN, RPNHead and FCHead.

  Raises:
    ValueError: a key that is not such a detector's (another model, Mask / Keypoint R-CNN,
      fasterrcnn_resnet50_fpn_v2), an array of an unexpected rank, or a part missing.
  """
  out = {}
  for key, value in state_dict.items():
    name = _name(key)
    if name is None:
      raise ValueError(f"{key!r} is not a key of torchvision's fasterrcnn_resnet50_fpn (v1) "
                       "state dict")
    layer, leaf = name
    if leaf == "num_batches_tracked":
      continue
    value = np.asarray(value, np.float32)
    expected_rank = _rank(layer, leaf)
    if value.ndim != expected_rank:
      raise ValueError(f"{key!r} has shape {value.shape}; expected a {expected_rank}-D array")
    if leaf == "weight" and value.ndim == 4:
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 2:
      leaf, value = "kernel", value.T
    out[f"{layer}/{leaf}"] = value
  missing = [name for name in REQUIRED if name not in out]
  if missing:
    raise ValueError(f"not a whole fasterrcnn_resnet50_fpn state dict: no {missing} (of "
                     "backbone.body, backbone.fpn, rpn.head, roi_heads)")
  channels = out["trunk/fpn/inner_blocks.0/kernel"].shape[-1]
  out["head/fc6/kernel"] = _fc6_kernel(out["head/fc6/kernel"].T, channels)
  if bn_eps != BN_EPS:
    for name in [n for n in out if n.endswith("/running_var")]:
      layer = name.rsplit("/", 1)[0]
      var = out[name].astype(np.float64)
      factor = np.sqrt((var + BN_EPS) / (var + bn_eps))
      out[f"{layer}/weight"] = (out[f"{layer}/weight"] * factor).astype(np.float32)
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Loads a state dict: a .pth / .pt (needs torch; a checkpoint's "model" entry if it has
  one) or a .npz of its arrays."""
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  import torch  # pylint: disable=import-outside-toplevel
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state.get("model"), Mapping):
    state = state["model"]
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def save(arrays: Mapping[str, np.ndarray], output: str, bn_eps: float = BN_EPS) -> None:
  """Writes the converted arrays and their metadata to `output` (.npz)."""
  num_classes = arrays["head/cls/bias"].shape[0] - 1
  np.savez(output, input_norm=np.asarray(INPUT_NORM), source=np.asarray("torchvision_detector"),
           pixel_mean=np.asarray(PIXEL_MEAN, np.float64),
           pixel_std=np.asarray(PIXEL_STD, np.float64), stride_in_1x1=np.asarray(False),
           num_classes=np.asarray(num_classes), bn_eps=np.asarray(bn_eps, np.float64),
           **arrays)


def main(argv: list[str] | None = None) -> None:
  extra = argparse.ArgumentParser(add_help=False)
  extra.add_argument("--bn_eps", type=float, default=BN_EPS)
  known, rest = extra.parse_known_args(argv)
  description = (__doc__.split("\n\n")[0] + " --bn_eps EPS: the batch norm eps the weights "
                 "ran with (default 1e-5; 0 for torchvision's COCO_V1 weights).")
  args = pretrained.converter_arguments(
      description, "torchvision fasterrcnn_resnet50_fpn state dict (.pth / .pt, or .npz)", rest)
  arrays = convert_detector(read_state_dict(args.input), known.bn_eps)
  save(arrays, args.output, known.bn_eps)
  num_classes = arrays["head/cls/bias"].shape[0] - 1
  print(f"wrote {len(arrays)} arrays ({num_classes} classes, batch norm eps {known.bn_eps}) to "
        f"{args.output}: use --config.model.pretrained={args.output} with "
        f"experiments/coco_r50_fpn.py's model (model.backbone=resnet_fpn, model.roi_head=fc)")


if __name__ == "__main__":
  main()
