"""PASCAL VOC from prepared tfds `voc/<year>` datasets, read with `tfds.data_source`.

The datasets are built once by `scripts/prepare_voc.py` (array_record files); reading them is
random access through `tfds.data_source` and needs no TensorFlow. Image bytes are fetched
undecoded (`tfds.decode.SkipDecoding`) and decoded by frcnn_jax.data.images, exactly as the
folder reader does.

Box conversion: tfds' voc builder stores `BBox(ymin / height, xmin / width, ymax / height,
xmax / width)` from the XML's 1-based pixels, as float32. Multiplying back by the image size
gives the XML values up to float32 rounding (< 1e-3 pixel for images under 16k pixels), so values
that close to an integer are snapped to it (VOC coordinates are integers), then the
conversion applies: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax. A box at xmin = 1 ...
width therefore comes back as exactly [0, width]; xmin = 0 (seen in some VOC-format data) gives
x1 = -1, clipped to 0 and counted.
"""

import bisect
import dataclasses
import io
import os
from typing import Any
from typing import Sequence

import numpy as np
from PIL import Image

from frcnn_jax.config.fields import setting
from frcnn_jax.data import images
from frcnn_jax.data.sources import base
from frcnn_jax.data.sources import voc_folder

# frcnn_jax split -> the tfds splits it concatenates.
SPLITS = {"train": ("train",), "val": ("validation",), "trainval": ("train", "validation"),
          "test": ("test",)}
_SNAP = 1e-3


def _prepare_command(data_dir: str, year: str) -> str:
  return (f"python scripts/prepare_voc.py --data_dir {data_dir} --years {year}"
          " (add --tar_dir DIR to build from the original VOC tars without network)")


def _header_hw(data: bytes, where: str) -> tuple[int, int]:
  """(height, width) of encoded image bytes from the header alone (no pixel decoding).

  Raises:
    images.ImageDecodeError: the header is not a readable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
  except (OSError, SyntaxError, ValueError) as e:
    raise images.ImageDecodeError(f"{where}: cannot read image header ({e})") from e
  return height, width


def normalized_to_pixels(bbox: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Inverts tfds' voc box encoding to pixel boxes (docs/conventions.md).

  Args:
    bbox: [N, 4] float32 (ymin, xmin, ymax, xmax) divided by (height, width).
    hw: (height, width) of the image.

  Returns:
    [N, 4] float64 xyxy boxes: (xmin - 1, ymin - 1, xmax, ymax) in pixels.
  """
  height, width = hw
  bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
  voc = bbox[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float64)
  nearest = np.round(voc)
  voc = np.where(np.abs(voc - nearest) < _SNAP, nearest, voc)
  return voc - np.array([1.0, 1.0, 0.0, 0.0])


