"""What every dataset source shares: the registry, the bad-input policy, box cleaning and the
indexed file source.

Bad-input policy (`bad_input`):
  * "skip": the bad item (one box, or one whole image) is left out with a `logging.warning`
    naming the file and the problem, and counted in the source's `BadInputLog`.
  * "error": a ValueError naming the file and the problem is raised.
Problems that are handled, not skipped, under both policies: boxes partly outside the image are
clipped to it (counted in `BadInputLog.clipped`), grayscale/palette/RGBA/CMYK images are
converted to RGB, images without objects are kept as all-background examples (training leaves
them out, as py-faster-rcnn does, through `WithObjects` when `data.drop_images_without_objects`).

Annotation problems are found when a source is built; image decoding happens when a record is
read (in the input worker processes), where a bad image makes `source[i]` return None under "skip"
(the pipeline filters it out) and raise `images.ImageDecodeError` (a ValueError) under "error".

Every source also has `annotation(i)`: the Example fields of record i other than the image and
its id ("boxes", "labels", "difficult", "name", "orig_hw"; `ANNOTATION_KEYS`), exactly as
`source[i]` returns them, without decoding the image (the evaluator reads the original ground
truth through it). It does not check the pixels: for a record whose image `source[i]` skips as
undecodable it still returns the annotation (the evaluator only asks for records that came
back from the input pipeline), except that the tfds source, whose records hold no image size,
reads it from the image header and raises `images.ImageDecodeError` when that is unreadable.
"""

import logging
import os
from typing import Any
from typing import Callable

import numpy as np

from frcnn_jax.config import registry
from frcnn_jax.data import images

POLICIES = ("skip", "error")

# The dataset sources by `data.name`. An entry is a frozen dataclass whose `setting` fields are
# its config section `data.<name>` and whose methods are
#   make(split, *, bad_input, seed) -> source   # split "train" or "eval"; a random-access
#       source: len(s), s[i] (an Example dict or None when skipped), s.annotation(i),
#       s.classes, s.name, s.bad_input_log
#   class_names() -> tuple[str, ...] | None     # None: only the data knows them
# and may set `always_has_objects = True` (every record holds an object: training need not
# check for images without one, `WithObjects`).
SOURCES = registry.Registry("data.name")
MAX_WARNINGS = 20  # skipped items logged one by one per source and process; the rest counted


class BadInputLog:
  """The bad-input policy of one source and the record of what it skipped or fixed.

  Attributes:
    policy: "skip" or "error".
    skipped: one "file: problem" message per skipped item (a box or a whole image), in the
      process that met it (records that fail to decode are met in the input worker processes).
    clipped: number of boxes clipped to their image.
  """

  def __init__(self, policy: str):
    if policy not in POLICIES:
      raise ValueError(f"bad_input must be one of {POLICIES}, got {policy!r}")
    self.policy = policy
    self.skipped: list[str] = []
    self.clipped = 0
    self._once: set[str] = set()

  def skip(self, path: str | os.PathLike, problem: str, *, once: bool = False) -> None:
    """Applies the policy to a bad item: raises under "error", warns and counts under "skip".

    Args:
      path: the file named in the message.
      problem: what is wrong with it.
      once: the item is met again each time it is read (an image, every epoch): name and
        count it the first time only, so repeats never use up the warnings.

    Raises:
      ValueError: the policy is "error".
    """
    message = f"{os.fspath(path)}: {problem}"
    if self.policy == "error":
      raise ValueError(message)
    if once:
      if message in self._once:
        return
      self._once.add(message)
    if len(self.skipped) < MAX_WARNINGS:
      logging.warning("bad input, skipped: %s", message)
    elif len(self.skipped) == MAX_WARNINGS:
      logging.warning("bad input: more than %d items skipped; further ones are only counted "
                      "(see the source's bad_input_log)", MAX_WARNINGS)
    self.skipped.append(message)

  def summary(self) -> str:
    """A one-line account of what was skipped and clipped."""
    return f"{len(self.skipped)} items skipped, {self.clipped} boxes clipped to their image"

  def log_summary(self, source_name: str) -> None:
    """Logs the summary (a warning) when anything was skipped or clipped."""
    if self.skipped or self.clipped:
      logging.warning("%s: %s", source_name, self.summary())


