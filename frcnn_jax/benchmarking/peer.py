"""torchvision's Faster R-CNN (`torchvision_frcnn`) configured from an experiment config and
measured beside our rows on the same device, sizes, dtypes and batch.

The config's `model.backbone` picks the peer (`torchvision_frcnn.PEERS`: vgg16, zf, resnet_c4,
resnet_fpn); `ARCHITECTURES` reads that backbone's own arguments from the config (frozen
layers, depth, head width) and checks that our model is the architecture torchvision builds
(full width, the standard blocks, the head that goes with the backbone). `detector_args`
reads the numbers every peer shares (anchors, proposal counts, RoI op and sampling, test
settings). Where torch or torchvision is missing, the backbone has no peer, or (strict, as
`scripts/benchmark.py` and the accelerator check use it) our model differs from the peer's
architecture, nothing is measured and the results say why, naming the backbone; the caller
carries on with its own figures. `scripts/bench_backbones.py` uses `model_args(strict=False)`
so that a narrowed test model still runs beside torchvision's full one, and prints the
differences.
"""

from collections.abc import Callable
from typing import Any

import ml_collections

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import torchvision_frcnn
from frcnn_jax.config import build as builders
from frcnn_jax.models.backbones import resnet
from frcnn_jax.models.backbones import vgg16 as vgg

PeerUnavailable = torchvision_frcnn.PeerUnavailable


def _fc_dim(config: ml_collections.ConfigDict, head: Any, mismatch: list[str],
            default: int) -> int:
  """The fc head's width; a mismatch unless the config's RoI head is the fc head."""
  if config.model.roi_head != "fc" or not hasattr(head, "dim"):
    mismatch.append(f"model.roi_head={config.model.roi_head} (the peer's: fc)")
    return default
  return int(head.dim)


def _width(section: str, module: Any, mismatch: list[str]) -> None:
  width = float(getattr(module, "width", 1.0))
  if width != 1.0:
    mismatch.append(f"model.{section}.width={width:g} (torchvision's: 1)")


def _vgg16(config: ml_collections.ConfigDict, trunk: Any, head: Any
           ) -> tuple[dict[str, Any], list[str]]:
  mismatch: list[str] = []
  _width("vgg16", trunk, mismatch)
  if tuple(trunk.convs_per_block) != vgg.VGG16_CONVS_PER_BLOCK:
    mismatch.append(f"model.vgg16.convs_per_block={tuple(trunk.convs_per_block)} "
                    f"(VGG16's: {vgg.VGG16_CONVS_PER_BLOCK})")
  if int(trunk.stride) != vgg.STRIDE:
    mismatch.append(f"model.vgg16.stride={trunk.stride} (VGG16's: {vgg.STRIDE})")
  arch = {"frozen_blocks": int(trunk.frozen_blocks), "pool_ceil_mode": bool(trunk.pool_ceil_mode),
          "fc_dim": _fc_dim(config, head, mismatch, 4096)}
  return arch, mismatch


def _zf(config: ml_collections.ConfigDict, trunk: Any, head: Any
        ) -> tuple[dict[str, Any], list[str]]:
  mismatch: list[str] = []
  _width("zf", trunk, mismatch)
  arch = {"frozen_layers": int(trunk.frozen_layers), "pool_ceil_mode": bool(trunk.pool_ceil_mode),
          "fc_dim": _fc_dim(config, head, mismatch, 4096)}
  return arch, mismatch


