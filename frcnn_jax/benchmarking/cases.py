"""The measured rows, their synthetic batches, and the programs a row is measured on.

A row (`Case`) is one compute dtype, canvas, per-device batch and test proposal count. Its
detector has random weights (`model.pretrained` is ignored), and its programs are built as
training builds them: the training step (`frcnn_jax.training.step.jit_train_step`: forward,
backward, the config's optimizer update, frozen blocks masked, jitted over the data mesh with
the state donated) and inference (`frcnn_jax.detection.detector.predict`: image in,
detections out).
"""

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from frcnn_jax.config import build as builders
from frcnn_jax.data import canvases
from frcnn_jax.detection import detector
from frcnn_jax.models import faster_rcnn
from frcnn_jax.runtime import parallel
from frcnn_jax.training import step as train_step

PARTS = ("train", "infer")
DTYPES = tuple(faster_rcnn.DTYPES)   # compute dtypes (model.dtype)
SOURCE_LONG_SIDE = 500   # VOC's images: the decoded size the device resizes from
FALLBACK_CLASSES = 80    # C where the dataset's class names are not on this machine
_SAID: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured row.

  Attributes:
    dtype: compute dtype ("float32" or "bfloat16").
    height: canvas height.
    width: canvas width.
    batch: images per device per step.
    proposals: rpn.post_nms_top_n_test (inference RoIs per image).
    parts: what is timed ("train", "infer").
    group: "grid", "sweep_size" or "sweep_proposals".
  """
  dtype: str
  height: int
  width: int
  batch: int
  proposals: int
  parts: tuple[str, ...]
  group: str = "grid"


def parse_size(text: str) -> tuple[int, int]:
  """Parses "600x800" into (600, 800).

  Raises:
    ValueError: unless the text is HxW with integers H, W >= 16 (the trunk's stride).
  """
  parts = text.lower().split("x")
  try:
    height, width = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"size {text!r} must be HEIGHTxWIDTH, e.g. 600x800") from None
  if min(height, width) < 16:
    raise ValueError(f"size {text!r}: height and width must be >= 16 (the trunk stride)")
  return height, width


def check_dtype(dtype: str) -> None:
  """Raises ValueError naming `--dtype` unless `dtype` is one of DTYPES."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r} must be one of {DTYPES}")


def num_classes(config: ml_collections.ConfigDict) -> int:
  """C, the number of foreground classes of the config's dataset.

  Where the dataset keeps its class names in files that are not on this machine (a COCO-format
  json), FALLBACK_CLASSES, said once on stdout: random weights and synthetic batches need only
  the count.
  """
  try:
    return len(builders.class_names(config))
  except OSError as e:
    message = (f"classes: {config.data.name}'s class names are not readable here "
               f"({type(e).__name__}); measuring with {FALLBACK_CLASSES} classes (COCO's)")
    if message not in _SAID:
      _SAID.add(message)
      print(message, flush=True)
    return FALLBACK_CLASSES


