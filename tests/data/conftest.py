"""Fixtures writing tiny datasets to disk: a VOCdevkit tree and a COCO json folder.

`voc_root` (session scope): <root>/VOCdevkit/VOC2007 (5 images: a difficult object, a truncated
box touching the border, an image without objects) and VOC2012 (2 images), all clean; the exact
annotations are in `voc_spec`. `coco_root` (session scope): <root>/annotations/instances_train.json
and <root>/images (4 images, non-contiguous category ids, a crowd box, an image without
annotations); the json content is `coco_spec`. `write_voc` writes a custom tree (bad-input cases).
Treat the session-scoped trees as read-only. `assert_annotations_match(source)` checks a source's
`annotation(i)` against `source[i]`.
"""

import io
import json
import pathlib
from typing import Any
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from frcnn_jax.data.sources import base

WIDTH, HEIGHT = 64, 48

# name -> list of (class, xmin, ymin, xmax, ymax, difficult, truncated), VOC 1-based pixels.
VOC2007 = {
    "000001": [("dog", 10, 8, 40, 30, 0, 0), ("person", 5, 5, 20, 40, 1, 0)],
    "000002": [("car", 1, 1, 64, 48, 0, 1), ("bird", 30, 20, 31, 21, 0, 0)],
    "000003": [],
    "000004": [("cat", 2, 3, 50, 44, 0, 0), ("chair", 40, 10, 60, 45, 0, 1)],
    "000005": [("person", 12, 6, 33, 47, 0, 0)],
}
VOC2007_SPLITS = {
    "train": ["000001", "000002"],
    "val": ["000003", "000004"],
    "trainval": ["000001", "000002", "000003", "000004"],
    "test": ["000005"],
}
VOC2012 = {
    "2012_000001": [("horse", 3, 4, 60, 40, 0, 0)],
    "2012_000002": [("sofa", 20, 10, 64, 48, 1, 1), ("tvmonitor", 1, 2, 9, 12, 0, 0)],
}
VOC2012_SPLITS = {
    "train": ["2012_000001"],
    "val": ["2012_000002"],
    "trainval": ["2012_000001", "2012_000002"],
}


def assert_annotations_match(source) -> None:
  """`source.annotation(i)` equals the annotation fields of `source[i]` (values and dtypes) for
  every readable record, returns fresh arrays, and raises IndexError past the end."""
  for i in range(len(source)):
    ann, ex = source.annotation(i), source[i]
    if ex is None:  # an unreadable image, skipped by the pipeline and so never evaluated
      continue
    assert sorted(ann) == sorted(base.ANNOTATION_KEYS), sorted(ann)
    assert ann["name"] == ex["name"] and isinstance(ann["name"], str)
    for key in ("boxes", "labels", "difficult", "orig_hw"):
      assert ann[key].dtype == ex[key].dtype, (i, key)
      np.testing.assert_array_equal(ann[key], ex[key], err_msg=f"record {i} {key}")
    ann["boxes"] += 1.0
    np.testing.assert_array_equal(source.annotation(i)["boxes"], ex["boxes"])
  with pytest.raises(IndexError):
    source.annotation(len(source))


