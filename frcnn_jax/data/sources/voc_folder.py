"""PASCAL VOC from VOCdevkit folders (the layout of the original tars, or a custom dataset).

Layout: `<root>/VOCdevkit/VOC<year>/{Annotations/<id>.xml, JPEGImages/<id>.jpg,
ImageSets/Main/<split>.txt}` (`<root>` may also be the VOCdevkit folder itself). Several years
are concatenated in order (VOC07+12: years=("2007", "2012")). A custom dataset in VOC format is
a `VOC<name>` folder read with years=("<name>",) and its own class list.

Boxes convert on read from VOC's 1-based inclusive pixels to continuous xyxy (docs/conventions.md):
x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax. All annotations are parsed and checked
when the source is built; images are decoded when a record is read.
"""

import dataclasses
import os
import pathlib
import xml.etree.ElementTree as ET
from typing import Sequence

import numpy as np

from frcnn_jax.config.fields import setting
from frcnn_jax.data import images
from frcnn_jax.data.sources import base

SPLITS = ("train", "val", "trainval", "test")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def find_devkit(root: str | os.PathLike) -> pathlib.Path:
  """Returns the VOCdevkit folder: `root/VOCdevkit` if it exists, else `root`."""
  root = pathlib.Path(root)
  return root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root


def _float(element: ET.Element | None, tag: str) -> float:
  """The float value of a child tag; ValueError when it is missing or not a number."""
  child = None if element is None else element.find(tag)
  if child is None or child.text is None:
    raise ValueError(f"missing <{tag}>")
  return float(child.text)


def _image_hw(root: ET.Element, image_path: pathlib.Path) -> tuple[int, int]:
  """(height, width) from <size>, or from the image header where <size> is missing or 0."""
  try:
    size = root.find("size")
    hw = int(_float(size, "height")), int(_float(size, "width"))
  except ValueError:
    hw = (0, 0)
  if min(hw) > 0:
    return hw
  return images.image_size(image_path)


