"""Tests for frcnn_jax/data/voc_folder.py (VOCdevkit folders) and the bad-input policy."""

import io
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from frcnn_jax.data import images
from frcnn_jax.data.sources import base
from frcnn_jax.data.sources import voc_folder
from tests.data import conftest as trees


def _expected(objects, classes=voc_folder.VOC_CLASSES):
  """Plain-loop reference of the VOC -> DESIGN conversion."""
  boxes, labels, difficult = [], [], []
  for cls, xmin, ymin, xmax, ymax, diff, _ in objects:
    boxes.append([xmin - 1, ymin - 1, xmax, ymax])
    labels.append(classes.index(cls) + 1)
    difficult.append(bool(diff))
  return np.array(boxes, np.float32).reshape(-1, 4), np.array(labels), np.array(difficult)


def _check_example(ex, name, objects, image_bytes_path, index):
  boxes, labels, difficult = _expected(objects)
  assert ex["name"] == name and ex["image_id"] == index
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (trees.HEIGHT, trees.WIDTH, 3)
  np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(image_bytes_path)))
  assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (len(objects), 4)
  np.testing.assert_array_equal(ex["boxes"], boxes)
  assert ex["labels"].dtype == np.int32
  np.testing.assert_array_equal(ex["labels"], labels)
  assert ex["difficult"].dtype == bool
  np.testing.assert_array_equal(ex["difficult"], difficult)
  assert ex["image_id"].dtype == np.int64
  assert ex["orig_hw"].dtype == np.int32
  np.testing.assert_array_equal(ex["orig_hw"], [trees.HEIGHT, trees.WIDTH])


@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_voc2007_splits_exact(voc_root, voc_spec, split):
  records, splits = voc_spec["2007"]
  source = voc_folder.VOCFolderSource(voc_root, ("2007",), split)
  assert len(source) == len(splits[split])
  assert source.classes == voc_folder.VOC_CLASSES
  assert source.name == f"voc_folder:2007/{split}"
  for i, name in enumerate(splits[split]):
    path = voc_root / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{name}.jpg"
    _check_example(source[i], name, records[name], path, i)
  assert source.bad_input_log.skipped == [] and source.bad_input_log.clipped == 0


def test_difficult_truncated_and_empty(voc_root):
  source = voc_folder.VOCFolderSource(voc_root / "VOCdevkit", "2007", "trainval")
  by_name = {source[i]["name"]: source[i] for i in range(len(source))}
  np.testing.assert_array_equal(by_name["000001"]["difficult"], [False, True])
  np.testing.assert_array_equal(by_name["000002"]["boxes"][0], [0, 0, trees.WIDTH, trees.HEIGHT])
  np.testing.assert_array_equal(by_name["000002"]["boxes"][1], [29, 19, 31, 21])
  assert by_name["000003"]["boxes"].shape == (0, 4)
  assert by_name["000003"]["labels"].shape == (0,)
  assert by_name["000003"]["difficult"].shape == (0,)


def test_years_concatenated(voc_root, voc_spec):
  source = voc_folder.VOCFolderSource(voc_root, ("2007", "2012"), "trainval")
  names = voc_spec["2007"][1]["trainval"] + voc_spec["2012"][1]["trainval"]
  assert len(source) == len(names)
  assert [source[i]["name"] for i in range(len(source))] == names
  assert [int(source[i]["image_id"]) for i in range(len(source))] == list(range(len(names)))
  records = voc_spec["2012"][0]
  path = voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2012_000002.jpg"
  _check_example(source[5], "2012_000002", records["2012_000002"], path, 5)
  with pytest.raises(IndexError):
    source[len(names)]


@pytest.mark.parametrize("years,split", [(("2007",), "test"), (("2007", "2012"), "trainval")])
def test_annotation_equals_example_fields(voc_root, years, split):
  trees.assert_annotations_match(voc_folder.VOCFolderSource(voc_root, years, split))


