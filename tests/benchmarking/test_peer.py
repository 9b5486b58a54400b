"""The torchvision peer of each backbone: its arguments read from each experiment's config, a
model that is not torchvision's architecture refused with a message naming the backbone, and
(with torchvision) the torch models of vgg16, zf, resnet_c4 and resnet_fpn: their layers against
ours, and one training step and one inference each at a tiny size."""

import dataclasses
import importlib.util
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.benchmarking import peer
from frcnn_jax.benchmarking import torchvision_frcnn
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models.backbones import resnet
from frcnn_jax.models.backbones import vgg16 as vgg
from frcnn_jax.models.backbones import zf
from frcnn_jax.ops import lrn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Few proposals and RoIs and a narrow fc head: the torch models run in a fraction of a second.
TINY = torchvision_frcnn.DetectorArgs(pre_nms_train=32, post_nms_train=8, pre_nms_test=32,
                                      post_nms_test=4, rpn_batch=16, roi_batch=4,
                                      detections=5)


def _config(name: str, **overrides):
  return config_flags.load_config(os.path.join(ROOT, "experiments", name), overrides)


@pytest.mark.parametrize("experiment, arch, roi", [
    ("voc.py", {"backbone": "vgg16", "frozen_blocks": 2, "pool_ceil_mode": True,
                "fc_dim": 4096}, ("roi_pool", 7, False, 16)),
    ("voc_zf.py", {"backbone": "zf", "frozen_layers": 0, "pool_ceil_mode": True,
                   "fc_dim": 4096}, ("roi_pool", 6, False, 16)),
    ("coco_r50_c4.py", {"backbone": "resnet_c4", "depth": 50, "frozen_stages": 2},
     ("roi_align", 14, True, 16)),
    ("voc_r101_c4.py", {"backbone": "resnet_c4", "depth": 101, "frozen_stages": 2},
     ("roi_pool", 14, False, 16)),
    ("coco_r50_fpn.py", {"backbone": "resnet_fpn", "frozen_stages": 2, "fc_dim": 1024,
                         "canonical_scale": 224, "canonical_level": 4},
     ("roi_align", 7, False, 4)),
])
def test_peer_arguments_follow_each_experiment(experiment, arch, roi):
  config = _config(experiment)
  args = peer.model_args(config)
  d = args.pop("detector")
  assert args == arch
  assert (d.roi_op, d.roi_size, d.aligned, d.stride) == roi
  maps = len(torchvision_frcnn.FPN_MAPS) if arch["backbone"] == "resnet_fpn" else 1
  sizes = tuple(float(s) for s in config.anchors.sizes)
  assert d.anchor_sizes == tuple(sizes[i::maps] for i in range(maps))
  r, p, t = config.rpn, config.roi, config.test
  assert (d.pre_nms_train, d.post_nms_train, d.pre_nms_test, d.post_nms_test) == (
      r.pre_nms_top_n_train, r.post_nms_top_n_train, r.pre_nms_top_n_test,
      r.post_nms_top_n_test)
  assert (d.rpn_batch, d.rpn_min_size, d.roi_batch, d.roi_fg_fraction) == (
      r.batch_size_per_image, r.min_size, p.batch_size_per_image, p.fg_fraction)
  assert (d.test_nms, d.score_threshold, d.detections) == (
      t.nms_threshold, t.score_threshold, t.detections_per_image)
  assert peer.model_args(config, post_nms_test=50)["detector"].post_nms_test == 50
  assert peer.differences(config) == []


def test_anchor_sizes_split_over_the_fpn_maps():
  config = _config("coco_r50_c4.py")   # 32 .. 512: one size per FPN level
  d = peer.detector_args(config, num_maps=len(torchvision_frcnn.FPN_MAPS))
  assert d.anchor_sizes == torchvision_frcnn.FPN_ANCHOR_SIZES
  with pytest.raises(peer.PeerUnavailable, match="do not split"):
    peer.detector_args(config, num_maps=2)


def test_a_model_other_than_torchvisions_is_refused_naming_the_backbone(capsys):
  config = _config("voc_r101_c4.py", **{"model.resnet_c4.width": 0.25, "model.res5.blocks": 1})
  with pytest.raises(peer.PeerUnavailable,
                     match=r"model.backbone=resnet_c4: .*model.resnet_c4.width=0.25 .*"
                     r"model.res5.blocks=1"):
    peer.model_args(config)
  assert len(peer.differences(config)) == 2
  assert peer.model_args(config, strict=False)["depth"] == 101   # bench_backbones' use
  if importlib.util.find_spec("torchvision"):
    assert "model.resnet_c4.width=0.25" in peer.unavailable(config)
    assert capsys.readouterr().out.startswith("peer: not measured: model.backbone=resnet_c4")
  vgg_res5 = _config("voc.py", **{"model.roi_head": "res5"})
  assert peer.differences(vgg_res5) == ["model.roi_head=res5 (the peer's: fc)"]
  fpn = _config("coco_r50_fpn.py", **{"model.resnet_fpn.fpn_channels": 128})
  assert peer.differences(fpn) == ["model.resnet_fpn.fpn_channels=128 (torchvision's: 256)"]


