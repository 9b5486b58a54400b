r"""Debug pictures of a detector on a few dataset images: ground truth, anchors, proposals,
detections (one PNG each).

Usage:

  python scripts/visualize.py --workdir runs/shapes --output vis/ [--split eval] \
      [--num_images 4] [--anchor_xy 64,64] [--top_proposals 20] [--threshold 0.5]
  python scripts/visualize.py --config experiments/shapes.py --output vis/   # no model yet

The run's config (WORKDIR/config.json) is used by default, as in `evaluate`. For image k of
the split, writes into OUT (images with a shorter side under 256 px are enlarged):
  <k>_<name>_gt.png          ground-truth boxes with class names (difficult ones dashed);
  <k>_<name>_anchors.png     the anchors of the feature-map cell under --anchor_xy (original
                             pixels; default the image centre), the cell dashed, a legend of
                             anchor sizes and aspect ratios (h/w);
  <k>_<name>_proposals.png   the top RPN proposals (test settings) coloured by objectness,
                             with a colour bar;
  <k>_<name>_detections.png  the ground truth next to the detections scoring >= --threshold.
Without --workdir (no trained model) only the first two are drawn.
"""

import colorsys
import functools
import logging
import os
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import app
from absl import flags

from frcnn_jax import detect
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.config import run as run_config
from frcnn_jax.detection import detector
from frcnn_jax.evaluation import runner as eval_runner
from frcnn_jax.models import faster_rcnn
from frcnn_jax.runtime import parallel
from frcnn_jax.training import restore
from frcnn_jax.visualization import drawing


