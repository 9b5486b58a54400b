"""Converts ImageNet VGG16 weights (Caffe .caffemodel, torchvision .pth or Keras .h5) to .npz.

Usage (each input is the published ImageNet VGG16 file of that framework):
  python scripts/convert_vgg16.py --input VGG16.v2.caffemodel --output weights/vgg16_caffe.npz
  python scripts/convert_vgg16.py --input vgg16-397923af.pth --output weights/vgg16_tv.npz
  python scripts/convert_vgg16.py --input vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
      --output weights/vgg16_keras.npz

`VGG16.v2.caffemodel` is the file py-faster-rcnn starts from (its
`data/scripts/fetch_imagenet_models.sh`); it is read with a small protobuf wire-format reader
(frcnn_jax/models/caffe_weights.py: Caffe's NetParameter, both the `layer` and the legacy V1
`layers` formats), without Caffe or the protobuf package. The .npz holds "conv1_1/kernel"
[3, 3, in, out] (HWIO), "conv1_1/bias" ... "conv5_3/bias", "fc6/kernel" [7 * 7 * 512, 4096]
(input flattened in HWC order, as the RoI head does; Caffe and torchvision flatten CHW),
"fc6/bias", "fc7/kernel", "fc7/bias" when the source has the classifier, and the metadata
"source", "input_norm" and "pixel_mean" (plus "pixel_std"): the input normalisation the
weights were trained with, each file its own:
  * Caffe: "caffe", BGR 0..255 minus py-faster-rcnn's PIXEL_MEANS (102.9801, 115.9465, 122.7717)
    (conv1_1 takes BGR input, as our "caffe" normalisation feeds it);
  * Keras: "keras", BGR 0..255 minus the Keras VGG16 mean pixel (103.939, 116.779, 123.68);
  * torchvision: "torchvision", RGB / 255 with ImageNet mean / std.
Point `model.pretrained` at the .npz and set `model.input_norm` to the recorded value (printed);
`frcnn_jax.models.faster_rcnn.load_pretrained` refuses a mismatch. An existing output file is
not overwritten unless `--overwrite` is given.

torchvision needs `torch` (optional dependency); Keras files need `h5py`. Only Keras's HDF5
weights layout (root attribute "layer_names", per-layer "weight_names") is read, as in the
`*_tf_kernels.h5` files of keras.applications and files from `model.save_weights(...h5)`.
"""

import re
from typing import Mapping

import numpy as np

from frcnn_jax.models import caffe_weights
from frcnn_jax.models import pretrained

_TORCH_FEATURE = re.compile(r"^features\.(\d+)\.(weight|bias)$")
_KERAS_CONV = re.compile(r"^block(\d+)_conv(\d+)$")
_CAFFE_CONV = re.compile(r"^conv\d+_\d+$")


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
    out["fc6/kernel"] = caffe_weights.fc_from_chw(
        np.asarray(state_dict["classifier.0.weight"], np.float32), channels)
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


# The Caffe reader lives in frcnn_jax/models/caffe_weights.py (shared with convert_zf.py);
# these names stay importable from this script.
parse_caffemodel = caffe_weights.parse_caffemodel
read_caffemodel = caffe_weights.read_caffemodel


def convert_caffe(layers: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
  """Maps Caffe VGG16 layers to frcnn_jax names.

  conv{b}_{i}: weight [out, in, 3, 3] (OIHW, conv1_1's input channels BGR, which our "caffe"
  normalisation feeds) -> HWIO; fc6: InnerProduct weight [4096, 512 * 7 * 7] over pool5 flattened
  CHW -> [7 * 7 * 512, 4096] over HWC; fc7: [out, in] -> [in, out]. Legacy 4-D blob shapes
  (1, 1, out, in) / (1, 1, 1, out) are accepted. Other layers (fc8, ...) are ignored.

  Raises:
    ValueError: no conv{b}_{i} layer, or a layer without its two blobs.
  """
  out = {}
  for layer, blobs in layers.items():
    if not (_CAFFE_CONV.match(layer) or layer in ("fc6", "fc7")):
      continue
    if len(blobs) != 2:
      raise ValueError(f"caffe layer {layer} has {len(blobs)} blobs, expected weight and bias")
    weight, bias = blobs[0], blobs[1].reshape(-1)
    if layer.startswith("conv"):
      if weight.ndim != 4:
        raise ValueError(f"caffe layer {layer}: weight of shape {weight.shape} is not OIHW")
      out[f"{layer}/kernel"] = weight.transpose(2, 3, 1, 0)
    elif layer == "fc6":
      out[f"{layer}/kernel"] = weight.reshape(bias.size, -1)   # CHW, permuted below
    else:
      out[f"{layer}/kernel"] = weight.reshape(bias.size, -1).T
    out[f"{layer}/bias"] = bias
  convs = sorted((tuple(int(v) for v in k.split("/")[0][4:].split("_")), k)
                 for k in out if k.startswith("conv") and k.endswith("kernel"))
  if not convs:
    raise ValueError("no conv{b}_{i} layers: not a Caffe VGG16 model")
  if "fc6/kernel" in out:
    channels = out[convs[-1][1]].shape[-1]   # the last conv's outputs, pooled into fc6
    out["fc6/kernel"] = caffe_weights.fc_from_chw(out["fc6/kernel"], channels)
  return out


# (input_norm, pixel mean in that normalisation's channel order and scale, pixel std) per source.
NORMS = {
    "caffe": ("caffe", (102.9801, 115.9465, 122.7717), (1.0, 1.0, 1.0)),
    "keras": ("keras", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    "torchvision": ("torchvision", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def convert_file(path: str) -> tuple[dict[str, np.ndarray], str, str]:
  """Reads and converts one file; returns (arrays, input_norm, source)."""
  if path.endswith(".caffemodel"):
    return convert_caffe(read_caffemodel(path)), "caffe", "caffe"
  if path.endswith((".pth", ".pt")):
    return convert_torchvision(read_torchvision(path)), "torchvision", "torchvision"
  if path.endswith((".h5", ".hdf5")):
    return convert_keras(read_keras_h5(path)), "keras", "keras"
  raise ValueError(f"{path}: expected a Caffe .caffemodel, a torchvision .pth/.pt or a Keras "
                   ".h5/.hdf5 file")


def save(arrays: Mapping[str, np.ndarray], input_norm: str, source: str, output: str) -> None:
  """Writes the converted arrays and their metadata (source, input_norm, pixel_mean,
  pixel_std) to `output` (.npz)."""
  _, mean, std = NORMS[input_norm]
  np.savez(output, input_norm=np.asarray(input_norm), source=np.asarray(source),
           pixel_mean=np.asarray(mean, np.float64), pixel_std=np.asarray(std, np.float64),
           **arrays)


def main(argv: list[str] | None = None) -> None:
  args = pretrained.converter_arguments(
      __doc__.split("\n\n")[0], "Caffe .caffemodel, torchvision .pth or Keras .h5 weights", argv)
  arrays, input_norm, source = convert_file(args.input)
  save(arrays, input_norm, source, args.output)
  print(f"wrote {len(arrays)} arrays ({source}, pixel mean {NORMS[input_norm][1]}) to "
        f"{args.output}: use --config.model.pretrained={args.output} "
        f"--config.model.input_norm={input_norm}")


if __name__ == "__main__":
  main()