def _resnet_c4(config: ml_collections.ConfigDict, trunk: Any, head: Any
               ) -> tuple[dict[str, Any], list[str]]:
  mismatch: list[str] = []
  depth = int(trunk.depth)
  _width("resnet_c4", trunk, mismatch)
  if tuple(trunk.blocks) not in ((), resnet.DEPTHS[depth][:3]):
    mismatch.append(f"model.resnet_c4.blocks={tuple(trunk.blocks)} (ResNet-{depth}'s: "
                    f"{resnet.DEPTHS[depth][:3]})")
  if bool(trunk.stride_in_1x1):
    mismatch.append("model.resnet_c4.stride_in_1x1=True (torchvision's blocks: the stride on "
                    "the 3x3)")
  if config.model.roi_head != "res5":
    mismatch.append(f"model.roi_head={config.model.roi_head} (the peer's: res5)")
  else:
    _width("res5", head, mismatch)
    if int(head.blocks) != resnet.DEPTHS[depth][3]:
      mismatch.append(f"model.res5.blocks={head.blocks} (ResNet's: {resnet.DEPTHS[depth][3]})")
    if bool(head.stride_in_1x1):
      mismatch.append("model.res5.stride_in_1x1=True (torchvision's: the stride on the 3x3)")
  return {"depth": depth, "frozen_stages": int(trunk.frozen_stages)}, mismatch


def _resnet_fpn(config: ml_collections.ConfigDict, trunk: Any, head: Any
                ) -> tuple[dict[str, Any], list[str]]:
  mismatch: list[str] = []
  _width("resnet_fpn", trunk, mismatch)
  depth = int(getattr(trunk, "depth", 50))
  if depth != 50:
    mismatch.append(f"model.resnet_fpn.depth={depth} (fasterrcnn_resnet50_fpn's: 50)")
  blocks = tuple(getattr(trunk, "blocks", ()))
  if blocks not in ((), resnet.DEPTHS[50]):
    mismatch.append(f"model.resnet_fpn.blocks={blocks} (ResNet-50's: {resnet.DEPTHS[50]})")
  channels = int(getattr(trunk, "fpn_channels", 256))
  if channels != 256:
    mismatch.append(f"model.resnet_fpn.fpn_channels={channels} (torchvision's: 256)")
  if bool(getattr(trunk, "stride_in_1x1", False)):
    mismatch.append("model.resnet_fpn.stride_in_1x1=True (torchvision's blocks: the stride on "
                    "the 3x3)")
  if bool(getattr(trunk, "freeze_fpn", False)):
    mismatch.append("model.resnet_fpn.freeze_fpn=True (torchvision always trains its FPN)")
  levels = len(_strides(trunk))
  if levels != len(torchvision_frcnn.FPN_MAPS):
    mismatch.append(f"{levels} feature levels (torchvision's FPN: P2 .. P6, 5)")
  roi_levels = int(getattr(trunk, "roi_levels", len(torchvision_frcnn.FPN_ROI_MAPS)))
  if roi_levels != len(torchvision_frcnn.FPN_ROI_MAPS):
    mismatch.append(f"RoIs pooled from {roi_levels} levels (torchvision's: P2 .. P5)")
  arch = {"frozen_stages": int(getattr(trunk, "frozen_stages", 2)),
          "fc_dim": _fc_dim(config, head, mismatch, 1024)}
  for key in ("canonical_scale", "canonical_level"):
    if f"roi_{key}" in config.model:
      arch[key] = int(config.model[f"roi_{key}"])
  return arch, mismatch


# Our backbone name -> (config, trunk, head) -> (the peer's own arguments, the differences
# that make our model another architecture than the peer's).
ARCHITECTURES: dict[str, Callable[..., tuple[dict[str, Any], list[str]]]] = {
    "vgg16": _vgg16, "zf": _zf, "resnet_c4": _resnet_c4, "resnet_fpn": _resnet_fpn}


def _strides(trunk: Any) -> tuple[int, ...]:
  """The backbone's output stride of each feature level (one for single-map backbones)."""
  strides = getattr(trunk, "strides", None)
  return tuple(int(s) for s in strides) if strides else (int(trunk.stride),)


