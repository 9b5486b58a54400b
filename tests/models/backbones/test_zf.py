"""Tests for frcnn_jax/models/backbones/zf.py and experiments/voc_zf.py.

The reference is py-faster-rcnn's `models/pascal_voc/ZF/faster_rcnn_end2end/train.prototxt` run by
caffe-fast-rcnn: ConvolutionLayer (im2col, output floor((H + 2p - k) / s) + 1), LRNLayer
WITHIN_CHANNEL (AVE pooling of x^2 with pad 1, divisor 9) and PoolingLayer MAX (output rounded
up, a last window starting in the padding dropped, windows clipped to the input), each as a
NumPy loop below.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import train
from frcnn_jax.config import build
from frcnn_jax.config import defaults
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models.backbones import zf
from frcnn_jax.models.registry import BACKBONES
from frcnn_jax.models.roi_heads import fc
from frcnn_jax.models.roi_heads.pooling import RoIPooler
from tests.models import tiny
from tests.plugins import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
# (name, kernel, stride, pad, num_output) of train.prototxt's conv1 .. conv5.
PROTOTXT_CONVS = [("conv1", 7, 2, 3, 96), ("conv2", 5, 2, 2, 256), ("conv3", 3, 1, 1, 384),
                  ("conv4", 3, 1, 1, 384), ("conv5", 3, 1, 1, 256)]
LRN = dict(size=3, alpha=0.00005, beta=0.75)                 # norm1, norm2
POOL = dict(kernel=3, stride=2, pad=1)                       # pool1, pool2


# ------------------------------------------------------------------ Caffe's arithmetic


def caffe_conv_size(size, kernel, stride, pad):
  return int(math.floor((size + 2 * pad - kernel) / stride)) + 1


def caffe_pool_size(size, kernel=3, stride=2, pad=1):
  out = int(math.ceil(float(size + 2 * pad - kernel) / stride)) + 1
  if pad and (out - 1) * stride >= size + pad:
    out -= 1
  return out


def caffe_conv5_size(size):
  for name, kernel, stride, pad, _ in PROTOTXT_CONVS:
    size = caffe_conv_size(size, kernel, stride, pad)
    if name in ("conv1", "conv2"):
      size = caffe_pool_size(size, **POOL)
  return size


def _caffe_conv(x, kernel, bias, stride, pad):
  """ConvolutionLayer on one [H, W, Cin] map, kernel HWIO (Caffe's OIHW transposed)."""
  k = kernel.shape[0]
  out_h = caffe_conv_size(x.shape[0], k, stride, pad)
  out_w = caffe_conv_size(x.shape[1], k, stride, pad)
  padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  out = np.zeros((out_h, out_w, kernel.shape[-1]))
  for ky in range(k):
    for kx in range(k):
      window = padded[ky:ky + stride * (out_h - 1) + 1:stride,
                      kx:kx + stride * (out_w - 1) + 1:stride]
      out += window @ kernel[ky, kx].astype(np.float64)
  return out + bias


def _caffe_lrn_within_channel(x, size, alpha, beta):
  """LRNLayer WITHIN_CHANNEL: x * (1 + alpha * AVE-pool(x^2))^-beta, Caffe's pool_size."""
  height, width, _ = x.shape
  pad = (size - 1) // 2
  squares = x * x
  scale = np.zeros_like(x)
  for h in range(height):
    for w in range(width):
      hstart, wstart = h - pad, w - pad
      hend, wend = min(hstart + size, height + pad), min(wstart + size, width + pad)
      pool_size = (hend - hstart) * (wend - wstart)
      window = squares[max(hstart, 0):min(hend, height), max(wstart, 0):min(wend, width)]
      scale[h, w] = window.sum(axis=(0, 1)) / pool_size
  return x * (1.0 + alpha * scale) ** (-beta)


def _caffe_max_pool(x, kernel, stride, pad):
  """PoolingLayer MAX on one [H, W, C] map."""
  height, width, _ = x.shape
  out_h = caffe_pool_size(height, kernel, stride, pad)
  out_w = caffe_pool_size(width, kernel, stride, pad)
  out = np.full((out_h, out_w, x.shape[2]), -np.finfo(np.float32).max)
  for ph in range(out_h):
    for pw in range(out_w):
      hstart, wstart = ph * stride - pad, pw * stride - pad
      hend, wend = min(hstart + kernel, height), min(wstart + kernel, width)
      window = x[max(hstart, 0):hend, max(wstart, 0):wend]
      out[ph, pw] = window.max(axis=(0, 1))
  return out


def caffe_zf(x, params):
  """conv1 .. relu5 of the ZF prototxt on one [H, W, 3] input (float64)."""
  x = np.asarray(x, np.float64)
  for name, _, stride, pad, _ in PROTOTXT_CONVS:
    layer = params[name]
    x = np.maximum(_caffe_conv(x, np.asarray(layer["kernel"]), np.asarray(layer["bias"]),
                               stride, pad), 0.0)
    if name in ("conv1", "conv2"):
      x = _caffe_max_pool(_caffe_lrn_within_channel(x, **LRN), **POOL)
  return x


# ------------------------------------------------------------------ the trunk


def test_layers_are_the_prototxt():
  assert [(k, s, p) for _, k, s, p, _ in PROTOTXT_CONVS] == list(zf.CONVS)
  assert [n for *_, n in PROTOTXT_CONVS] == list(zf.BASE_CHANNELS)
  assert (zf.LRN_SIZE, zf.LRN_ALPHA, zf.LRN_BETA) == (LRN["size"], LRN["alpha"], LRN["beta"])
  assert (zf.POOL_KERNEL, zf.POOL_STRIDE, zf.POOL_PAD) == tuple(POOL.values())
  assert BACKBONES.get("zf") is zf.ZF


def test_feature_size_is_caffes():
  rng = np.random.default_rng(0)
  sizes = [(600, 1000), (1000, 600), (64, 64), (37, 45), (1, 1), (16, 17), (599, 999),
           *[tuple(int(v) for v in rng.integers(2, 300, 2)) for _ in range(4)]]
  for hw in sizes:
    for ceil in (True, False):
      trunk = zf.ZF(width=1 / 16, pool_ceil_mode=ceil)
      y = jax.eval_shape(lambda t=trunk: t.init_with_output(jax.random.key(0),
                                                            jnp.zeros((1, *hw, 3))))[0]
      assert y.shape[1:] == (*trunk.output_hw(*hw), 16), (hw, ceil)
      if ceil:
        assert trunk.output_hw(*hw) == tuple(caffe_conv5_size(n) for n in hw), hw
  assert zf.ZF().output_hw(600, 1000) == (39, 64)
  assert zf.ZF(pool_ceil_mode=False).output_hw(600, 1000) == (38, 63)
  assert (zf.ZF().stride, zf.ZF().out_channels, zf.ZF(width=0.5).out_channels) == (16, 256, 128)


@pytest.mark.parametrize("hw", [(37, 45), (48, 40)])
def test_forward_matches_caffe(hw):
  trunk = zf.ZF(width=1 / 16)
  rng = np.random.default_rng(hw[0])
  x = rng.normal(0, 60, (1, *hw, 3)).astype(np.float32)   # BGR minus the mean pixel scale
  shapes = jax.eval_shape(trunk.init, jax.random.key(0), x)["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: rng.normal(0, 0.05 if path[-1].key == "bias" else np.sqrt(
          2.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32), shapes)
  got = np.asarray(jax.jit(trunk.apply)({"params": params}, x))[0]
  want = caffe_zf(x[0], params)
  assert got.shape == want.shape == (*(caffe_conv5_size(n) for n in hw), 16)
  # The LRN does act: conv1's outputs are large enough for 1 + 5e-5 * mean(x^2) to matter.
  conv1 = np.maximum(_caffe_conv(x[0], params["conv1"]["kernel"], params["conv1"]["bias"], 2,
                                 3), 0)
  assert np.max(np.abs(_caffe_lrn_within_channel(conv1, **LRN) - conv1)) > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 4), (7, 8)])
