"""torchvision's Faster R-CNN (`torchvision_frcnn`) configured from an experiment config and
measured beside our rows on the same device, sizes, dtypes and batch.

Where torch or torchvision is missing, or the config's trunk is not VGG16 (the peer always
is), nothing is measured and the results say why; the caller carries on with its own
figures.
"""

from typing import Any

import ml_collections

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import torchvision_frcnn
from frcnn_jax.config import build as builders
from frcnn_jax.models.backbones import vgg16 as vgg


def _trunk_and_head(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """The config's backbone and RoI head modules (built, not initialised).

  Raises:
    torchvision_frcnn.PeerUnavailable: they are not the peer's (full VGG16, fc head).
  """
  model = builders.model_from_config(config, cases.num_classes(config))
  trunk, head = model.trunk, model.head
  if (not isinstance(trunk, vgg.VGG16) or trunk.width != 1.0
      or tuple(trunk.convs_per_block) != vgg.VGG16_CONVS_PER_BLOCK):
    raise torchvision_frcnn.PeerUnavailable(
        f"the config's trunk is not VGG16 (model.backbone={config.model.backbone}, width="
        f"{getattr(trunk, 'width', '-')}, convs_per_block="
        f"{tuple(getattr(trunk, 'convs_per_block', ()))}); the torchvision peer is always VGG16")
  if not hasattr(head, "dim"):
    raise torchvision_frcnn.PeerUnavailable(
        f"the config's RoI head (model.roi_head={config.model.roi_head}) is not the fc head "
        "of the torchvision peer")
  return trunk, head


def unavailable(config: ml_collections.ConfigDict) -> str | None:
  """Why the peer cannot run for `config` (printed once), or None when it can."""
  try:
    torchvision_frcnn.import_torch()
    _trunk_and_head(config)
  except torchvision_frcnn.PeerUnavailable as e:
    print(f"peer: not measured: {e}. Continuing with our figures only.", flush=True)
    return str(e)
  return None


def _model_args(config: ml_collections.ConfigDict, post_nms_test: int) -> dict[str, Any]:
  """`torchvision_frcnn.build_model`'s keyword arguments from the config."""
  trunk, head = _trunk_and_head(config)
  r, p, t = config.rpn, config.roi, config.test
  return dict(frozen_blocks=trunk.frozen_blocks, fc_dim=head.dim,
              pre_nms_train=r.pre_nms_top_n_train, post_nms_train=r.post_nms_top_n_train,
              pre_nms_test=r.pre_nms_top_n_test, post_nms_test=post_nms_test,
              rpn_batch=r.batch_size_per_image, roi_batch=p.batch_size_per_image,
              test_nms=t.nms_threshold, score_threshold=t.score_threshold,
              detections=t.detections_per_image)


def _torch_device() -> str:
  return "cpu" if machine.on_cpu() else "cuda"


def run_peer(rows: list[cases.Case], config: ml_collections.ConfigDict, steps: int,
             num_gt: int) -> dict[str, Any]:
  """torchvision's figures for each grid row's (dtype, height, width, batch).

  Returns:
    {"available": True, "results": {(dtype, height, width, batch): `torchvision_frcnn.measure`'s
     figures, or {"error": message} where torch failed (e.g. out of memory)}}, or
    {"available": False, "error": why, "results": {}}.
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
          device=_torch_device(), **_model_args(config, case.proposals))
    except RuntimeError as e:   # e.g. out of memory inside torch
      print(f"peer: {case.dtype} {case.height}x{case.width} batch {case.batch} failed: {e}",
            flush=True)
      results[key] = {"error": str(e)}
      continue
    print(f"peer: {case.dtype} {case.height}x{case.width} batch {case.batch}: train "
          f"{results[key]['train_step_s']:.3f} s/image, infer {results[key]['infer_s']:.3f} "
          f"s/image", flush=True)
  return {"available": True, "results": results}


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
      num_gt=num_gt, **_model_args(config, config.rpn.post_nms_top_n_test))
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