def test_a_backbone_without_a_peer_says_so(monkeypatch):
  monkeypatch.delitem(peer.ARCHITECTURES, "zf")
  with pytest.raises(peer.PeerUnavailable, match="model.backbone=zf has no torchvision peer"):
    peer.model_args(_config("voc_zf.py"))


# --- With torchvision: the torch models. ---


def test_zf_peer_lrn_is_caffes_within_channel_lrn():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(0, 60, (2, 9, 11, 4)).astype(np.float32)
  ours = lrn.local_response_norm(jnp.asarray(x), zf.LRN_SIZE, zf.LRN_ALPHA, zf.LRN_BETA,
                                 norm_region=lrn.WITHIN_CHANNEL)
  module = torchvision_frcnn.within_channel_lrn(torch, zf.LRN_SIZE, zf.LRN_ALPHA, zf.LRN_BETA)
  theirs = module(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(ours) - x).max() > 1.0   # the normalisation matters here
  np.testing.assert_allclose(theirs, np.asarray(ours), rtol=1e-5, atol=1e-4)


def _trainable(module) -> bool:
  return any(p.requires_grad for p in module.parameters())


def test_peer_trunks_give_our_feature_maps_and_freeze_our_layers():
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  d = torchvision_frcnn.DetectorArgs()
  hw = (45, 77)   # odd sides: the pools' rounding shows
  x = torch.zeros(1, 3, *hw)
  with torch.no_grad():
    trunk, _, _ = torchvision_frcnn.vgg16_parts(torch, tv, d, frozen_blocks=2, fc_dim=8,
                                                pool_ceil_mode=True)
    assert tuple(trunk(x).shape[1:]) == (512, *(vgg.pool_output_size(n, 16, True) for n in hw))
    convs = [m for m in trunk if isinstance(m, torch.nn.Conv2d)]
    assert [_trainable(c) for c in convs] == [False] * 4 + [True] * 9
    for ceil in (True, False):
      trunk, head, _ = torchvision_frcnn.zf_parts(torch, tv, d, frozen_layers=2, fc_dim=8,
                                                  pool_ceil_mode=ceil)
      assert tuple(trunk(x).shape[1:]) == (256, *(zf.feature_size(n, ceil) for n in hw))
    convs = [m for m in trunk if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (c, k, s) for c, (k, s, _) in zip(zf.BASE_CHANNELS, zf.CONVS)]
    assert [_trainable(c) for c in convs] == [False, False, True, True, True]
    assert head.fc6.in_features == 256 * 7 * 7
    trunk, head, channels = torchvision_frcnn.resnet_c4_parts(torch, tv, d, depth=50,
                                                              frozen_stages=2)
    assert tuple(trunk(x).shape[1:]) == (1024, *(resnet.feature_size(n) for n in hw))
    assert channels == 2048 and tuple(head(torch.zeros(2, 1024, 14, 14)).shape) == (2, 2048)
    assert [_trainable(m) for m in trunk] == [False, False, False, False, False, True, True]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in [*trunk.modules(),
                                                                  *head.modules()])


def test_the_zf_peer_trains_and_infers_at_a_tiny_size():
  pytest.importorskip("torchvision")
  d = dataclasses.replace(TINY, roi_op="roi_pool", roi_size=6)
  result = torchvision_frcnn.measure(torchvision_frcnn.random_batch(1, 64, 80, num_classes=3),
                                     steps=1, num_classes=3, device="cpu", backbone="zf",
                                     detector=d, fc_dim=16)
  assert result["backbone"] == "zf" and (result["height"], result["width"]) == (64, 80)
  for key in ("train_step_s", "infer_s"):
    assert math.isfinite(result[key]) and result[key] > 0, key


@pytest.mark.parametrize("backbone, arch", [("resnet_c4", {"depth": 50}),
                                            ("resnet_fpn", {"fc_dim": 16})])
def test_the_resnet_peers_are_built_from_our_numbers_and_infer(backbone, arch):
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  d = dataclasses.replace(TINY, roi_op="roi_pool")
  if backbone == "resnet_fpn":
    d = dataclasses.replace(TINY, anchor_sizes=torchvision_frcnn.FPN_ANCHOR_SIZES)
  side = torchvision_frcnn.runners(torchvision_frcnn.random_batch(1, 64, 80, num_classes=3),
                                   num_classes=3, device="cpu", backbone=backbone, detector=d,
                                   **arch)
  model = side["model"]
  if backbone == "resnet_fpn":   # torchvision's own, built as with ImageNet weights
    assert isinstance(model.roi_heads.box_roi_pool, tv.ops.MultiScaleRoIAlign)
    assert model.transform.size_divisible == 32
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    body = model.backbone.body
    assert [_trainable(m) for m in (body.conv1, body.layer1, body.layer2, body.layer4)] == [
        False, False, True, True]
    assert model.roi_heads.box_head.fc7.out_features == 16
  else:
    assert type(model.roi_heads.box_roi_pool).__name__ == "SingleMapRoI"
    assert model.transform.size_divisible == 1
    assert model.backbone.out_channels == 1024
  assert (model.transform.min_size, model.transform.max_size) == ((64,), 80)
  assert model.rpn._pre_nms_top_n["testing"] == 32   # pylint: disable=protected-access
  assert model.roi_heads.box_predictor.cls_score.out_features == 4
  assert side["info"]["device"] == "cpu"
  side["infer"]()
  side["release"]()