def test_max_pool_matches_caffe_on_negative_values(hw):
  # Without a ReLU before it, a zero pad would win over negative values; -inf never does.
  x = -1.0 - np.random.default_rng(hw[1]).random((1, *hw, 2)).astype(np.float32)
  got = np.asarray(zf.max_pool(jnp.asarray(x), ceil_mode=True))[0]
  np.testing.assert_array_equal(got, _caffe_max_pool(x[0], **POOL))
  floor = zf.max_pool(jnp.asarray(x), ceil_mode=False)
  assert floor.shape[1:3] == tuple((n + 2 - 3) // 2 + 1 for n in hw)


def _caffe_max_pool_backward(x, top_diff, kernel, stride, pad):
  """PoolingLayer MAX backward: each output's diff goes to its window's first maximum in
  row-major order (Forward_cpu's strict `>` from -FLT_MAX), summed over overlapping windows."""
  height, width, channels = x.shape
  bottom_diff = np.zeros_like(x)
  for ph in range(top_diff.shape[0]):
    for pw in range(top_diff.shape[1]):
      hstart, wstart = ph * stride - pad, pw * stride - pad
      hend, wend = min(hstart + kernel, height), min(wstart + kernel, width)
      for c in range(channels):
        best, where = -np.finfo(np.float32).max, None
        for h in range(max(hstart, 0), hend):
          for w in range(max(wstart, 0), wend):
            if x[h, w, c] > best:
              best, where = x[h, w, c], (h, w)
        bottom_diff[where[0], where[1], c] += top_diff[ph, pw, c]
  return bottom_diff


@pytest.mark.parametrize("hw", [(5, 6), (7, 7)])
def test_max_pool_gradient_matches_caffe_with_ties(hw):
  rng = np.random.default_rng(hw[0])
  x = rng.integers(0, 3, (1, *hw, 2)).astype(np.float32)      # many equal maxima
  top_diff = rng.normal(size=(zf.pool_output_size(hw[0]), zf.pool_output_size(hw[1]), 2))
  grad = jax.grad(lambda v: jnp.sum(zf.max_pool(v) * top_diff.astype(np.float32)))(
      jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad)[0],
                             _caffe_max_pool_backward(x[0], top_diff, **POOL), rtol=1e-6)


