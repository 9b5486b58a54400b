"""Converts ImageNet VGG16 weights (torchvision .pth or Keras .h5) to frcnn_jax's .npz.

Usage:
  python scripts/convert_vgg16.py --input vgg16-397923af.pth --output vgg16_torchvision.npz
  python scripts/convert_vgg16.py --input vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
      --output vgg16_keras.npz

The .npz holds "conv1_1/kernel" [3, 3, in, out] (HWIO), "conv1_1/bias" ... "conv5_3/bias",
"fc6/kernel" [7 * 7 * 512, 4096] (input flattened in HWC order, as the RoI head does),
"fc6/bias", "fc7/kernel", "fc7/bias" when the source has the classifier, and the metadata
"input_norm" (the normalisation the weights were trained with: "torchvision" for torchvision,
RGB / 255 with ImageNet mean / std; "caffe" for Keras, BGR minus the mean pixel) and "source".
Point `model.pretrained` at it and set `model.input_norm` to the recorded value;
`frcnn_jax.models.faster_rcnn.load_pretrained` refuses a mismatch.

torchvision needs `torch` (optional dependency); Keras files need `h5py`. Only Keras's HDF5
weights layout (root attribute "layer_names", per-layer "weight_names") is read, as in the
`*_tf_kernels.h5` files of keras.applications and files from `model.save_weights(...h5)`.
"""

import argparse
import re
from typing import Mapping

import numpy as np

_TORCH_FEATURE = re.compile(r"^features\.(\d+)\.(weight|bias)$")
_KERAS_CONV = re.compile(r"^block(\d+)_conv(\d+)$")


def _fc_from_chw(weight: np.ndarray, channels: int) -> np.ndarray:
  """torch Linear weight [out, C * s * s] (CHW flattening) -> kernel [s * s * C, out] (HWC)."""
  out_features, in_features = weight.shape
  side = int(round(np.sqrt(in_features // channels)))
  if side * side * channels != in_features:
    raise ValueError(f"classifier.0 has {in_features} inputs, not a square map of {channels} "
                     "channels")
  kernel = weight.reshape(out_features, channels, side, side).transpose(2, 3, 1, 0)
  return kernel.reshape(side * side * channels, out_features)


def convert_torchvision(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a torchvision VGG16 state dict (numpy arrays) to frcnn_jax names.

  Blocks are recovered from the layer indices: `features.N` convolutions separated by a max
  pool (index gap 3: ReLU, pool) start a new block.

  Args:
    state_dict: "features.{0,2,5,...}.weight" [out, in, 3, 3] / ".bias", optionally
      "classifier.0.*" (fc6) and "classifier.3.*" (fc7), torch layouts.

  Returns:
    {"conv{b}_{i}/kernel" HWIO, "conv{b}_{i}/bias", "fc6/kernel", ...} float32 arrays.
  """
  indices = sorted({int(m.group(1)) for k in state_dict if (m := _TORCH_FEATURE.match(k))})
  if not indices:
    raise ValueError("no features.N.weight entries: not a torchvision VGG state dict")
  out, block, conv, previous = {}, 1, 0, None
  for index in indices:
    if previous is not None and index - previous > 2:
      block, conv = block + 1, 0
    conv += 1
    previous = index
    weight = np.asarray(state_dict[f"features.{index}.weight"], np.float32)
    out[f"conv{block}_{conv}/kernel"] = weight.transpose(2, 3, 1, 0)
    out[f"conv{block}_{conv}/bias"] = np.asarray(state_dict[f"features.{index}.bias"],
                                                  np.float32)
  channels = out[f"conv{block}_{conv}/kernel"].shape[-1]
  if "classifier.0.weight" in state_dict:
    out["fc6/kernel"] = _fc_from_chw(np.asarray(state_dict["classifier.0.weight"], np.float32),
                                     channels)
    out["fc6/bias"] = np.asarray(state_dict["classifier.0.bias"], np.float32)
  if "classifier.3.weight" in state_dict:
    out["fc7/kernel"] = np.asarray(state_dict["classifier.3.weight"], np.float32).T
    out["fc7/bias"] = np.asarray(state_dict["classifier.3.bias"], np.float32)
  return out


def read_torchvision(path: str) -> dict[str, np.ndarray]:
  """Loads a torchvision .pth state dict as numpy arrays (needs torch)."""
  import torch  # pylint: disable=import-outside-toplevel
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def read_keras_h5(path: str) -> dict[str, list[np.ndarray]]:
  """Reads Keras's HDF5 weights layout: {layer name: [weights in weight_names order]}."""
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
      layers[layer] = [np.asarray(root[layer][name], np.float32) for name in names]
  return layers


def convert_keras(layers: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
  """Maps Keras VGG16 layers (block{b}_conv{i}: [kernel HWIO, bias], fc1 / fc2: [kernel
  [in, out], bias]) to frcnn_jax names; Keras flattens HWC already."""
  out = {}
  for layer, weights in layers.items():
    match = _KERAS_CONV.match(layer)
    if match:
      name = f"conv{match.group(1)}_{match.group(2)}"
    elif layer in ("fc1", "fc2"):
      name = {"fc1": "fc6", "fc2": "fc7"}[layer]
    else:
      continue
    kernel, bias = weights
    out[f"{name}/kernel"], out[f"{name}/bias"] = kernel, bias
  if not out:
    raise ValueError("no block{b}_conv{i} layers: not a Keras VGG16 weights file")
  return out


def convert_file(path: str) -> tuple[dict[str, np.ndarray], str, str]:
  """Reads and converts one file; returns (arrays, input_norm, source)."""
  if path.endswith((".pth", ".pt")):
    return convert_torchvision(read_torchvision(path)), "torchvision", "torchvision"
  if path.endswith((".h5", ".hdf5")):
    return convert_keras(read_keras_h5(path)), "caffe", "keras"
  raise ValueError(f"{path}: expected a torchvision .pth/.pt or a Keras .h5/.hdf5 file")


def save(arrays: Mapping[str, np.ndarray], input_norm: str, source: str, output: str) -> None:
  """Writes the converted arrays and their metadata to `output` (.npz)."""
  np.savez(output, input_norm=np.asarray(input_norm), source=np.asarray(source), **arrays)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="torchvision .pth or Keras .h5 weights")
  parser.add_argument("--output", required=True, help="destination .npz")
  args = parser.parse_args()
  arrays, input_norm, source = convert_file(args.input)
  save(arrays, input_norm, source, args.output)
  print(f"wrote {len(arrays)} arrays ({source}, model.input_norm={input_norm!r}) to "
        f"{args.output}")


if __name__ == "__main__":
  main()
