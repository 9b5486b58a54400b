"""Converts ImageNet ResNet-50 / 101 weights (torchvision .pth or .npz state dict, Keras .h5)
to the .npz of the `resnet_c4` backbone and the `res5` RoI head.

Usage:
  python scripts/convert_resnet.py --input resnet50-0676ba61.pth --output weights/r50_tv.npz
  python scripts/convert_resnet.py --input state_dict.npz --output weights/r50_tv.npz
  python scripts/convert_resnet.py --input resnet50_weights_tf_dim_ordering_tf_kernels.h5 \
      --output weights/r50_keras.npz

The .npz holds "conv1/kernel" [7, 7, 3, 64] (HWIO), "bn1/weight", "bn1/bias",
"bn1/running_mean", "bn1/running_var", "layer1.0/conv1/kernel", ..., "layer1.0/downsample.0/
kernel", "layer1.0/downsample.1/weight" ... through "layer4.2/...": torchvision's state dict
names with "/" between block, layer and leaf (the parameter paths of models/backbones/resnet.py;
layer4 is the res5 head's). The classifier (`fc`) and `num_batches_tracked` are dropped. The
metadata: "source", "input_norm", "pixel_mean", "pixel_std" and "stride_in_1x1":
  * torchvision (.pth needs torch; a .npz of the same state dict does not): "torchvision"
    (RGB / 255 with ImageNet mean / std), the stride on the 3x3 convolution (v1.5);
  * Keras (keras.applications ResNet50 / ResNet101, layers `conv1_conv`, `conv1_bn`,
    `conv{s}_block{b}_{0..3}_{conv,bn}`; needs h5py): "keras" (BGR 0..255 minus the mean pixel
    103.939, 116.779, 123.68), the stride on the first 1x1 convolution (the original ResNet:
    set model.resnet_c4.stride_in_1x1 and model.res5.stride_in_1x1). Keras' convolutions have
    a bias and its batch norm eps 1.001e-5; both fold exactly into the frozen batch norm that
    follows (running_mean - bias; running_var + 1.001e-5 - 1e-5).
An existing output file is not overwritten unless `--overwrite` is given.
"""

import re
from typing import Mapping

import numpy as np

from frcnn_jax.models import pretrained