def test_annotation_shares_the_cleaning_and_reads_no_pixels(write_voc):
  xml = trees.voc_xml("nosize", [GOOD]).replace("<width>64</width>", "<width>0</width>")
  root = write_voc({
      "clipped": [("cat", 50, 40, 80, 60, 0, 0), ("dog", 0, 0, 5, 5, 1, 0)],
      "cleaned": [GOOD, ("cat", 20, 10, 19, 30, 0, 0), ("unicorn", 2, 2, 9, 9, 0, 0)],
      "nosize": {"xml": xml},
      "corrupt": {"objects": [GOOD], "image": _jpeg("corrupt")[:300]},
  })
  source = voc_folder.VOCFolderSource(root, ("2007",), "trainval")
  trees.assert_annotations_match(source)
  np.testing.assert_array_equal(source.annotation(0)["boxes"], [[49, 39, 64, 48], [0, 0, 5, 5]])
  np.testing.assert_array_equal(source.annotation(1)["labels"], [12])
  np.testing.assert_array_equal(source.annotation(2)["orig_hw"], [48, 64])
  # The corrupt image is skipped when read, but its annotation needs no pixels.
  ann = source.annotation(3)
  assert ann["name"] == "corrupt" and source[3] is None
  np.testing.assert_array_equal(ann["boxes"], [[9, 7, 40, 30]])


def test_pickle_roundtrip(voc_root):
  source = voc_folder.VOCFolderSource(voc_root, ("2007",), "trainval")
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == len(source) and clone.classes == source.classes
  for key in ("image", "boxes", "labels", "difficult", "orig_hw"):
    np.testing.assert_array_equal(clone[1][key], source[1][key])


def test_missing_tree_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare_voc.py"):
    voc_folder.VOCFolderSource(tmp_path / "nowhere", ("2007",), "trainval")


def test_bad_policy_name_rejected(voc_root):
  with pytest.raises(ValueError, match="bad_input must be one of"):
    voc_folder.VOCFolderSource(voc_root, ("2007",), "trainval", bad_input="ignore")


def test_class_subset(voc_root):
  source = voc_folder.VOCFolderSource(voc_root, ("2007",), "train", classes=("person", "dog"))
  np.testing.assert_array_equal(source[0]["labels"], [2, 1])
  assert source[1]["boxes"].shape == (0, 4)
  assert len(source.bad_input_log.skipped) == 2
  assert all("000002.xml" in m and "not in the class list" in m
             for m in source.bad_input_log.skipped)
  with pytest.raises(ValueError, match="000002.xml: object 0: class 'car' not in the class list"):
    voc_folder.VOCFolderSource(voc_root, ("2007",), "train", classes=("person", "dog"),
                        bad_input="error")


def test_the_registry_makes_the_source(voc_root):
  settings = base.SOURCES.get("voc_folder")(data_dir=str(voc_root))
  source = settings.make("eval", bad_input="skip", seed=0)
  assert isinstance(source, voc_folder.VOCFolderSource) and len(source) == 1
  assert settings.class_names() == voc_folder.VOC_CLASSES
  with pytest.raises(ValueError, match="data.name='imagenet' is not registered"):
    base.SOURCES.get("imagenet")


GOOD = ("dog", 10, 8, 40, 30, 0, 0)


