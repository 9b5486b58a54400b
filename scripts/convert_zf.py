"""Converts py-faster-rcnn's ImageNet ZF (ZF.v2.caffemodel) to the .npz of model.backbone=zf.

Usage:
  python scripts/convert_zf.py --input ZF.v2.caffemodel --output weights/zf_caffe.npz

`ZF.v2.caffemodel` is the ImageNet ZF that py-faster-rcnn's ZF recipes start from
(`data/scripts/fetch_imagenet_models.sh` unpacks it to data/imagenet_models/). It is read with
the Caffe reader of frcnn_jax/models/caffe_weights.py (no Caffe or protobuf package). Every layer
the ZF recipe loads must be there with ZF's shapes, else the error names the layer:

  conv1 .. conv5: weight [out, in, k, k] (OIHW, conv1's inputs BGR) -> "convN/kernel" [k, k, in,
    out] (HWIO); the shapes of frcnn_jax/models/backbones/zf.py (96, 256, 384, 384, 256 outputs;
    7, 5, 3, 3, 3 kernels);
  fc6: weight [4096, 256 * 6 * 6] over pool5 flattened CHW -> "fc6/kernel" [6 * 6 * 256, 4096]
    over our RoI head's HWC flattening (model.roi_size=6);
  fc7: weight [4096, 4096] -> "fc7/kernel" [in, out].

py-faster-rcnn's ZF prototxts set `scale_train: false` on drop6 / drop7: the RoI head does the
same with `model.fc.dropout_scale_train = False` (experiments/voc_zf.py), so the weights are
used as they are. Other layers (fc8) are ignored. The .npz records "source", "input_norm" =
"caffe" and "pixel_mean" (py-faster-rcnn's PIXEL_MEANS, BGR); train with `--config.model.pretrained=FILE --config.model.input_norm=caffe`
(experiments/voc_zf.py expects weights/zf_caffe.npz). An existing output file is not overwritten
unless `--overwrite` is given.
"""

from typing import Mapping

import numpy as np

from frcnn_jax.models import caffe_weights
from frcnn_jax.models import pretrained
from frcnn_jax.models.backbones import zf

CONV_LAYERS = tuple(f"conv{i}" for i in range(1, zf.NUM_LAYERS + 1))
FC_LAYERS = ("fc6", "fc7")
PIXEL_MEAN = (102.9801, 115.9465, 122.7717)   # py-faster-rcnn's PIXEL_MEANS (BGR)


def conv_shapes(width: float = 1.0) -> dict[str, tuple[int, int, int, int]]:
  """Caffe (OIHW) weight shapes of conv1 .. conv5 of ZF under the width multiplier."""
  shapes, cin = {}, 3
  for name, base, (kernel, _, _) in zip(CONV_LAYERS, zf.BASE_CHANNELS, zf.CONVS):
    cout = zf.scaled_channels(base, width)
    shapes[name] = (cout, cin, kernel, kernel)
    cin = cout
  return shapes


def _weight_and_bias(layers: Mapping[str, list[np.ndarray]], name: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  if name not in layers:
    raise ValueError(f"caffe layer {name!r} is missing (layers with weights: "
                     f"{sorted(layers)}): not py-faster-rcnn's ZF.v2.caffemodel")
  blobs = layers[name]
  if len(blobs) != 2:
    raise ValueError(f"caffe layer {name!r} has {len(blobs)} blobs, expected weight and bias")
  return blobs[0], blobs[1].reshape(-1)


def convert_caffe(layers: Mapping[str, list[np.ndarray]], width: float = 1.0
                  ) -> dict[str, np.ndarray]:
  """Maps the Caffe ZF layers to frcnn_jax names (module docstring).

  Legacy 4-D blob shapes of fc layers ((1, 1, out, in), biases (1, 1, 1, out)) are accepted.

  Args:
    layers: {layer name: [weight, bias]} (`caffe_weights.read_caffemodel`).
    width: the ZF width multiplier the conv shapes are checked against (1.0: ZF.v2.caffemodel).

  Returns:
    {"conv1/kernel" HWIO, "conv1/bias", ..., "fc6/kernel" [s * s * C, out] (HWC inputs),
    "fc6/bias", "fc7/kernel" [in, out], "fc7/bias"} float32 arrays.

  Raises:
    ValueError: naming the layer: a missing layer, a layer without weight and bias, or a shape
      that does not fit ZF (conv shapes; fc6 not over a square map of conv5's channels; fc7 not
      over fc6's outputs; a bias of another size).
  """
  out = {}
  for name, shape in conv_shapes(width).items():
    weight, bias = _weight_and_bias(layers, name)
    if weight.shape != shape or bias.shape != shape[:1]:
      raise ValueError(f"caffe layer {name!r}: weight {weight.shape} and bias {bias.shape}, "
                       f"ZF (width {width}) has {shape} and {shape[:1]}")
    out[f"{name}/kernel"] = weight.transpose(2, 3, 1, 0)
    out[f"{name}/bias"] = bias
  channels = out["conv5/kernel"].shape[-1]
  inputs = None
  for name in FC_LAYERS:
    weight, bias = _weight_and_bias(layers, name)
    if not bias.size or weight.size % bias.size:
      raise ValueError(f"caffe layer {name!r}: weight {weight.shape} is not [{bias.size}, in]")
    weight = weight.reshape(bias.size, -1)
    if name == "fc6":
      try:
        kernel = caffe_weights.fc_from_chw(weight, channels)
      except ValueError as e:
        raise ValueError(f"caffe layer 'fc6': {e} (conv5's outputs)") from None
    else:
      if weight.shape[1] != inputs:
        raise ValueError(f"caffe layer 'fc7': weight {weight.shape} does not take fc6's "
                         f"{inputs} outputs")
      kernel = weight.T
    out[f"{name}/kernel"], out[f"{name}/bias"] = kernel, bias
    inputs = bias.size
  return out


def convert_file(path: str, width: float = 1.0) -> dict[str, np.ndarray]:
  """Reads and converts one .caffemodel (see `convert_caffe`)."""
  if not path.endswith(".caffemodel"):
    raise ValueError(f"{path}: expected a Caffe .caffemodel (py-faster-rcnn's ZF.v2.caffemodel)")
  return convert_caffe(caffe_weights.read_caffemodel(path), width)


def save(arrays: Mapping[str, np.ndarray], output: str) -> None:
  """Writes the converted arrays and their metadata (source, input_norm, pixel_mean,
  pixel_std) to `output` (.npz)."""
  np.savez(output, input_norm=np.asarray("caffe"), source=np.asarray("caffe"),
           pixel_mean=np.asarray(PIXEL_MEAN, np.float64),
           pixel_std=np.asarray((1.0, 1.0, 1.0), np.float64), **arrays)


def main(argv: list[str] | None = None) -> None:
  args = pretrained.converter_arguments(__doc__.split("\n\n")[0],
                                        "py-faster-rcnn's ZF.v2.caffemodel", argv)
  arrays = convert_file(args.input)
  save(arrays, args.output)
  print(f"wrote {len(arrays)} arrays (caffe, pixel mean {PIXEL_MEAN}) to {args.output}: use "
        f"--config.model.backbone=zf --config.model.roi_size=6 "
        f"--config.model.pretrained={args.output} --config.model.input_norm=caffe")


if __name__ == "__main__":
  main()