def detector_args(config: ml_collections.ConfigDict, post_nms_test: int | None = None, *,
                  num_maps: int = 1, stride: int = 16) -> torchvision_frcnn.DetectorArgs:
  """The peers' shared numbers from the config's anchors, rpn, roi, test and model.roi_* keys.

  Args:
    config: the experiment config.
    post_nms_test: test proposals (default: rpn.post_nms_top_n_test).
    num_maps: the peer's feature maps; anchors.sizes is split evenly over them.
    stride: the single map's stride (the RoI op's scale is 1 / stride).

  Raises:
    PeerUnavailable: anchors.sizes does not split over the maps.
  """
  a, r, p, t, m = config.anchors, config.rpn, config.roi, config.test, config.model
  sizes = tuple(float(s) for s in a.sizes)
  if len(sizes) % num_maps:
    raise PeerUnavailable(f"anchors.sizes={sizes} do not split over the peer's {num_maps} "
                          "feature maps")
  share = len(sizes) // num_maps
  return torchvision_frcnn.DetectorArgs(
      anchor_sizes=tuple(sizes[i * share:(i + 1) * share] for i in range(num_maps)),
      anchor_ratios=tuple(float(v) for v in a.ratios),
      pre_nms_train=int(r.pre_nms_top_n_train), post_nms_train=int(r.post_nms_top_n_train),
      pre_nms_test=int(r.pre_nms_top_n_test),
      post_nms_test=int(post_nms_test or r.post_nms_top_n_test),
      rpn_nms=float(r.nms_threshold), rpn_fg_iou=float(r.positive_iou),
      rpn_bg_iou=float(r.negative_iou), rpn_batch=int(r.batch_size_per_image),
      rpn_positive_fraction=float(r.positive_fraction), rpn_min_size=float(r.min_size),
      roi_op=str(m.roi_op), roi_size=int(m.roi_size), sampling_ratio=int(m.roi_sampling_ratio),
      aligned=bool(m.roi_aligned), stride=int(stride),
      roi_batch=int(p.batch_size_per_image), roi_fg_fraction=float(p.fg_fraction),
      roi_fg_iou=float(p.fg_iou), box_weights=tuple(float(v) for v in p.box_weights),
      test_nms=float(t.nms_threshold), score_threshold=float(t.score_threshold),
      detections=int(t.detections_per_image))


def _arch_and_differences(config: ml_collections.ConfigDict
                          ) -> tuple[str, dict[str, Any], list[str], Any]:
  """(backbone name, the peer's own arguments, differences, our trunk) of the config.

  Raises:
    PeerUnavailable: the backbone has no peer.
  """
  name = str(config.model.backbone)
  if name not in ARCHITECTURES:
    raise PeerUnavailable(f"model.backbone={name} has no torchvision peer (peers: "
                          f"{', '.join(ARCHITECTURES)})")
  model = builders.model_from_config(config, cases.num_classes(config))
  arch, mismatch = ARCHITECTURES[name](config, model.trunk, model.head)
  return name, arch, mismatch, model.trunk


def differences(config: ml_collections.ConfigDict) -> list[str]:
  """What makes the config's model another architecture than its torchvision peer ([] when
  it is the same).

  Raises:
    PeerUnavailable: the backbone has no peer.
  """
  return _arch_and_differences(config)[2]


def model_args(config: ml_collections.ConfigDict, post_nms_test: int | None = None, *,
               strict: bool = True) -> dict[str, Any]:
  """`torchvision_frcnn.build_model`'s keyword arguments for the config's backbone.

  Args:
    config: the experiment config.
    post_nms_test: test proposals (default: rpn.post_nms_top_n_test).
    strict: refuse a model that differs from the peer's architecture (`differences`).

  Returns:
    {"backbone": model.backbone, "detector": `detector_args`, and the backbone's own
     arguments (`ARCHITECTURES`)}.

  Raises:
    PeerUnavailable: the backbone has no peer, or (strict) our model is not its architecture;
      the message names the backbone and the keys that differ.
  """
  name, arch, mismatch, trunk = _arch_and_differences(config)
  if strict and mismatch:
    raise PeerUnavailable(f"model.backbone={name}: the config's model is not torchvision's "
                          f"{name} architecture ({'; '.join(mismatch)})")
  multi = name == "resnet_fpn"
  detector = detector_args(config, post_nms_test,
                           num_maps=len(torchvision_frcnn.FPN_MAPS) if multi else 1,
                           stride=_strides(trunk)[0])
  return {"backbone": name, "detector": detector, **arch}