def _pil_bytes(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def _jpeg(name):
  return trees.encode(trees.pixels(name))


# Annotation problems: case -> (record, message fragment, (boxes, labels) kept under "skip").
ANNOTATION_CASES = {
    "unreadable_xml": ({"xml": "<annotation><size><width>64"}, "unreadable annotation", None),
    "missing_image": ({"objects": [GOOD], "image": None}, "not found", None),
    "degenerate_box": (
        {"objects": [GOOD, ("cat", 20, 10, 19, 30, 0, 0)]}, "degenerate box 1",
        ([[9, 7, 40, 30]], [12])),
    "zero_height_box": (
        {"objects": [("cat", 20, 10, 30, 9, 0, 0), GOOD]}, "degenerate box 0",
        ([[9, 7, 40, 30]], [12])),
    "box_outside": (
        {"objects": [("cat", 70, 50, 90, 60, 0, 0), GOOD]}, "lies outside the 64x48 image",
        ([[9, 7, 40, 30]], [12])),
    "unknown_class": (
        {"objects": [("unicorn", 2, 2, 9, 9, 0, 0), GOOD]}, "class 'unicorn' not in the class list",
        ([[9, 7, 40, 30]], [12])),
    "unreadable_bndbox": (
        {"xml": trees.voc_xml("bad", [GOOD]).replace("<xmin>10</xmin>", "<xmin>ten</xmin>")},
        "unreadable box", ([], [])),
}


@pytest.mark.parametrize("case", list(ANNOTATION_CASES))
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_annotation_bad_input(write_voc, case, policy):
  record, message, kept = ANNOTATION_CASES[case]
  root = write_voc({"good": [GOOD], "bad": record})
  if policy == "error":
    with pytest.raises(ValueError, match=message) as info:
      voc_folder.VOCFolderSource(root, ("2007",), "trainval", bad_input="error")
    assert "bad.xml" in str(info.value)
    return
  source = voc_folder.VOCFolderSource(root, ("2007",), "trainval", bad_input="skip")
  log = source.bad_input_log
  assert len(log.skipped) == 1 and "bad.xml" in log.skipped[0] and message in log.skipped[0]
  if kept is None:
    assert len(source) == 1 and source[0]["name"] == "good"
  else:
    assert len(source) == 2
    ex = source[1]
    assert ex["name"] == "bad"
    np.testing.assert_array_equal(ex["boxes"], np.array(kept[0], np.float32).reshape(-1, 4))
    np.testing.assert_array_equal(ex["labels"], kept[1])


def test_all_records_bad_is_an_error(write_voc):
  root = write_voc({"bad": {"xml": "garbage"}})
  with pytest.raises(ValueError, match="no usable image"):
    voc_folder.VOCFolderSource(root, ("2007",), "trainval")


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_box_partly_outside_clipped(write_voc, policy):
  root = write_voc({"img": [("cat", 50, 40, 80, 60, 0, 0), ("dog", 0, 0, 5, 5, 0, 0)]})
  source = voc_folder.VOCFolderSource(root, ("2007",), "trainval", bad_input=policy)
  np.testing.assert_array_equal(source[0]["boxes"], [[49, 39, 64, 48], [0, 0, 5, 5]])
  assert source.bad_input_log.clipped == 2 and source.bad_input_log.skipped == []


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_size_missing_from_xml_uses_header(write_voc, policy):
  xml = trees.voc_xml("img", [GOOD]).replace("<width>64</width>", "<width>0</width>")
  source = voc_folder.VOCFolderSource(write_voc({"img": {"xml": xml}}), ("2007",), "trainval",
                               bad_input=policy)
  np.testing.assert_array_equal(source[0]["orig_hw"], [48, 64])
  np.testing.assert_array_equal(source[0]["boxes"], [[9, 7, 40, 30]])


# Image problems, met when a record is read: case -> (record, message fragment).
IMAGE_CASES = {
    "truncated_jpeg": ({"objects": [GOOD], "image": _jpeg("bad")[:300]}, "cannot decode"),
    "garbage_bytes": ({"objects": [GOOD], "image": b"\x00garbage" * 20}, "cannot decode"),
    "size_mismatch": ({"objects": [GOOD], "image": trees.encode(trees.pixels("x", (32, 32)))},
                      "image is 32x32 (HxW) but its annotation says 48x64"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_image_bad_input(write_voc, case, policy):
  record, message = IMAGE_CASES[case]
  source = voc_folder.VOCFolderSource(write_voc({"good": [GOOD], "bad": record}), ("2007",),
                               "trainval", bad_input=policy)
  assert len(source) == 2 and source[0]["name"] == "good"
  if policy == "error":
    with pytest.raises(ValueError, match=re.escape(message)) as info:
      source[1]
    assert "bad.jpg" in str(info.value)
    return
  assert source[1] is None
  skipped = source.bad_input_log.skipped
  assert len(skipped) == 1 and "bad.jpg" in skipped[0] and message in skipped[0]
  assert source[0]["name"] == "good"


def _gray_jpeg():
  return _pil_bytes(Image.fromarray(trees.pixels("g")[..., 0], "L"), "JPEG")


def _rgba_png():
  rgba = np.concatenate([trees.pixels("r"), np.full((48, 64, 1), 9, np.uint8)], axis=2)
  return _pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")


def _cmyk_jpeg():
  return _pil_bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")


# Convertible images: case -> (record, reference RGB from the written bytes).
CONVERT_CASES = {
    "grayscale_jpeg": ({"objects": [GOOD], "image": _gray_jpeg()},
                       lambda: np.asarray(Image.open(io.BytesIO(_gray_jpeg())).convert("RGB"))),
    "grayscale_png": ({"objects": [GOOD], "image_file": "img.png",
                       "image": _pil_bytes(Image.fromarray(trees.pixels("p")[..., 1]), "PNG")},
                      lambda: np.repeat(trees.pixels("p")[..., 1:2], 3, axis=2)),
    "rgba_png": ({"objects": [GOOD], "image": _rgba_png()}, lambda: trees.pixels("r")),
    "cmyk_jpeg": ({"objects": [GOOD], "image": _cmyk_jpeg()}, None),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_image_modes_converted(write_voc, case, policy):
  record, reference = CONVERT_CASES[case]
  source = voc_folder.VOCFolderSource(write_voc({"img": record}), ("2007",), "trainval",
                               bad_input=policy)
  ex = source[0]
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (48, 64, 3)
  if reference is None:
    np.testing.assert_allclose(ex["image"].reshape(-1, 3).mean(0), [255, 0, 0], atol=3)
  else:
    np.testing.assert_array_equal(ex["image"], reference())
  np.testing.assert_array_equal(ex["boxes"], [[9, 7, 40, 30]])
  assert source.bad_input_log.skipped == []


def test_an_image_read_again_is_named_once(caplog):
  log = base.BadInputLog("skip")

  def read():
    raise images.ImageDecodeError("broken.jpg: truncated JPEG")
  with caplog.at_level("WARNING"):
    for _ in range(3):   # three epochs
      assert base.read_checked(read, "broken.jpg", None, log) is None
  assert log.skipped == ["broken.jpg: truncated JPEG"]
  assert [r.getMessage() for r in caplog.records] == [
      "bad input, skipped: broken.jpg: truncated JPEG"]


def test_decode_error_is_value_error():
  assert issubclass(images.ImageDecodeError, ValueError)


def test_warnings_name_the_file_and_are_capped(write_voc, caplog):
  objects = [GOOD] + [("unicorn", 2, 2, 9, 9, 0, 0)] * (base.MAX_WARNINGS + 5)
  with caplog.at_level("WARNING"):
    source = voc_folder.VOCFolderSource(write_voc({"many": objects}), ("2007",), "trainval")
  assert len(source.bad_input_log.skipped) == base.MAX_WARNINGS + 5
  messages = [r.getMessage() for r in caplog.records]
  per_item = [m for m in messages if m.startswith("bad input, skipped:")]
  assert len(per_item) == base.MAX_WARNINGS
  assert all("many.xml" in m and "unicorn" in m for m in per_item)
  assert any("further ones are only counted" in m for m in messages)
  assert messages[-1] == (f"voc_folder:2007/trainval: {base.MAX_WARNINGS + 5} items skipped, "
                          "0 boxes clipped to their image")
  np.testing.assert_array_equal(source[0]["labels"], [12])


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_every_year_must_contribute_images(tmp_path, policy):
  devkit = tmp_path / "VOCdevkit"
  trees.write_voc_year(devkit, "2007", {"a": [("dog", 5, 5, 20, 20, 0, 0)]},
                       {"trainval": ["a"]})
  trees.write_voc_year(devkit, "mine", {}, {"trainval": []})        # an empty split file
  with pytest.raises(ValueError, match=r"VOCmine.*lists no images"):
    voc_folder.VOCFolderSource(tmp_path, ("2007", "mine"), "trainval", bad_input=policy)
  with pytest.raises(ValueError, match=r"VOCmine.*lists no images"):
    voc_folder.VOCFolderSource(tmp_path, ("mine", "2007"), "trainval", bad_input=policy)
  assert len(voc_folder.VOCFolderSource(tmp_path, ("2007",), "trainval", bad_input=policy)) == 1


def test_a_year_whose_images_are_all_skipped_is_named(tmp_path):
  devkit = tmp_path / "VOCdevkit"
  trees.write_voc_year(devkit, "2007", {"a": [("dog", 5, 5, 20, 20, 0, 0)]},
                       {"trainval": ["a"]})
  trees.write_voc_year(devkit, "bad", {"x": {"xml": "garbage"}}, {"trainval": ["x"]})
  with pytest.raises(ValueError, match=r"VOCbad contributes no usable image"):
    voc_folder.VOCFolderSource(tmp_path, ("2007", "bad"), "trainval", bad_input="skip")


def test_empty_data_dir_says_which_key_to_set():
  with pytest.raises(FileNotFoundError, match=r"--config\.data\.voc_folder\.data_dir=DIR"):
    voc_folder.VOCFolderSource("", ("2007",), "trainval")