def anchors_at(config, model, batch: dict, x: float, y: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The anchors of the feature cell under original-pixel (x, y) on every feature level (one
  for single-map backbones), as the detector builds them.

  Returns:
    anchors [N, 4], the index into `config.anchors.sizes` of each [N], and the cells [L, 4]
    (one per level), boxes in original-image pixels.
  """
  abstract_params = jax.eval_shape(functools.partial(faster_rcnn.init_params, model),
                                   jax.random.key(0))
  feats = jax.eval_shape(
      lambda p, im, hw: model.apply({"params": p}, im, hw,
                                    method=faster_rcnn.FasterRCNN.features_and_rpn)[0],
      abstract_params, batch["image"], batch["image_hw"])
  levels = faster_rcnn.feature_levels(feats)
  settings = builders.detector_settings_from_config(config)
  canvas = tuple(batch["image"].shape[1:3])
  grid, counts = detector.pyramid_anchors(levels, canvas, settings)
  scale = float(batch["scale"][0])
  per_level = settings.anchors.per_level(len(levels))
  anchors, size_index, cells, start = [], [], [], 0
  for level, (stride, sizes) in enumerate(zip(settings.strides, per_level)):
    feat_h, feat_w = levels[level].shape[1:3]
    stride_y, stride_x = ((canvas[0] // feat_h, canvas[1] // feat_w)
                          if settings.anchors.style == "torchvision" else (stride, stride))
    i = int(np.clip(y * scale // stride_y, 0, feat_h - 1))
    j = int(np.clip(x * scale // stride_x, 0, feat_w - 1))
    per_cell = len(sizes) * len(settings.anchors.ratios)
    first = start + (i * feat_w + j) * per_cell
    anchors.append(grid[first:first + per_cell])
    size_index.append(level * len(sizes) + np.arange(per_cell) % len(sizes))  # size-minor
    cells.append([j * stride_x, i * stride_y, (j + 1) * stride_x, (i + 1) * stride_y])
    start += counts[level]
  return (np.concatenate(anchors) / scale, np.concatenate(size_index),
          np.asarray(cells, np.float64) / scale)


def size_colours(sizes: Sequence[float]) -> list[tuple[tuple[int, int, int], str]]:
  """One (colour, "size S") legend entry per anchor size; the aspect ratios of a size share its
  colour (their boxes' shapes tell them apart)."""
  entries = []
  for k, size in enumerate(sizes):
    rgb = colorsys.hsv_to_rgb(k / max(len(sizes), 1), 0.9, 1.0)
    entries.append((tuple(int(c * 255) for c in rgb), f"{size:g} px"))
  return entries


def draw_examples(config, output: str | os.PathLike, *, params=None, split: str = "eval",
                  num_images: int = 4, anchor_xy: tuple[float, float] | None = None,
                  top_proposals: int = 20, threshold: float = 0.5) -> list[pathlib.Path]:
  """Writes the debug PNGs of the first `num_images` images of a split.

  Small images are enlarged (nearest neighbour, by an integer factor) so that captions and
  legends stay readable.

  Args:
    config: the experiment config.
    output: output folder (created).
    params: network parameters; None draws only ground truth and anchors.
    split: "train" or "eval".
    num_images: how many images.
    anchor_xy: (x, y) in original pixels of the cell whose anchors are drawn; None: centre.
    top_proposals: proposals drawn (highest objectness first).
    threshold: minimum score of the drawn detections.

  Returns:
    The written paths.
  """
  source = builders.source_from_config(config, split)
  names = tuple(source.classes)
  model = builders.model_from_config(config, len(names))
  settings = builders.detector_settings_from_config(config)
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for k in range(min(num_images, len(source))):
    example = source[k]
    if example is None:
      continue
    image = example["image"]
    f = drawing.display_factor(image.shape[:2])
    shown = drawing.enlarge(image, f)
    stem = f"{k:03d}_{example['name']}"
    pictures = {}
    batch = detect.prepare(image, config)
    difficult = example["difficult"]
    picture = drawing.draw_boxes(shown, example["boxes"][~difficult] * f,
                                 example["labels"][~difficult], None, names)
    pictures["gt"] = drawing.draw_boxes(picture, example["boxes"][difficult] * f,
                                        example["labels"][difficult], None, names, dashed=True)
    x, y = anchor_xy or (image.shape[1] / 2, image.shape[0] / 2)
    anchors, size_index, cells = anchors_at(config, model, batch, x, y)
    legend = size_colours(config.anchors.sizes)
    picture = shown
    for box, k in zip(anchors, size_index):
      picture = drawing.draw_boxes(picture, box[None] * f, colour=legend[k][0])
    picture = drawing.draw_boxes(picture, cells * f, colour=(255, 255, 255), width=2,
                                 dashed=True)
    ratios = ", ".join(f"{r:g}" for r in config.anchors.ratios)
    where = "feature cell" if len(cells) == 1 else f"cells of the {len(cells)} feature levels"
    pictures["anchors"] = drawing.add_legend(
        picture, legend, f"the {len(anchors)} anchors of the {where} (white, dashed) at "
        f"x={x:g}, y={y:g}: one colour per size, aspect ratios h/w {ratios}")
    if params is not None:
      props = jax.device_get(detector.proposals(params, batch, model=model, settings=settings))
      valid = np.flatnonzero(props["valid"][0])
      keep = valid[:top_proposals]
      scores = props["scores"][0][keep]
      low, high = (float(scores.min()), float(scores.max())) if len(keep) else (0.0, 1.0)
      picture = drawing.draw_scored_boxes(shown, props["boxes"][0][keep] * f, scores, low, high)
      pictures["proposals"] = drawing.add_colour_bar(
          picture, low, high, f"top {len(keep)} of {len(valid)} RPN proposals by objectness")
      dets = jax.device_get(detector.predict(params, batch, model=model, settings=settings))
      chosen = dets["valid"][0] & (dets["scores"][0] >= threshold)
      boxes = eval_runner.clip_to_image(dets["boxes"][0][chosen], *image.shape[:2])
      found = drawing.draw_boxes(shown, boxes * f, dets["labels"][0][chosen],
                                 dets["scores"][0][chosen], names)
      pictures["detections"] = drawing.side_by_side(
          [pictures["gt"], found],
          ["ground truth (difficult dashed)", f"detections, score >= {threshold:g}"])
    for kind, picture in pictures.items():
      path = out / f"{stem}_{kind}.png"
      picture.save(path)
      written.append(path)
  return written


def define_flags() -> None:
  """Defines the script's flags."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Training run directory; without it only the ground "
                      "truth and anchors are drawn.")
  flags.DEFINE_string("output", None, "Output folder for the PNGs.")
  flags.DEFINE_enum("split", "eval", ["train", "eval"], "Dataset split to draw from.")
  flags.DEFINE_integer("num_images", 4, "How many images (the first ones).")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
  flags.DEFINE_string("anchor_xy", "", "x,y in original-image pixels of the cell whose "
                      "anchors are drawn; empty: the image centre.")
  flags.DEFINE_integer("top_proposals", 20, "Proposals drawn (highest objectness).")
  flags.DEFINE_float("threshold", 0.5, "Minimum score of drawn detections.")


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if f.output is None:
    raise app.UsageError("--output is required")
  anchor_xy = None
  if f.anchor_xy:
    try:
      anchor_xy = tuple(float(v) for v in f.anchor_xy.split(","))
    except ValueError:
      anchor_xy = ()
    if len(anchor_xy) != 2:
      raise app.UsageError(f"--anchor_xy must be x,y, got {f.anchor_xy!r}")
  params = None
  try:
    resolved = run_config.from_flags(f.workdir)
    for note in resolved.notes:
      logging.warning("%s", note)
    if f.workdir:
      mesh = parallel.make_mesh(jax.local_devices()[:1])
      params, step = restore.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
      print(f"checkpoint step {step}")
    paths = draw_examples(resolved.config, f.output, params=params, split=f.split,
                          num_images=f.num_images, anchor_xy=anchor_xy,
                          top_proposals=f.top_proposals, threshold=f.threshold)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {len(paths)} pictures to {f.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