NORMS = {
    "keras": ((103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    "torchvision": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
BN_EPS = 1e-5                 # torchvision's FrozenBatchNorm2d (models/backbones/resnet.py)
KERAS_BN_EPS = 1.001e-5       # keras.applications.resnet's BatchNormalization epsilon
KERAS_BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
_TORCH_KEY = re.compile(r"^(?:(layer\d+\.\d+)\.)?((?:conv|bn)\d+|downsample\.[01])\."
                        r"(weight|bias|running_mean|running_var|num_batches_tracked)$")
_KERAS_LAYER = re.compile(r"^conv(\d+)_(?:block(\d+)_(\d)_)?(conv|bn)$")


def convert_torchvision(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a torchvision ResNet state dict (numpy arrays) to frcnn_jax names.

  Args:
    state_dict: torchvision's keys ("conv1.weight" [out, in, kh, kw], "bn1.running_var",
      "layer1.0.downsample.0.weight", "fc.weight" ...).

  Returns:
    {"conv1/kernel" HWIO, "bn1/weight", "layer1.0/conv1/kernel", ...} float32 arrays.

  Raises:
    ValueError: a key that is not a ResNet's, or no ResNet key at all.
  """
  out = {}
  for key, value in state_dict.items():
    if key.startswith("fc."):
      continue
    match = _TORCH_KEY.match(key)
    if not match:
      raise ValueError(f"{key!r} is not a torchvision ResNet state dict key")
    block, layer, leaf = match.groups()
    if leaf == "num_batches_tracked":
      continue
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
      if leaf != "weight":
        raise ValueError(f"{key!r}: a 4-D array must be a convolution's weight")
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    out["/".join(p for p in (block, layer, leaf) if p)] = value
  if "conv1/kernel" not in out:
    raise ValueError("no conv1.weight: not a torchvision ResNet state dict")
  return out


def read_torchvision(path: str) -> dict[str, np.ndarray]:
  """Loads a torchvision state dict: a .pth / .pt (needs torch) or a .npz of its arrays."""
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  import torch  # pylint: disable=import-outside-toplevel
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
  """Reads Keras's HDF5 weights layout: {layer: {weight's last name part: array}}.

  "conv1_conv/kernel:0" becomes {"conv1_conv": {"kernel": ...}}.

  Raises:
    ValueError: the file has no "layer_names" attribute (not Keras' HDF5 weights layout).
  """
  import h5py  # pylint: disable=import-outside-toplevel
  decode = lambda names: [n.decode() if isinstance(n, bytes) else str(n) for n in names]
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
      raise ValueError(f"{path}: no 'layer_names' attribute; not a Keras HDF5 weights file "
                       "(Keras 3 '.weights.h5' files are not supported)")
    layers = {}
    for layer in decode(root.attrs["layer_names"]):
      names = decode(root[layer].attrs["weight_names"])
      layers[layer] = {name.split("/")[-1].split(":")[0]: np.asarray(root[layer][name],
                                                                    np.float32)
                       for name in names}
  return layers


def _keras_name(stage: int, block: int | None, index: int | None) -> tuple[str, str, str]:
  """(block prefix, conv name, bn name) of Keras' conv{stage}_block{block}_{index}."""
  if block is None:
    return "", "conv1", "bn1"
  prefix = f"layer{stage - 1}.{block - 1}"
  if index == 0:
    return prefix, "downsample.0", "downsample.1"
  return prefix, f"conv{index}", f"bn{index}"


def convert_keras(layers: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Maps keras.applications ResNet50 / 101 layers to frcnn_jax names.

  Each `*_conv` (kernel HWIO, bias) is paired with its `*_bn` (gamma, beta, moving_mean,
  moving_variance); the conv bias and Keras' eps fold into the frozen batch norm.

  Raises:
    ValueError: no ResNet layers, a conv without its batch norm or the reverse, or a batch
      norm without its four weights.
  """
  convs, bns = {}, {}
  for layer, weights in layers.items():
    match = _KERAS_LAYER.match(layer)
    if not match:
      continue
    stage, block, index, kind = match.groups()
    if (block is None) != (stage == "1"):
      continue
    key = _keras_name(int(stage), int(block) if block else None, int(index) if index else None)
    (convs if kind == "conv" else bns)[key] = (layer, weights)
  if not convs:
    raise ValueError("no conv1_conv / conv{s}_block{b}_{i}_conv layers: not a Keras ResNet "
                     "weights file")
  if set(convs) != set(bns):
    unpaired = sorted(layer for key, (layer, _) in {**convs, **bns}.items()
                      if key not in convs or key not in bns)
    raise ValueError(f"Keras layers without their conv / batch norm partner: {unpaired}")
  out = {}
  for key, (layer, conv) in convs.items():
    prefix, conv_name, bn_name = key
    bn_layer, bn = bns[key]
    missing = [w for w in KERAS_BN_WEIGHTS if w not in bn]
    if missing or "kernel" not in conv:
      raise ValueError(f"{bn_layer if missing else layer}: missing weights "
                       f"{missing or ['kernel']}")
    bias = conv.get("bias", np.zeros(conv["kernel"].shape[-1], np.float32))
    join = lambda *parts, prefix=prefix: "/".join(p for p in (prefix, *parts) if p)
    out[join(conv_name, "kernel")] = np.asarray(conv["kernel"], np.float32)
    out[join(bn_name, "weight")] = bn["gamma"]
    out[join(bn_name, "bias")] = bn["beta"]
    out[join(bn_name, "running_mean")] = bn["moving_mean"] - bias
    out[join(bn_name, "running_var")] = bn["moving_variance"] + (KERAS_BN_EPS - BN_EPS)
  return out


def convert_file(path: str) -> tuple[dict[str, np.ndarray], str, bool]:
  """Reads and converts one file; returns (arrays, input_norm = source, stride_in_1x1)."""
  if path.endswith((".pth", ".pt", ".npz")):
    return convert_torchvision(read_torchvision(path)), "torchvision", False
  if path.endswith((".h5", ".hdf5")):
    return convert_keras(read_keras_h5(path)), "keras", True
  raise ValueError(f"{path}: expected a torchvision .pth/.pt (or .npz state dict) or a Keras "
                   ".h5/.hdf5 file")


def save(arrays: Mapping[str, np.ndarray], input_norm: str, stride_in_1x1: bool,
         output: str) -> None:
  """Writes the converted arrays and their metadata to `output` (.npz)."""
  mean, std = NORMS[input_norm]
  np.savez(output, input_norm=np.asarray(input_norm), source=np.asarray(input_norm),
           pixel_mean=np.asarray(mean, np.float64), pixel_std=np.asarray(std, np.float64),
           stride_in_1x1=np.asarray(stride_in_1x1), **arrays)


def main(argv: list[str] | None = None) -> None:
  args = pretrained.converter_arguments(
      __doc__.split("\n\n")[0], "torchvision .pth (or .npz state dict) or Keras .h5 weights", argv)
  arrays, input_norm, stride_in_1x1 = convert_file(args.input)
  save(arrays, input_norm, stride_in_1x1, args.output)
  flags = f"--config.model.pretrained={args.output} --config.model.input_norm={input_norm}"
  if stride_in_1x1:
    flags += " --config.model.resnet_c4.stride_in_1x1=true --config.model.res5.stride_in_1x1=true"
  print(f"wrote {len(arrays)} arrays ({input_norm}) to {args.output}: use {flags}")


if __name__ == "__main__":
  main()
