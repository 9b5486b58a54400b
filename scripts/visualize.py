r"""Debug pictures of a detector on a few dataset images: ground truth, anchors, proposals,
detections (one PNG each).

Usage:

  python scripts/visualize.py --config experiments/shapes.py --workdir runs/shapes \
      --output vis/ [--split eval] [--num_images 4] [--anchor_xy 64,64] [--top_proposals 20] \
      [--threshold 0.5]

For image k of the split, writes into OUT:
  <k>_<name>_gt.png          ground-truth boxes with class names (difficult ones dashed);
  <k>_<name>_anchors.png     the anchors of the feature-map cell under --anchor_xy (original
                             pixels; default the image centre), with the cell outlined;
  <k>_<name>_proposals.png   the top RPN proposals (test settings) with objectness scores;
  <k>_<name>_detections.png  final detections scoring at least --threshold.
Without --workdir (no trained model) only the first two are drawn.
"""

import functools
import os
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from frcnn_jax import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax import detect  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax import detector  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax import drawing  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.models import faster_rcnn  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.ops import anchors as anchor_ops  # pylint: disable=g-import-not-at-top,wrong-import-position

def anchors_at(config, model, batch: dict, x: float, y: float
               ) -> tuple[np.ndarray, np.ndarray]:
  """The anchors of the feature cell under original-pixel (x, y), and the cell's box.

  Returns:
    anchors [A, 4] and cell [4], in original-image pixels.
  """
  m = config.model
  abstract_params = jax.eval_shape(functools.partial(faster_rcnn.init_params, model),
                                   jax.random.key(0))
  feats = jax.eval_shape(
      lambda p, im, hw: model.apply({"params": p}, im, hw,
                                    method=faster_rcnn.FasterRCNN.features_and_rpn)[0],
      abstract_params, batch["image"], batch["image_hw"])
  feat_h, feat_w = feats.shape[1:3]
  scale = float(batch["scale"][0])
  stride = m.anchor_stride
  i = int(np.clip(y * scale // stride, 0, feat_h - 1))
  j = int(np.clip(x * scale // stride, 0, feat_w - 1))
  grid = np.asarray(anchor_ops.anchor_grid(feat_h, feat_w, stride, tuple(m.anchor_sizes),
                                           tuple(m.anchor_ratios)))
  per_cell = len(m.anchor_sizes) * len(m.anchor_ratios)
  start = (i * feat_w + j) * per_cell
  cell = np.array([j * stride, i * stride, (j + 1) * stride, (i + 1) * stride], np.float64)
  return grid[start:start + per_cell] / scale, cell / scale


def draw_examples(config, output: str | os.PathLike, *, params=None, split: str = "eval",
                  num_images: int = 4, anchor_xy: tuple[float, float] | None = None,
                  top_proposals: int = 20, threshold: float = 0.5) -> list[pathlib.Path]:
  """Writes the debug PNGs of the first `num_images` images of a split.

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
    stem = f"{k:03d}_{example['name']}"
    pictures = {}
    batch = detect.prepare(image, config)
    difficult = example["difficult"]
    picture = drawing.draw_boxes(image, example["boxes"][~difficult],
                                 example["labels"][~difficult], None, names)
    pictures["gt"] = drawing.draw_boxes(picture, example["boxes"][difficult],
                                        example["labels"][difficult], None, names, dashed=True)
    x, y = anchor_xy or (image.shape[1] / 2, image.shape[0] / 2)
    anchors, cell = anchors_at(config, model, batch, x, y)
    picture = drawing.draw_boxes(image, cell[None], colour=(255, 255, 255), width=1)
    pictures["anchors"] = drawing.draw_boxes(picture, anchors, colour=(255, 200, 0))
    if params is not None:
      props = jax.device_get(detector.proposals(params, batch, model=model, settings=settings))
      keep = np.flatnonzero(props["valid"][0])[:top_proposals]
      pictures["proposals"] = drawing.draw_boxes(
          image, props["boxes"][0][keep], np.ones(len(keep), int), props["scores"][0][keep],
          ["rpn"], colour=(0, 200, 255))
      dets = jax.device_get(detector.predict(params, batch, model=model, settings=settings))
      shown = dets["valid"][0] & (dets["scores"][0] >= threshold)
      pictures["detections"] = drawing.draw_boxes(
          image, dets["boxes"][0][shown], dets["labels"][0][shown], dets["scores"][0][shown],
          names)
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
  if f.output is None or f.config is None:
    raise app.UsageError("--config and --output are required")
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
    if f.workdir:
      mesh = parallel.make_mesh(jax.local_devices()[:1])
      params, step = evaluate.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
      print(f"checkpoint step {step}")
    paths = draw_examples(f.config, f.output, params=params, split=f.split,
                          num_images=f.num_images, anchor_xy=anchor_xy,
                          top_proposals=f.top_proposals, threshold=f.threshold)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {len(paths)} pictures to {f.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