class VOCFolderSource(base.IndexedFileSource):
  """Random-access source over VOCdevkit folders, yielding Example dicts (docs/conventions.md).

  `source[i]` returns the Example of record i, or None when its image cannot be decoded (or
  its size differs from the annotation's) and the policy is "skip"; under "error" it raises
  ValueError (`images.ImageDecodeError`) naming the file. `annotation(i)` returns its
  annotation fields without reading the image.
  """

  def __init__(self, root: str | os.PathLike, years: Sequence[str] = ("2007",),
               split: str = "trainval", *, classes: Sequence[str] = VOC_CLASSES,
               bad_input: str = "skip"):
    """Indexes and checks every annotation of `split` in each year.

    Args:
      root: the VOCdevkit folder or its parent.
      years: year folder suffixes (`VOC<year>`), concatenated in this order.
      split: the ImageSets/Main list to read: train, val, trainval or test.
      classes: class names; label c is classes[c - 1]; objects of other classes are bad input.
      bad_input: "skip" or "error" (see frcnn_jax/data/sources/base.py).

    Raises:
      FileNotFoundError: a year folder or split list is missing (the message says what to get).
      ValueError: bad annotations under bad_input="error", or a year whose split gives no
        usable image (an empty list file, or every image skipped), naming the year.
    """
    if isinstance(years, str):
      years = (years,)
    self.classes = tuple(classes)
    super().__init__(f"voc_folder:{'+'.join(years)}/{split}", bad_input)
    self._label_of = {c: i + 1 for i, c in enumerate(self.classes)}
    if not os.fspath(root):
      raise FileNotFoundError(
          "data.voc_folder.data_dir is empty: set --config.data.voc_folder.data_dir=DIR to the folder that holds "
          "VOCdevkit/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}, e.g. after "
          "tar xf VOCtrainval_06-Nov-2007.tar -C ~/data: --config.data.voc_folder.data_dir=~/data")
    root = os.path.expanduser(os.fspath(root))
    devkit = find_devkit(root)
    for year in years:
      year_dir = devkit / f"VOC{year}"
      list_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
      if not list_file.is_file():
        raise FileNotFoundError(
            f"{list_file} not found: expected a VOCdevkit tree (VOCdevkit/VOC{year}/"
            "{Annotations,JPEGImages,ImageSets/Main}) under "
            f"{root}; extract the original VOC{year} tars there (tar xf VOC*.tar), or read "
            "VOC through tfds instead after `python scripts/prepare_voc.py --data_dir DIR`")
      ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
      if not ids:
        raise ValueError(f"{list_file} lists no images: every year of data.voc_folder.years must "
                         f"contribute images (years {tuple(years)}, split {split!r})")
      before = len(self._paths)
      for image_id in ids:
        self._index(year_dir, image_id)
      if len(self._paths) == before:
        raise ValueError(f"VOC{year} contributes no usable image to {split!r}: all "
                         f"{len(ids)} listed in {list_file} were skipped "
                         f"({self.bad_input_log.summary()})")
    if not self._paths:
      raise ValueError(f"{self.name}: no usable image under {devkit} "
                       f"({self.bad_input_log.summary()})")
    self.bad_input_log.log_summary(self.name)

  def _index(self, year_dir: pathlib.Path, image_id: str) -> None:
    """Parses and checks one annotation; appends the record unless it is skipped."""
    xml_path = year_dir / "Annotations" / f"{image_id}.xml"
    try:
      root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
      self.bad_input_log.skip(xml_path, f"unreadable annotation ({e})")
      return
    image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"
    filename = root.findtext("filename")
    if not image_path.is_file() and filename:
      image_path = year_dir / "JPEGImages" / filename.strip()
    if not image_path.is_file():
      self.bad_input_log.skip(xml_path, f"image file {image_path} not found")
      return
    try:
      hw = _image_hw(root, image_path)
    except images.ImageDecodeError as e:
      self.bad_input_log.skip(xml_path, f"no <size> and {e}")
      return
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
      name = (obj.findtext("name") or "").strip()
      if name not in self._label_of:
        self.bad_input_log.skip(xml_path, f"object {k}: class {name!r} not in the class list")
        continue
      bndbox = obj.find("bndbox")
      try:
        xmin, ymin, xmax, ymax = (_float(bndbox, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        is_difficult = obj.find("difficult") is not None and _float(obj, "difficult") == 1
      except ValueError as e:
        self.bad_input_log.skip(xml_path, f"object {k}: unreadable box ({e})")
        continue
      boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
      labels.append(self._label_of[name])
      difficult.append(is_difficult)
    kept_boxes, keep = base.clean_boxes(np.array(boxes), hw, xml_path, self.bad_input_log)
    self._paths.append(str(image_path))
    self._names.append(image_id)
    self._hw.append(hw)
    self._boxes.append(kept_boxes)
    self._labels.append(np.asarray(labels, np.int32)[keep])
    self._difficult.append(np.asarray(difficult, bool)[keep])

  def __repr__(self) -> str:
    return f"VOCFolderSource({self.name}, {len(self)} images, {len(self.classes)} classes)"


@base.SOURCES.register("voc_folder")
@dataclasses.dataclass(frozen=True)
class VOCFolder:
  """`data.voc_folder`: PASCAL VOC, or a dataset in its layout, read from VOCdevkit folders."""
  data_dir: str = setting("", "the VOCdevkit folder or its parent", role="local")
  years: tuple[str, ...] = setting(("2007",), "VOC<year> folders whose train_split is "
                                   "concatenated (07+12: ('2007', '2012'))", role="training")
  train_split: str = setting("trainval", "ImageSets/Main list trained on", role="training")
  eval_year: str = setting("2007", "VOC<year> folder evaluated on", role="test")
  eval_split: str = setting("test", "ImageSets/Main list evaluated on", role="test")
  classes: tuple[str, ...] = setting(VOC_CLASSES, "class names; label c is classes[c - 1]; "
                                     "objects of other classes are bad input")

  def make(self, split: str, *, bad_input: str, seed: int) -> VOCFolderSource:
    del seed
    years, name = ((self.years, self.train_split) if split == "train"
                   else ((self.eval_year,), self.eval_split))
    return VOCFolderSource(self.data_dir, years, name, classes=self.classes,
                           bad_input=bad_input)

  def class_names(self) -> tuple[str, ...]:
    return tuple(self.classes)