def test_full_width_parameters_are_the_prototxt():
  """experiments/voc_zf.py's network, shapes only (jax.eval_shape: nothing compiled)."""
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "voc_zf.py"))
  model = build.model_from_config(config, 20)
  params = jax.eval_shape(lambda key: faster_rcnn.init_params(model, key), jax.random.key(0))
  shapes = jax.tree.map(lambda a: a.shape, params)
  cin = 3
  for name, kernel, _, _, cout in PROTOTXT_CONVS:
    assert shapes["trunk"][name] == {"kernel": (kernel, kernel, cin, cout), "bias": (cout,)}
    cin = cout
  assert sorted(shapes["trunk"]) == [f"conv{i}" for i in range(1, 6)]
  assert shapes["rpn"]["conv"]["kernel"] == (3, 3, 256, 256)        # rpn_conv/3x3
  assert shapes["rpn"]["objectness"]["kernel"][-1] == 18             # rpn_cls_score
  assert shapes["rpn"]["deltas"]["kernel"][-1] == 36                 # rpn_bbox_pred
  assert shapes["head"]["fc6"]["kernel"] == (6 * 6 * 256, 4096)      # roi_pool_conv5 6 x 6
  assert shapes["head"]["fc7"]["kernel"] == (4096, 4096)
  assert shapes["head"]["cls"]["kernel"][-1] == 21 and shapes["head"]["box"]["kernel"][-1] == 84
  assert model.head.pooler.spatial_scale == 0.0625


def test_voc_zf_is_py_faster_rcnns_zf_end2end_recipe():
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "voc_zf.py"))
  voc = config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py"))
  assert (config.model.backbone, config.model.input_norm, config.model.roi_size) == (
      "zf", "caffe", 6)
  assert (config.model.zf.width, config.model.zf.frozen_layers,
          config.model.zf.pool_ceil_mode) == (1.0, 0, True)
  assert config.model.pretrained == "weights/zf_caffe.npz"
  # solver.prototxt: base_lr 0.001, step 50000 gamma 0.1, momentum 0.9, weight_decay 0.0005,
  # iter_size 2; faster_rcnn_end2end.sh: 70000 iterations. The rest is voc.py's.
  t = config.train
  assert (t.batch_size, t.grad_accum_steps, t.num_steps, t.lr_boundaries) == (2, 1, 70000,
                                                                              (50000,))
  assert (t.learning_rate, t.momentum, t.weight_decay, t.bias_lr_mult) == (1e-3, 0.9, 5e-4, 2.0)
  assert (config.model.fc.dim, config.model.fc.dropout) == (4096, 0.5)
  for section in ("data", "anchors", "rpn", "roi", "test", "loss", "train", "eval"):
    assert config[section].to_dict() == voc[section].to_dict(), section
  scaled = config_flags.load_config(os.path.join(ROOT, "experiments", "voc_zf.py") + ":8")
  assert (scaled.train.batch_size, scaled.train.num_steps) == (8, 17500)
  assert scaled.train.learning_rate == pytest.approx(4e-3)


# ------------------------------------------------------------------ freezing, weights