def unavailable(config: ml_collections.ConfigDict) -> str | None:
  """Why the peer cannot run for `config` (printed once), or None when it can."""
  try:
    torchvision_frcnn.import_torch()
    model_args(config)
  except PeerUnavailable as e:
    print(f"peer: not measured: {e}. Continuing with our figures only.", flush=True)
    return str(e)
  return None


def _torch_device() -> str:
  return "cpu" if machine.on_cpu() else "cuda"


def run_peer(rows: list[cases.Case], config: ml_collections.ConfigDict, steps: int,
             num_gt: int) -> dict[str, Any]:
  """torchvision's figures for each grid row's (dtype, height, width, batch).

  Returns:
    {"available": True, "backbone": model.backbone, "results": {(dtype, height, width, batch):
     `torchvision_frcnn.measure`'s figures, or {"error": message} where torch failed (e.g. out
     of memory)}}, or {"available": False, "error": why, "results": {}}.
  """
  error = unavailable(config)
  if error:
    return {"available": False, "error": error, "results": {}}
  num_classes = cases.num_classes(config)
  results = {}
  for case in rows:
    key = (case.dtype, case.height, case.width, case.batch)
    if case.group != "grid" or key in results:
      continue
    arrays = torchvision_frcnn.random_batch(case.batch, case.height, case.width, num_gt,
                                            num_classes)
    try:
      results[key] = torchvision_frcnn.measure(
          arrays, steps=steps, dtype=case.dtype, num_classes=num_classes,
          device=_torch_device(), **model_args(config, case.proposals))
    except RuntimeError as e:   # e.g. out of memory inside torch
      print(f"peer: {case.dtype} {case.height}x{case.width} batch {case.batch} failed: {e}",
            flush=True)
      results[key] = {"error": str(e)}
      continue
    print(f"peer ({config.model.backbone}): {case.dtype} {case.height}x{case.width} batch "
          f"{case.batch}: train {results[key]['train_step_s']:.3f} s/image, infer "
          f"{results[key]['infer_s']:.3f} s/image", flush=True)
  return {"available": True, "backbone": str(config.model.backbone), "results": results}


def peer_runners(config: ml_collections.ConfigDict, sizes: list[tuple[int, int]], dtype: str,
                 num_gt: int) -> dict[str, Any]:
  """torchvision's per-size runners for a size mix (`torchvision_frcnn.size_runners`).

  Returns:
    {"available": True, "runners": size_runners' result, plus its "info" entries}, or
    {"available": False, "error": why}.
  """
  error = unavailable(config)
  if error:
    return {"available": False, "error": error}
  runners = torchvision_frcnn.size_runners(
      sizes, dtype=dtype, num_classes=cases.num_classes(config), device=_torch_device(),
      num_gt=num_gt, **model_args(config))
  return {"available": True, "runners": runners, **runners["info"]}


def add_peer(row: dict[str, Any], peer: dict[str, Any]) -> None:
  """Adds torchvision's seconds per image and our speed-up over it to a measured row.

  Adds "peer_train_step_s", "peer_infer_s" and, for our timed parts,
  "{train,infer}_speedup_vs_peer" (torchvision's seconds per image over ours per device: ours
  are per image over all devices, torchvision used one). Nothing where `peer` has no figures
  for the row's (dtype, height, width, batch).
  """
  key = (row["dtype"], row["height"], row["width"], row["batch"])
  figures = peer.get("results", {}).get(key)
  if not figures or "error" in figures:
    return
  row["peer_train_step_s"] = figures["train_step_s"]
  row["peer_infer_s"] = figures["infer_s"]
  for ours, theirs, name in (("train_step_s", "peer_train_step_s", "train_speedup_vs_peer"),
                             ("infer_s", "peer_infer_s", "infer_speedup_vs_peer")):
    if row[ours] is not None:
      row[name] = row[theirs] / (row[ours] * row["num_devices"])