def default_canvas(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The canvas measured when no size is given: `data.pad_hw`, else the first of
  `data.canvases`, else a landscape image of `data.min_size` x `data.max_size` with each side
  rounded up to `data.canvas_multiple` (the canvas the largest resized image fits)."""
  d = config.data
  if len(d.pad_hw):
    return int(d.pad_hw[0]), int(d.pad_hw[1])
  if len(d.canvases):
    return int(d.canvases[0][0]), int(d.canvases[0][1])
  up = lambda n: -(-int(n) // int(d.canvas_multiple)) * int(d.canvas_multiple)
  return up(d.min_size), up(d.max_size)


def parse_positive_ints(name: str, values: list[str]) -> list[int]:
  """Parses ["1", "2"] into [1, 2].

  Raises:
    ValueError: naming the flag `--name`, unless there is at least one value and every value
      is a positive integer.
  """
  try:
    ints = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{name} must be positive integers, got {','.join(values)}") from None
  if not ints or min(ints) < 1:
    raise ValueError(f"--{name} must be positive integers, got {','.join(values)}")
  return ints


def make_cases(config: ml_collections.ConfigDict, *, dtypes: list[str] | None = None,
               sizes: list[str] | None = None, height: int | None = None,
               width: int | None = None, batch: tuple[str, ...] = ("1",),
               parts: tuple[str, ...] = PARTS, sweep: bool = False,
               sweep_sizes: tuple[str, ...] = (), sweep_proposals: tuple[str, ...] = ()
               ) -> list[Case]:
  """The rows the flags ask for; the first row is the default measurement.

  Grid: every dtype x size x batch (sizes default to `--height` / `--width`, else
  `default_canvas`; dtypes to `model.dtype`). Sweep: training and inference at each of
  `sweep_sizes`, then inference at the first sweep size for each proposal count in
  `sweep_proposals`; the first dtype and batch.

  Raises:
    ValueError: naming the flag of a bad value.
  """
  dtypes = dtypes or [config.model.dtype]
  for dtype in dtypes:
    check_dtype(dtype)
  timed = tuple(p for p in PARTS if p in parts)
  if not timed or set(parts) - set(PARTS):
    raise ValueError(f"--parts must name train and/or infer, got {','.join(parts)}")
  batches = parse_positive_ints("batch", list(batch))
  proposals = int(config.rpn.post_nms_top_n_test)
  if sweep:
    hws = [parse_size(s) for s in sweep_sizes]
    if not hws:
      raise ValueError("--sweep_sizes must name at least one size")
    cases = [Case(dtypes[0], h, w, batches[0], proposals, timed, "sweep_size") for h, w in hws]
    h, w = hws[0]
    cases += [Case(dtypes[0], h, w, batches[0], n, ("infer",), "sweep_proposals")
              for n in parse_positive_ints("sweep_proposals", list(sweep_proposals))]
    return cases
  if sizes and (height or width):
    raise ValueError("give either --sizes or --height/--width, not both")
  if sizes:
    hws = [parse_size(s) for s in sizes]
  else:
    canvas = default_canvas(config)
    hws = [(height or canvas[0], width or canvas[1])]
  return [Case(dtype, h, w, b, proposals, timed) for dtype in dtypes for h, w in hws
          for b in batches]


def case_config(config: ml_collections.ConfigDict, case: Case) -> ml_collections.ConfigDict:
  """A copy of `config` with the row's dtype and proposal count, and no pretrained weights."""
  c = config.copy_and_resolve_references()
  c.model.dtype = case.dtype
  c.model.pretrained = ""
  c.rpn.post_nms_top_n_test = case.proposals
  return c


def synthetic_batch(batch: int, height: int, width: int, max_gt: int, num_gt: int,
                    num_classes: int, seed: int = 0,
                    content_hw: tuple[int, int] | None = None,
                    resize_on_device: bool = False) -> dict[str, np.ndarray]:
  """A Batch of random images on a `height` x `width` canvas, each with `num_gt` random boxes.

  The image fills the canvas, or (`content_hw`) its top-left `content_hw` part, with zero
  padding beyond as the input pipeline pads; "image_hw" and the boxes follow the content.
  With `resize_on_device` the Batch carries what the pipeline ships when the device resizes
  (`frcnn_jax.ops.images.SOURCE_KEYS`): a random image of the content's shape with its long
  side SOURCE_LONG_SIDE on a source canvas rounded up to 32, every other image flipped; the
  step resizes it to the content size. "orig_hw" is then the source image's size, as
  `frcnn_jax.data.transforms.prepare` ships it.

  Returns:
    numpy arrays keyed as a Batch: "image" uint8 [B, H, W, 3] (or the source keys),
    "image_hw" int32 [B, 2], "scale" float32 [B], "gt_boxes" float32 [B, max_gt, 4] xyxy,
    "gt_labels" int32 [B, max_gt] (0 where invalid), "gt_valid" / "gt_difficult" bool
    [B, max_gt], "image_id" int32 [B], "orig_hw" int32 [B, 2], "valid" bool [B].

  Raises:
    ValueError: the content does not fit the canvas.
  """
  ch, cw = content_hw or (height, width)
  if not (0 < ch <= height and 0 < cw <= width):
    raise ValueError(f"content {ch}x{cw} does not fit the canvas {height}x{width}")
  rng = np.random.default_rng(seed)
  if resize_on_device:
    sh, sw = (max(1, round(v * SOURCE_LONG_SIDE / max(ch, cw))) for v in (ch, cw))
    (source_hw,) = canvases.source_canvases(np.array([[sh, sw]]), np.zeros(1), 1)
    source = np.zeros((batch, *source_hw, 3), np.uint8)
    source[:, :sh, :sw] = rng.integers(0, 256, (batch, sh, sw, 3), dtype=np.uint8)
    pixels = {"source_image": source,
              "source_hw": np.tile(np.asarray([[sh, sw]], np.int32), (batch, 1)),
              "flip": np.arange(batch) % 2 == 1,
              "canvas": np.zeros((batch, height, width, 0), np.uint8)}
    scale, orig_hw = ch / sh, (sh, sw)
  else:
    image = np.zeros((batch, height, width, 3), np.uint8)
    image[:, :ch, :cw] = rng.integers(0, 256, (batch, ch, cw, 3), dtype=np.uint8)
    pixels, scale, orig_hw = {"image": image}, 1.0, (ch, cw)
  x1 = rng.uniform(0, cw * 0.6, (batch, max_gt))
  y1 = rng.uniform(0, ch * 0.6, (batch, max_gt))
  w = rng.uniform(min(32, cw * 0.2), cw * 0.4, (batch, max_gt))
  h = rng.uniform(min(32, ch * 0.2), ch * 0.4, (batch, max_gt))
  valid = np.arange(max_gt)[None, :] < min(num_gt, max_gt)
  valid = np.broadcast_to(valid, (batch, max_gt)).copy()
  return {
      **pixels,
      "image_hw": np.tile(np.asarray([[ch, cw]], np.int32), (batch, 1)),
      "scale": np.full(batch, scale, np.float32),
      "gt_boxes": np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32),
      "gt_labels": np.where(valid, rng.integers(1, num_classes + 1, (batch, max_gt)), 0
                            ).astype(np.int32),
      "gt_valid": valid,
      "gt_difficult": np.zeros((batch, max_gt), bool),
      "image_id": np.arange(batch, dtype=np.int32),
      "orig_hw": np.tile(np.asarray([orig_hw], np.int32), (batch, 1)),   # = source_hw
      "valid": np.ones(batch, bool),
  }