def test_frozen_layers_mask_and_gradient():
  x = jnp.asarray(np.random.default_rng(0).normal(0, 50, (1, 32, 32, 3)), jnp.float32)
  shapes = jax.eval_shape(zf.ZF(width=1 / 16).init, jax.random.key(0), x)["params"]
  for frozen in (0, 2, 5):
    mask = zf.ZF(width=1 / 16, frozen_layers=frozen).trainable(shapes)
    for i in range(1, 6):
      assert mask[f"conv{i}"] == {"kernel": i > frozen, "bias": i > frozen}, (frozen, i)
  trunk = zf.ZF(width=1 / 16, frozen_layers=2)
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), shapes)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(trunk.apply({"params": p}, x))))(params)
  for i in range(1, 6):
    norm = float(jnp.abs(grads[f"conv{i}"]["kernel"]).sum())
    assert (norm == 0.0) == (i <= 2), (i, norm)
  assert zf.ZF.all_frozen == {"frozen_layers": 5}
  assert zf.ZF.input_norms == ("caffe",)
  assert "scripts/convert_zf.py" in zf.ZF.pretrained_hint


def _tiny_model(width=1 / 16, fc_dim=16):
  trunk = zf.ZF(width=width)
  head = fc.FCHead(dim=fc_dim, num_classes=2, pooler=RoIPooler(size=6, spatial_scale=1 / 16))
  return faster_rcnn.FasterRCNN(trunk=trunk, head=head, input_norm="caffe", num_anchors=9)


def _arrays_like(params, rng):
  out = {}
  for module in ("trunk", "head"):
    for layer, leaves in params[module].items():
      if module == "head" and layer not in ("fc6", "fc7"):
        continue
      for leaf, value in leaves.items():
        out[f"{layer}/{leaf}"] = rng.normal(size=value.shape).astype(np.float32)
  return out


def test_load_pretrained_fits_and_refuses_misfits(tmp_path):
  model = _tiny_model()
  params = tiny.numpy_params(model)
  arrays = _arrays_like(params, np.random.default_rng(0))
  assert sorted(arrays) == sorted(f"{layer}/{leaf}" for layer in (
      "conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7") for leaf in ("bias", "kernel"))
  path = str(tmp_path / "zf.npz")
  np.savez(path, input_norm=np.asarray("caffe"), **arrays)
  loaded = model.trunk.load_pretrained(params, path, "caffe")
  for name, value in arrays.items():
    layer, leaf = name.split("/")
    module = "head" if layer.startswith("fc") else "trunk"
    np.testing.assert_array_equal(np.asarray(loaded[module][layer][leaf]), value)
  np.testing.assert_array_equal(np.asarray(loaded["rpn"]["conv"]["kernel"]),
                                params["rpn"]["conv"]["kernel"])      # untouched
  with pytest.raises(ValueError, match="input_norm='caffe'"):
    model.trunk.load_pretrained(params, path, "torchvision")
  wide = _tiny_model(width=1 / 8)
  with pytest.raises(ValueError, match=r"conv1/(kernel|bias) has shape .*model.zf.width"):
    wide.trunk.load_pretrained(tiny.numpy_params(wide), path, "caffe")
  other_fc = _tiny_model(fc_dim=8)
  with pytest.raises(ValueError, match="fc6/(kernel|bias) has shape"):
    other_fc.trunk.load_pretrained(tiny.numpy_params(other_fc), path, "caffe")
  vgg_like = str(tmp_path / "vgg.npz")
  np.savez(vgg_like, input_norm=np.asarray("caffe"),
           **{"conv1_1/kernel": np.zeros((3, 3, 3, 4), np.float32)})
  with pytest.raises(ValueError, match="conv1_1/kernel does not exist.*model.backbone='zf'"):
    model.trunk.load_pretrained(params, vgg_like, "caffe")


def test_config_section_and_input_norm_check():
  config = defaults.get_config()
  assert config.model.zf.to_dict() == {"width": 1.0, "frozen_layers": 0, "pool_ceil_mode": True}
  config.model.backbone = "zf"
  config.model.input_norm = "torchvision"
  with pytest.raises(ValueError, match="does not fit model.backbone='zf'"):
    build.model_from_config(config, 2)


# ------------------------------------------------------------------ end to end


def test_tiny_zf_trains_and_evaluates(tmp_path):
  config = config_flags.load_config(common.SHAPES, {
      **common.TINY, "model.backbone": "zf", "model.zf.width": 1 / 16,
      "model.input_norm": "caffe", "model.roi_size": 6})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  common.check_trained(result, config)
  params = result["params"]
  assert sorted(params["trunk"]) == [f"conv{i}" for i in range(1, 6)]
  assert params["trunk"]["conv1"]["kernel"].shape == (7, 7, 3, 6)
  assert params["rpn"]["conv"]["kernel"].shape[2] == 16       # the RPN follows the backbone
  assert params["head"]["fc6"]["kernel"].shape[0] == 6 * 6 * 16
