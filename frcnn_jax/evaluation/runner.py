"""Runs a detector over the eval split and scores it: detections, metrics, reports.

The ground truth is the source's original annotation of every image that went through the
model (`source.annotation(image_id)`, as the PASCAL devkit reads it), not the resized and
`data.max_gt`-padded boxes of the batches: objects beyond `max_gt` and boxes that vanish at the
resized scale still count. Images the input pipeline skipped (undecodable) are not evaluated.

`python -m frcnn_jax.evaluate` and the training loop (`evaluate_params`) both use it.
"""

import functools
import json
import logging
import math
import os
import pathlib
import sys
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from frcnn_jax.config import build as builders
from frcnn_jax.detection import detector
from frcnn_jax.evaluation import coco as coco_eval
from frcnn_jax.evaluation import plots
from frcnn_jax.evaluation import voc as voc_eval
from frcnn_jax.ops import images as image_ops
from frcnn_jax.runtime import atomic_io
from frcnn_jax.runtime import console
from frcnn_jax.runtime import parallel

METRICS = ("voc07", "voc12", "coco")
_ID_KEYS = ("image_id", "orig_hw", "valid")


def clip_to_image(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """Clips [K, 4] xyxy boxes to an image of the given original size.

  `predict` clips in the resized frame, whose size is rounded, so dividing by the scale can
  overshoot the original border by a fraction of a pixel (py-faster-rcnn clips in the original
  frame, as here).
  """
  limits = np.array([width, height, width, height], np.float64)
  return np.clip(np.asarray(boxes, np.float64), 0.0, limits)


@functools.lru_cache(maxsize=8)
def _gathered_predict(model, settings: detector.DetectorSettings, mesh: jax.sharding.Mesh):
  """jit(predict + the batch's image ids) whose outputs are replicated on every device.

  Replicated outputs are the gather: every process can read the whole global batch.
  """

  def step(params, batch):
    out = detector.predict(params, batch, model=model, settings=settings)
    return out, {k: batch[k] for k in _ID_KEYS}

  return jax.jit(step, out_shardings=parallel.replicated(mesh))


def _to_global(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local batch slices -> global arrays sharded over `data` (global arrays pass)."""
  if all(isinstance(v, jax.Array) for v in batch.values()):
    return dict(batch)
  return parallel.host_batch_to_global(dict(batch), mesh)


def collect_detections(params: Any, batches: Iterable[Mapping[str, Any]], *, source,
                       model, settings: detector.DetectorSettings, mesh: jax.sharding.Mesh,
                       total: int | None = None, progress: bool = False
                       ) -> tuple[list[dict], list[dict], np.ndarray]:
  """Runs inference over eval batches; pairs every evaluated image with its original annotation.

  The detections of all processes are gathered; the ground truth of each image is looked up
  by the image id that came back from the model.

  Args:
    params: network parameters (replicated on `mesh`, or host arrays).
    batches: Batches (docs/conventions.md) with "image_id", "orig_hw" and "valid": each process's
      slice as numpy, or global arrays already sharded on `mesh`.
    source: the dataset source the batches were made from; `source.annotation(image_id)` is
      the ground truth of each valid example (images the pipeline skipped are not evaluated).
    model: the network (static).
    settings: detector settings (static).
    mesh: the data mesh over all devices.
    total: number of images, for the progress line.
    progress: print a progress line on stderr (process 0 only).

  Returns:
    (detections, ground_truths, image_ids), sorted by image id, identical on every process:
    detections[i] = {"boxes" [K, 4] original pixels, "scores" [K], "labels" [K]},
    ground_truths[i] = {"boxes" [G, 4] original pixels, "labels" [G], "difficult" [G]}, all
    of the image's annotated objects.

  Raises:
    ValueError: an image id appears twice among the valid examples, or an image's size in
      the batch differs from its annotation's (the batches come from another source).
  """
  step = _gathered_predict(model, settings, mesh)
  bar = console.ProgressLine(total, label="eval", unit="images", stream=sys.stderr,
                             enabled=progress and jax.process_index() == 0, overwrite=True,
                             interval=0.5 if console.is_terminal(sys.stderr) else 10.0)
  per_image: dict[int, tuple[dict, dict]] = {}

  def record(outputs) -> None:
    out, ids = jax.device_get(outputs)
    for b in np.flatnonzero(ids["valid"]):
      image_id = int(ids["image_id"][b])
      if image_id in per_image:
        raise ValueError(f"image id {image_id} appears twice in the eval batches")
      ann = source.annotation(image_id)
      if not np.array_equal(ann["orig_hw"], ids["orig_hw"][b]):
        raise ValueError(f"image id {image_id} ({ann['name']}) is {ids['orig_hw'][b].tolist()} "
                         f"(HxW) in the eval batches but {ann['orig_hw'].tolist()} in the "
                         "source's annotation: the batches were made from another source")
      keep = out["valid"][b]
      per_image[image_id] = (
          {"boxes": clip_to_image(out["boxes"][b][keep], *ann["orig_hw"]),
           "scores": out["scores"][b][keep].astype(np.float64),
           "labels": out["labels"][b][keep].astype(np.int64)},
          {"boxes": ann["boxes"].astype(np.float64),
           "labels": ann["labels"].astype(np.int64),
           "difficult": ann["difficult"].astype(bool)})
    bar.update(len(per_image), {"img/s": bar.rate(len(per_image))})

  pending = None
  for batch in batches:
    local = len(batch["valid"])
    if local * jax.process_count() % mesh.devices.size:
      raise ValueError(f"eval batch of {local * jax.process_count()} images does not split "
                       f"evenly over {mesh.devices.size} devices: make eval.batch_size a "
                       "multiple of the device count")
    batch = _to_global({k: batch[k] for k in image_ops.input_keys(batch) + _ID_KEYS}, mesh)
    outputs = step(params, batch)       # dispatched; runs while the previous one is read
    if pending is not None:
      record(pending)
    pending = outputs
  if pending is not None:
    record(pending)
  bar.update(len(per_image), {"img/s": bar.rate(len(per_image))}, final=True)
  ids = np.array(sorted(per_image), np.int64)
  return [per_image[i][0] for i in ids], [per_image[i][1] for i in ids], ids


def compute_metrics(detections: Sequence[dict], ground_truths: Sequence[dict],
                    class_names: Sequence[str], *, metric: str = "voc07",
                    iou_threshold: float = 0.5, also_coco: bool = False) -> dict:
  """The evaluation metric plus the VOC curves (always computed, for the PR plots).

  Args:
    detections: per-image detections (see `collect_detections`).
    ground_truths: per-image ground truth.
    class_names: C names; label c is class_names[c - 1].
    metric: "voc07", "voc12" or "coco" (decides "map" and "ap").
    iou_threshold: the VOC matching threshold.
    also_coco: add the COCO numbers under "coco" even for a VOC metric.

  Returns:
    {"metric", "map", "ap": {class: float or None}, "classes_without_gt": [names],
     "num_images", "iou_threshold", "voc": the voc.evaluate result, and "coco" (COCO stats
     without the per-class arrays) when the metric is coco or `also_coco`}.
  """
  if metric not in METRICS:
    raise ValueError(f"eval.metric must be one of {METRICS}, got {metric!r}")
  num_classes = len(class_names)
  voc = voc_eval.evaluate(detections, ground_truths, num_classes, iou_threshold=iou_threshold,
                          use_07_metric=metric != "voc12")
  result = {"metric": metric, "iou_threshold": float(iou_threshold),
            "num_images": len(ground_truths), "voc": voc}
  ap = voc["ap"]
  mean_ap = voc["map"]
  if metric == "coco" or also_coco:
    stats = coco_eval.evaluate(detections, ground_truths, num_classes)
    if metric == "coco":
      ap, mean_ap = stats["ap"], stats["map"]
    result["coco"] = {k: v for k, v in stats.items() if k not in ("ap", "ap50", "map")}
  result["map"] = float(mean_ap)
  result["ap"] = {name: (float(a) if np.isfinite(a) else None)
                  for name, a in zip(class_names, ap)}
  result["classes_without_gt"] = [name for name, a in zip(class_names, ap) if not np.isfinite(a)]
  return result


def format_table(result: Mapping[str, Any]) -> str:
  """The per-class AP table and the mean, as printed by the command."""
  width = max([len(n) for n in result["ap"]] + [5])
  lines = [f"{'class':<{width}}  AP ({result['metric']})"]
  for name, ap in result["ap"].items():
    lines.append(f"{name:<{width}}  {'  n/a (no ground truth)' if ap is None else f'{ap:.4f}'}")
  lines.append(f"{'mAP':<{width}}  {result['map']:.4f}   "
               f"({console.count(result['num_images'], 'image')})")
  if "coco" in result:
    lines.append(result["coco"]["summary"].rstrip())
  return "\n".join(lines)


def _json_value(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_report(result: Mapping[str, Any], out_dir: str | os.PathLike, *, split: str,
                 step: int, class_names: Sequence[str], stem: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes `<out_dir>/<stem>.json` and the PR plots in `<out_dir>/<stem>/`.

  Args:
    result: `compute_metrics`'s result.
    out_dir: the folder (created).
    split: the eval split's name.
    step: the checkpoint step.
    class_names: C names.
    stem: the file name without ".json"; default `<split>-<step>`.
    extra: more JSON fields (e.g. the command's config overrides).

  Returns:
    The JSON path (written atomically: a temporary file renamed into place).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = stem or f"{split}-{step}"
  voc = result["voc"]
  report = {
      "map": _json_value(result["map"]), "ap": result["ap"], "step": int(step),
      "metric": result["metric"], "split": split, "iou_threshold": result["iou_threshold"],
      "num_images": result["num_images"], "classes_without_gt": result["classes_without_gt"],
      "npos": {n: int(v) for n, v in zip(class_names, voc["npos"])},
      "num_detections": {n: int(v) for n, v in zip(class_names, voc["num_detections"])},
  }
  if "coco" in result:
    report["coco"] = {k: _json_value(v) for k, v in result["coco"].items() if k != "summary"}
  report.update(extra or {})
  path = out_dir / f"{stem}.json"
  atomic_io.write_text(path, json.dumps(report, indent=2) + "\n")
  plots.plot_pr_curves(out_dir / stem, voc, class_names)
  return path


def evaluate_params(params: Any, batches: Iterable[Mapping[str, Any]], *, source,
                    config: ml_collections.ConfigDict, model,
                    settings: detector.DetectorSettings, mesh: jax.sharding.Mesh, step: int,
                    class_names: Sequence[str], split: str, workdir: str | None = None,
                    num_images: int | None = None, progress: bool = False,
                    also_coco: bool = False) -> dict:
  """Evaluates parameters on eval batches; what the training loop calls periodically.

  Every process must call it (inference and the gather are collective); all get the same
  result; only process 0 writes files.

  Args:
    params: network parameters (replicated on `mesh`).
    batches: one pass over the eval split (the pipeline's `eval_batches`).
    source: the eval source the batches were made from (its `annotation(i)` is the ground
      truth).
    config: the experiment config (`eval.metric`, `eval.iou_threshold`).
    model: the network.
    settings: detector settings (`builders.detector_settings_from_config`).
    mesh: the data mesh.
    step: the training step the parameters belong to (names the report).
    class_names: C names; label c is class_names[c - 1].
    split: the eval split's name for the report file, e.g. "test".
    workdir: writes `workdir/eval/<split>-<step>.json` and PR plots when given.
    num_images: for the progress line.
    progress: print a progress line.
    also_coco: add COCO numbers to a VOC evaluation.

  Returns:
    `compute_metrics`'s result plus "step" and "path" (the JSON path or None).
  """
  dets, gts, _ = collect_detections(params, batches, source=source, model=model,
                                    settings=settings, mesh=mesh, total=num_images,
                                    progress=progress)
  result = compute_metrics(dets, gts, class_names, metric=config.eval.metric,
                           iou_threshold=config.eval.iou_threshold, also_coco=also_coco)
  result["step"] = int(step)
  result["path"] = None
  if workdir is not None and jax.process_index() == 0:
    result["path"] = str(write_report(result, pathlib.Path(workdir) / "eval", split=split,
                                      step=step, class_names=class_names))
  # DEBUG: the callers print the result once (train its eval line, this command its table).
  logging.debug("eval step %d: %s mAP %.4f over %d images", step, result["metric"],
                result["map"], result["num_images"])
  return result


def split_name(config: ml_collections.ConfigDict) -> str:
  """The eval split's name in report file names: the dataset's `eval_split`, else "test"."""
  return config.data[config.data.name].get("eval_split", "test")


def run_evaluation(config: ml_collections.ConfigDict, params: Any, *, step: int,
                   workdir: str | None = None, mesh: jax.sharding.Mesh | None = None,
                   model=None, settings: detector.DetectorSettings | None = None,
                   progress: bool = False, also_coco: bool = False) -> dict:
  """Evaluates `params` on the config's eval split (source and batches built from `config`).

  `eval.batch_size` is rounded up to a multiple of the device count if needed.

  Args:
    config: the experiment config.
    params: network parameters.
    step: training step (names the report).
    workdir: where `eval/<split>-<step>.json` and the plots go (None: nothing written).
    mesh: data mesh (default: all devices).
    model: the network (default: built from `config` and the eval source's classes).
    settings: detector settings (default: from `config`).
    progress: print a progress line.
    also_coco: add COCO numbers to a VOC evaluation.

  Returns:
    See `evaluate_params`.
  """
  builders.compilation_cache_from_config(config)
  mesh = parallel.make_mesh() if mesh is None else mesh
  devices = mesh.devices.size
  if config.eval.batch_size % devices:
    # Round up: the extra slots of each batch are valid=False padding, dropped from the metric.
    config = config.copy_and_resolve_references()
    config.eval.batch_size = -(-config.eval.batch_size // devices) * devices
    logging.info("eval.batch_size rounded up to %d, a multiple of the %d devices",
                 config.eval.batch_size, devices)
  source = builders.source_from_config(config, "eval")
  model = builders.model_from_config(config, len(source.classes)) if model is None else model
  settings = builders.detector_settings_from_config(config) if settings is None else settings
  batches = builders.eval_data_from_config(config, source, mesh)
  return evaluate_params(params, batches, source=source, config=config, model=model,
                         settings=settings, mesh=mesh, step=step, class_names=source.classes,
                         split=split_name(config), workdir=workdir,
                         num_images=len(source), progress=progress, also_coco=also_coco)