def clean_boxes(boxes: np.ndarray, hw: tuple[int, int], path: str | os.PathLike,
                log: BadInputLog) -> tuple[np.ndarray, np.ndarray]:
  """Validates pixel boxes against their image: drops degenerate boxes, clips the rest.

  A box with x2 <= x1 or y2 <= y1 (or a non-finite coordinate) is degenerate; a box with
  nothing left after clipping to [0, W] x [0, H] lies outside the image. Both are skipped
  under the policy; boxes partly outside are clipped and counted.

  Args:
    boxes: [N, 4] xyxy boxes in pixels (docs/conventions.md).
    hw: (height, width) of the image.
    path: the annotation file named in messages.
    log: the source's bad-input log.

  Returns:
    boxes: [K, 4] float32 kept (clipped) boxes.
    keep: [K] int indices of the kept boxes in the input.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  height, width = hw
  keep = []
  out = []
  for i, box in enumerate(boxes):
    x1, y1, x2, y2 = box
    if not np.all(np.isfinite(box)) or x2 <= x1 or y2 <= y1:
      log.skip(path, f"degenerate box {i} {box.tolist()} (needs x2 > x1 and y2 > y1)")
      continue
    clipped = np.array([min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                        min(max(x2, 0.0), width), min(max(y2, 0.0), height)])
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
      log.skip(path, f"box {i} {box.tolist()} lies outside the {width}x{height} image")
      continue
    if not np.array_equal(clipped, box):
      log.clipped += 1
    keep.append(i)
    out.append(clipped)
  return np.array(out, np.float32).reshape(-1, 4), np.array(keep, np.int64)


def read_checked(read: Callable[[], np.ndarray], path: str | os.PathLike,
                 expected_hw: tuple[int, int] | None, log: BadInputLog) -> np.ndarray | None:
  """Decodes one image under the policy; None when it is bad and the policy is "skip".

  Args:
    read: returns the decoded uint8 [H, W, 3] image or raises `images.ImageDecodeError`.
    path: the image file named in messages.
    expected_hw: (height, width) the annotation declares (its boxes refer to it), or None.
    log: the source's bad-input log.

  Returns:
    image: uint8 [H, W, 3], or None for a skipped image.

  Raises:
    ValueError: the image is bad and the policy is "error".
  """
  try:
    image = read()
  except images.ImageDecodeError as e:
    if log.policy == "error":
      raise
    log.skip(path, str(e).removeprefix(f"{os.fspath(path)}: "), once=True)
    return None
  if expected_hw is not None and tuple(image.shape[:2]) != tuple(expected_hw):
    log.skip(path, f"image is {image.shape[0]}x{image.shape[1]} (HxW) but its annotation "
                   f"says {expected_hw[0]}x{expected_hw[1]}", once=True)
    return None
  return image


ANNOTATION_KEYS = ("boxes", "labels", "difficult", "name", "orig_hw")


def annotation(boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray, name: str,
               hw: tuple[int, int]) -> dict[str, Any]:
  """Assembles the annotation of one image: the Example fields other than image and image_id.

  Args:
    boxes: [N, 4] xyxy boxes in original pixels (docs/conventions.md).
    labels: [N] labels 1..C.
    difficult: [N] difficult flags.
    name: the image's name (file stem / id).
    hw: (height, width) of the original image.

  Returns:
    {"boxes" float32 [N, 4], "labels" int32 [N], "difficult" bool [N], "name" str,
     "orig_hw" int32 [2]} (fresh arrays: callers may modify them).
  """
  return {
      "boxes": np.array(boxes, np.float32).reshape(-1, 4),
      "labels": np.array(labels, np.int32).reshape(-1),
      "difficult": np.array(difficult, bool).reshape(-1),
      "name": str(name),
      "orig_hw": np.array(hw, np.int32).reshape(2),
  }


def example(image: np.ndarray, ann: dict[str, Any], image_id: int) -> dict[str, Any]:
  """Assembles the Example dict (docs/conventions.md) from an image and its `annotation` dict.

  Raises:
    ValueError: the image's size differs from the annotation's orig_hw.
  """
  if tuple(image.shape[:2]) != tuple(ann["orig_hw"]):
    raise ValueError(f"{ann['name']}: image is {image.shape[0]}x{image.shape[1]} (HxW) but its "
                     f"annotation says {ann['orig_hw'].tolist()}")
  return {"image": image, **ann, "image_id": np.int64(image_id)}


def check_index(index: int, length: int, source_name: str) -> int:
  """Returns `index` as an int.

  Raises:
    IndexError: it is outside [0, length).
  """
  if not 0 <= index < length:
    raise IndexError(f"{source_name}: index {index} out of range [0, {length})")
  return int(index)


class IndexedFileSource:
  """Read path shared by sources whose annotations are parsed and checked up front.

  Subclass constructors call `super().__init__(name, bad_input)`, then append one entry per
  usable record to `_paths` (image file), `_names`, `_hw` ((height, width) from the
  annotation), `_boxes`, `_labels` and `_difficult`. `source[i]` is then the Example of record i, or None when its
  image cannot be decoded (or its size differs from the annotation's) under "skip"; under
  "error" that raises ValueError naming the file.
  """

  def __init__(self, name: str, bad_input: str):
    self.name = name
    self.bad_input_log = BadInputLog(bad_input)
    self._paths: list[str] = []
    self._names: list[str] = []
    self._hw: list[tuple[int, int]] = []
    self._boxes: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []
    self._difficult: list[np.ndarray] = []

  def __len__(self) -> int:
    return len(self._paths)

  def annotation(self, index: int) -> dict[str, Any]:
    """The annotation fields of `self[index]` without reading the image (see `annotation`).

    Raises:
      IndexError: `index` is out of range.
    """
    index = check_index(index, len(self._paths), self.name)
    return annotation(self._boxes[index], self._labels[index], self._difficult[index],
                      self._names[index], self._hw[index])

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    ann = self.annotation(index)
    path = self._paths[index]
    image = read_checked(lambda: images.read_image(path), path, self._hw[index],
                         self.bad_input_log)
    if image is None:
      return None
    return example(image, ann, index)


def has_object(ann: dict[str, Any]) -> bool:
  """Whether an `annotation` dict holds at least one object that training uses (not difficult)."""
  return bool(np.any(~np.asarray(ann["difficult"], bool)))


class WithObjects:
  """The records of a training source that hold at least one object training uses.

  py-faster-rcnn removes difficult objects when it loads VOC (`use_diff=False`) and crowd
  regions from COCO training, then `filter_roidb` leaves out every image with no ground-truth
  box left (with end-to-end training its roidb holds only ground-truth boxes, so "at least one
  foreground or background RoI" means "at least one box"). This wrapper does the same from
  `annotation(i)` alone (no image decoding): record i is `source[records[i]]`, renumbered so
  that `self[i]["image_id"] == i` and `self.annotation(i)` is its annotation. A record whose
  annotation cannot be read (an unreadable image header in the tfds source) is kept: reading
  it applies the bad-input policy as usual.

  Attributes:
    source: the wrapped source.
    records: int64 [len] indices into `source` of the kept records, ascending.
    dropped: names of the records left out.
    classes, name, bad_input_log: those of `source`.
  """

  def __init__(self, source):
    """Scans `source.annotation(i)` for every record and logs how many are left out.

    Raises:
      ValueError: no record of `source` holds an object.
    """
    self.source = source
    self.classes = source.classes
    self.name = source.name
    self.bad_input_log = getattr(source, "bad_input_log", None)
    keep, self.dropped = [], []
    for i in range(len(source)):
      try:
        ann = source.annotation(i)
      except images.ImageDecodeError:
        keep.append(i)
        continue
      if has_object(ann):
        keep.append(i)
      else:
        self.dropped.append(ann["name"])
    self.records = np.array(keep, np.int64)
    logging.info("%s: %d of %d training images have no object left after difficult/crowd ones "
                 "are removed and are left out (data.drop_images_without_objects)%s", self.name,
                 len(self.dropped), len(source),
                 f", e.g. {self.dropped[:5]}" if self.dropped else "")
    if not len(self.records):
      raise ValueError(f"{self.name}: none of its {len(source)} images holds an object that "
                       "training uses; set data.drop_images_without_objects=false to train on "
                       "background-only images")

  def __len__(self) -> int:
    return len(self.records)

  def annotation(self, index: int) -> dict[str, Any]:
    """The annotation of record `index` (see `annotation`).

    Raises:
      IndexError: `index` is out of range.
    """
    return self.source.annotation(int(self.records[check_index(index, len(self), self.name)]))

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    example_ = self.source[int(self.records[check_index(index, len(self), self.name)])]
    if example_ is None:
      return None
    return {**example_, "image_id": np.int64(index)}

  def __repr__(self) -> str:
    return f"WithObjects({self.source!r}, {len(self)} of {len(self.source)} images)"