def pixels(name: str, hw: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
  """Deterministic smooth RGB test pixels (uint8 [H, W, 3]) seeded by the name."""
  seed = sum(ord(c) * (i + 1) for i, c in enumerate(name))
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
  base = rng.uniform(0, 255, 3)
  grad = rng.uniform(-2, 2, (2, 3))
  image = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
  return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG") -> bytes:
  """Encodes an array or Pillow image (any mode the format takes) to bytes."""
  image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def voc_xml(name: str, objects: list[tuple], width: int = WIDTH, height: int = HEIGHT,
            filename: str | None = None) -> str:
  """A VOC annotation with every tag tfds' voc builder reads (pose, truncated, difficult)."""
  parts = [f"<annotation><folder>VOC</folder><filename>{filename or name + '.jpg'}</filename>",
           f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
  for cls, xmin, ymin, xmax, ymax, difficult, truncated in objects:
    parts.append(
        f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>{truncated}</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
  parts.append("</annotation>")
  return "".join(parts)


def write_voc_year(devkit: pathlib.Path, year: str, records: dict[str, Any],
                   splits: dict[str, list[str]]) -> None:
  """Writes VOC<year>/{Annotations, JPEGImages, ImageSets/Main} under `devkit`.

  Args:
    devkit: the VOCdevkit folder.
    year: folder suffix.
    records: name -> list of objects (clean JPEG and XML written), or name -> dict with any of
      "objects", "xml" (raw annotation text), "image" (raw image bytes; None: no image file),
      "image_file" (file name in JPEGImages), "size" ((width, height) in the XML).
    splits: split name -> image names.
  """
  year_dir = devkit / f"VOC{year}"
  for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
    (year_dir / sub).mkdir(parents=True, exist_ok=True)
  for name, record in records.items():
    record = {"objects": record} if isinstance(record, list) else record
    image_file = record.get("image_file", f"{name}.jpg")
    width, height = record.get("size", (WIDTH, HEIGHT))
    xml = record.get("xml") or voc_xml(name, record.get("objects", []), width, height,
                                       image_file)
    (year_dir / "Annotations" / f"{name}.xml").write_text(xml)
    image = record.get("image", encode(pixels(name)))
    if image is not None:
      (year_dir / "JPEGImages" / image_file).write_bytes(image)
  for split, names in splits.items():
    (year_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(n + "\n" for n in names))


@pytest.fixture(scope="session")
def voc_spec() -> dict[str, Any]:
  """The annotations written by `voc_root`: {year: (records, splits)}."""
  return {"2007": (VOC2007, VOC2007_SPLITS), "2012": (VOC2012, VOC2012_SPLITS)}


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory, voc_spec) -> pathlib.Path:
  """A clean tiny VOCdevkit tree; returns its parent folder (the tree is <root>/VOCdevkit)."""
  root = tmp_path_factory.mktemp("voc")
  for year, (records, splits) in voc_spec.items():
    write_voc_year(root / "VOCdevkit", year, records, splits)
  return root


@pytest.fixture
def write_voc(tmp_path) -> Callable[..., pathlib.Path]:
  """Factory: write_voc(records, year="2007") writes a one-year tree whose trainval split lists
  every record; returns the root (parent of VOCdevkit)."""
  def write(records: dict[str, Any], year: str = "2007") -> pathlib.Path:
    root = tmp_path / f"voc_{len(list(tmp_path.iterdir()))}"
    write_voc_year(root / "VOCdevkit", year, records, {"trainval": list(records)})
    return root
  return write


COCO = {
    "images": [
        {"id": 42, "file_name": "a.jpg", "width": WIDTH, "height": HEIGHT},
        {"id": 7, "file_name": "b.jpg", "width": WIDTH, "height": HEIGHT},
        {"id": 9, "file_name": "empty.jpg", "width": WIDTH, "height": HEIGHT},
        {"id": 100, "file_name": "sub/c.jpg", "width": WIDTH, "height": HEIGHT},
    ],
    "categories": [
        {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ],
    "annotations": [
        {"id": 1, "image_id": 42, "category_id": 18, "bbox": [10.5, 8.0, 20.0, 15.25],
         "area": 305.0, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0.0, 0.0, 64.0, 48.0],
         "area": 3072.0, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [30.0, 20.0, 10.0, 5.0],
         "area": 50.0, "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0],
         "area": 12.0, "iscrowd": 0},
        {"id": 5, "image_id": 100, "category_id": 18, "bbox": [40.0, 30.0, 24.0, 18.0],
         "area": 432.0, "iscrowd": 0},
    ],
}


@pytest.fixture(scope="session")
def coco_spec() -> dict[str, Any]:
  """The json written by `coco_root` (annotations/instances_train.json)."""
  return COCO


def write_coco(root: pathlib.Path, spec: dict[str, Any],
               images: dict[str, bytes | None] | None = None) -> pathlib.Path:
  """Writes <root>/annotations/instances_train.json and <root>/images/<file_name>.

  Args:
    root: destination folder.
    spec: the json content.
    images: file_name -> raw bytes overriding the clean JPEG (None: no file).

  Returns:
    root.
  """
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  (root / "annotations" / "instances_train.json").write_text(json.dumps(spec))
  images = images or {}
  for info in spec["images"]:
    path = root / "images" / info["file_name"]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = images.get(info["file_name"], encode(pixels(info["file_name"],
                                                       (info["height"], info["width"]))))
    if data is not None:
      path.write_bytes(data)
  return root


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory, coco_spec) -> pathlib.Path:
  """A clean tiny COCO folder: annotations/instances_train.json + images/."""
  return write_coco(tmp_path_factory.mktemp("coco"), coco_spec)