@dataclasses.dataclass(frozen=True)
class Programs:
  """A row's detector and its jitted (not yet compiled) programs.

  Attributes:
    config: the row's config (`case_config`).
    model: the Flax detector.
    settings: its detector settings (`builders.detector_settings_from_config`).
    mesh: the data mesh the programs run on.
    train: the jitted training step, (state, batch) -> (state, metrics); donates the state.
    predict: jitted `detector.predict`, (params, batch) -> detections.
  """
  config: ml_collections.ConfigDict
  model: Any
  settings: Any
  mesh: jax.sharding.Mesh
  train: Any
  predict: Any

  def host_batch(self, batch: int, height: int, width: int, num_gt: int,
                 content_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """This process's share of a `synthetic_batch` of `batch` images per device, shaped as
    the row's input pipeline ships it (`data.resize_on`)."""
    c = self.config
    return synthetic_batch(batch * self.mesh.devices.size // jax.process_count(), height,
                           width, c.data.max_gt, num_gt, num_classes(c),
                           content_hw=content_hw, resize_on_device=builders.resize_on_device(c))

  def global_batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch placed on the mesh as training places it."""
    return parallel.host_batch_to_global(host, self.mesh)


def build(config: ml_collections.ConfigDict, case: Case, mesh: jax.sharding.Mesh
          ) -> tuple[Programs, Any]:
  """The row's detector with random weights, its programs, and a fresh training state.

  Returns:
    (Programs, the train state of `frcnn_jax.training.step.create_train_state` on `mesh`).
  """
  c = case_config(config, case)
  model = builders.model_from_config(c, num_classes(c))
  settings = builders.detector_settings_from_config(c)
  state, tx, lr_fn = train_step.create_train_state(c, model, mesh)
  train = train_step.jit_train_step(model, settings, tx, lr_fn, mesh,
                                    grad_accum_steps=c.train.grad_accum_steps)
  predict = jax.jit(functools.partial(detector.predict, model=model, settings=settings))
  return Programs(c, model, settings, mesh, train, predict), state