class TfdsVOCSource:
  """Random-access source over prepared tfds `voc/<year>` splits (concatenated in order).

  `source[i]` returns the Example of record i, or None when its image cannot be decoded and
  the policy is "skip"; under "error" it raises `images.ImageDecodeError` (a ValueError)
  naming the record. `annotation(i)` returns its annotation fields without decoding the image
  (the size comes from the image header). The tfds data sources are opened lazily in each
  process, so the source pickles cheaply into the input worker processes.
  """

  def __init__(self, data_dir: str | os.PathLike, years: Sequence[str] = ("2007",),
               split: str = "trainval", *, classes: Sequence[str] = voc_folder.VOC_CLASSES,
               bad_input: str = "skip"):
    """Checks that every (year, split) is prepared and maps the tfds labels to `classes`.

    Args:
      data_dir: the tfds data_dir given to scripts/prepare_voc.py.
      years: "2007" and/or "2012", concatenated in this order (07+12 trainval: both).
      split: train, val, trainval or test (VOC2012 test has no public annotations).
      classes: class names; label c is classes[c - 1]. Objects of VOC classes missing from
        it are bad input: dropped (one counted warning at construction) or an error.
      bad_input: "skip" or "error" (see frcnn_jax/data/sources/base.py).

    Raises:
      FileNotFoundError: a dataset or split is not prepared (the message gives the command).
      ValueError: an unknown split, VOC2012 test, a non-array_record build, or classes
        missing from the list under bad_input="error".
    """
    if isinstance(years, str):
      years = (years,)
    if split not in SPLITS:
      raise ValueError(f"unknown VOC split {split!r}: expected one of {tuple(SPLITS)}")
    self.classes = tuple(classes)
    self.name = f"voc_tfds:{'+'.join(years)}/{split}"
    self.bad_input_log = base.BadInputLog(bad_input)
    if not os.fspath(data_dir):
      raise FileNotFoundError(
          "data.voc_tfds.data_dir is empty: set --config.data.voc_tfds.data_dir="
          "~/tensorflow_datasets (the tfds data_dir the VOC datasets were prepared in). To prepare them once (needs "
          "pip install -e \".[prepare]\"): python scripts/prepare_voc.py --data_dir "
          "~/tensorflow_datasets --years 2007 (add --tar_dir DIR to build from the original "
          "VOC tars without network)")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow: on use
    self._data_dir = os.path.expanduser(os.fspath(data_dir))
    self._parts: list[tuple[str, str]] = []
    sizes = []
    tfds_names: tuple[str, ...] = ()
    for year in years:
      if year == "2012" and split == "test":
        raise ValueError("VOC2012 test has no public annotations; evaluate on VOC2007 test")
      builder = tfds.builder(f"voc/{year}", data_dir=self._data_dir)
      if not builder.is_prepared():
        raise FileNotFoundError(f"tfds voc/{year} is not prepared in {self._data_dir!r}: run "
                                f"{_prepare_command(self._data_dir, year)}")
      if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"tfds voc/{year} in {self._data_dir!r} is stored as "
                         f"{builder.info.file_format.value}, not array_record (random access); "
                         f"rebuild it into another data_dir: {_prepare_command('DIR', year)}")
      year_sizes = []
      for tfds_split in SPLITS[split]:
        if tfds_split not in builder.info.splits:
          raise FileNotFoundError(f"tfds voc/{year} in {self._data_dir!r} has no "
                                  f"{tfds_split!r} split: rebuild it with its tars: "
                                  f"{_prepare_command(self._data_dir, year)}")
        self._parts.append((year, tfds_split))
        year_sizes.append(builder.info.splits[tfds_split].num_examples)
      if sum(year_sizes) == 0:
        raise ValueError(f"tfds voc/{year} in {self._data_dir!r} has no images in {split!r}: "
                         f"every year of data.voc_tfds.years must contribute images (years "
                         f"{tuple(years)})")
      sizes.extend(year_sizes)
      tfds_names = tuple(builder.info.features["objects"]["label"].names)
    self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    label_of = {c: i + 1 for i, c in enumerate(self.classes)}
    self._label_map = np.array([label_of.get(n, 0) for n in tfds_names], np.int32)
    dropped = [n for n in tfds_names if n not in label_of]
    if dropped:
      self.bad_input_log.skip(os.path.join(self._data_dir, "voc"),
                              f"classes {dropped} not in the class list: their objects are "
                              "dropped from every image")
    self._sources: list[Any] | None = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_sources"] = None
    return state

  def _open(self) -> list[Any]:
    if self._sources is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._sources = [
          tfds.data_source(f"voc/{year}", split=tfds_split, data_dir=self._data_dir,
                           decoders={"image": tfds.decode.SkipDecoding()})
          for year, tfds_split in self._parts]
    return self._sources

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _read(self, index: int) -> tuple[dict[str, Any], str]:
    """Fetches record `index` (image bytes undecoded) and the name used in messages."""
    index = base.check_index(index, len(self), self.name)
    part = bisect.bisect_right(self._starts, index) - 1
    local = index - int(self._starts[part])
    record = self._open()[part][local]
    year, tfds_split = self._parts[part]
    filename = record["image/filename"].decode()
    return record, f"{self._data_dir}/voc/{year} {tfds_split}[{local}] ({filename})"

  def _annotation(self, record: dict[str, Any], hw: tuple[int, int],
                  where: str) -> dict[str, Any]:
    """A record's annotation (base.annotation) for an image of size `hw`."""
    objects = record["objects"]
    labels = self._label_map[np.asarray(objects["label"], np.int64).reshape(-1)]
    known = labels > 0
    boxes = normalized_to_pixels(np.asarray(objects["bbox"], np.float32), hw)
    boxes, keep = base.clean_boxes(boxes[known], hw, where, self.bad_input_log)
    difficult = np.asarray(objects["is_difficult"], bool).reshape(-1)[known][keep]
    name = os.path.splitext(record["image/filename"].decode())[0]
    return base.annotation(boxes, labels[known][keep], difficult, name, hw)

  def annotation(self, index: int) -> dict[str, Any]:
    """The annotation fields of `self[index]`, with the image size read from its header only.

    Raises:
      IndexError: `index` is out of range.
      images.ImageDecodeError: the image header is unreadable (`self[index]` would skip the
        record, or raise under "error").
    """
    record, where = self._read(index)
    return self._annotation(record, _header_hw(record["image"], where), where)

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    record, where = self._read(index)
    image = base.read_checked(lambda: images.decode_image(record["image"], where), where,
                                 None, self.bad_input_log)
    if image is None:
      return None
    return base.example(image, self._annotation(record, image.shape[:2], where), index)

  def __repr__(self) -> str:
    return f"TfdsVOCSource({self.name}, {len(self)} images, {len(self.classes)} classes)"


@base.SOURCES.register("voc_tfds")
@dataclasses.dataclass(frozen=True)
class VOCTfds(voc_folder.VOCFolder):
  """`data.voc_tfds`: PASCAL VOC 2007 / 2012 prepared by scripts/prepare_voc.py (the keys of
  `data.voc_folder`; `data_dir` is the tfds data_dir)."""
  data_dir: str = setting("", "the tfds data_dir the VOC datasets were prepared in",
                          role="local")

  def make(self, split: str, *, bad_input: str, seed: int) -> "TfdsVOCSource":
    del seed
    years, name = ((self.years, self.train_split) if split == "train"
                   else ((self.eval_year,), self.eval_split))
    return TfdsVOCSource(self.data_dir, years, name, classes=self.classes, bad_input=bad_input)
