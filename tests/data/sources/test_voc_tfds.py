"""Tests for scripts/prepare_voc.py and frcnn_jax/data/voc_tfds.py.

The tiny VOCdevkit tree of `voc_root` is packed into tars named like the published ones,
built into tfds voc/2007 and voc/2012 (array_record) by prepare_voc.py without network, and read
back through tfds.data_source; every record must equal the folder reader's.
"""

import importlib.util
import json
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from frcnn_jax.data import images
from frcnn_jax.data.sources import voc_folder
from frcnn_jax.data.sources import voc_tfds
from tests.data import conftest as trees

REPO = pathlib.Path(__file__).resolve().parents[3]
TARS = {"VOCtrainval_06-Nov-2007.tar": "2007", "VOCtest_06-Nov-2007.tar": "2007",
        "VOCtrainval_11-May-2012.tar": "2012"}


@pytest.fixture(scope="module")
def tfds_dir(voc_root, tmp_path_factory) -> pathlib.Path:
  """Runs scripts/prepare_voc.py on tars of the tiny tree; returns its tfds data_dir."""
  if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("tensorflow (the `prepare` extra) is not installed")
  work = tmp_path_factory.mktemp("tfds_voc")
  tar_dir = work / "tars"
  tar_dir.mkdir()
  for name, year in TARS.items():
    with tarfile.open(tar_dir / name, "w") as tar:
      tar.add(voc_root / "VOCdevkit" / f"VOC{year}", arcname=f"VOCdevkit/VOC{year}")
  data_dir = work / "data"
  result = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "prepare_voc.py"), "--data_dir", str(data_dir),
       "--tar_dir", str(tar_dir), "--years", "2007", "2012"],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "voc/2007 -> " in result.stdout and "voc/2012 -> " in result.stdout
  return data_dir


def _by_name(source):
  return {ex["name"]: ex for ex in (source[i] for i in range(len(source)))}


@pytest.mark.parametrize("years,split", [(("2007",), "train"), (("2007",), "val"),
                                         (("2007",), "test"), (("2007", "2012"), "trainval")])
def test_tfds_equals_folder_reader(tfds_dir, voc_root, years, split):
  source = voc_tfds.TfdsVOCSource(tfds_dir, years, split)
  folder = _by_name(voc_folder.VOCFolderSource(voc_root, years, split))
  assert len(source) == len(folder)
  assert source.classes == voc_folder.VOC_CLASSES
  seen = set()
  for i in range(len(source)):
    ex = source[i]
    assert int(ex["image_id"]) == i
    seen.add(ex["name"])
    ref = folder[ex["name"]]
    for key in ("image", "boxes", "labels", "difficult", "orig_hw"):
      assert ex[key].dtype == ref[key].dtype, key
      np.testing.assert_array_equal(ex[key], ref[key], err_msg=f"{ex['name']} {key}")
  assert seen == set(folder)
  assert source.bad_input_log.skipped == [] and source.bad_input_log.clipped == 0


@pytest.mark.parametrize("years,split,classes", [
    (("2007",), "trainval", voc_folder.VOC_CLASSES), (("2007",), "test", voc_folder.VOC_CLASSES),
    (("2007", "2012"), "trainval", ("person", "dog"))])
def test_annotation_equals_example_fields(tfds_dir, years, split, classes):
  trees.assert_annotations_match(voc_tfds.TfdsVOCSource(tfds_dir, years, split, classes=classes))


def test_reading_needs_no_tensorflow(tfds_dir):
  code = ("import sys; from frcnn_jax.data.sources import base; "
          f"s = base.SOURCES.get('voc_tfds')(data_dir={str(tfds_dir)!r}).make("
          "'eval', bad_input='skip', seed=0); "
          "ex = s[0]; assert ex['name'] == '000005', ex['name']; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; print(len(s))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "1"


def test_pickles_without_open_sources(tfds_dir):
  source = voc_tfds.TfdsVOCSource(tfds_dir, ("2007",), "trainval")
  first = source[0]
  clone = pickle.loads(pickle.dumps(source))
  assert clone._sources is None  # pylint: disable=protected-access
  np.testing.assert_array_equal(clone[0]["image"], first["image"])
  np.testing.assert_array_equal(clone[0]["boxes"], first["boxes"])


def test_class_subset(tfds_dir):
  source = voc_tfds.TfdsVOCSource(tfds_dir, ("2007",), "train", classes=("person", "dog"))
  assert len(source.bad_input_log.skipped) == 1
  assert "not in the class list" in source.bad_input_log.skipped[0]
  got = _by_name(source)
  np.testing.assert_array_equal(got["000001"]["labels"], [2, 1])
  np.testing.assert_array_equal(got["000001"]["boxes"], [[9, 7, 40, 30], [4, 4, 20, 40]])
  assert got["000002"]["boxes"].shape == (0, 4)
  with pytest.raises(ValueError, match="not in the class list"):
    voc_tfds.TfdsVOCSource(tfds_dir, ("2007",), "train", classes=("person", "dog"),
                           bad_input="error")


class _FakeSource:
  """Stands in for an opened tfds data source, returning one record with the given bytes."""

  def __init__(self, image: bytes):
    self._image = image

  def __getitem__(self, index):
    return {"image": self._image, "image/filename": b"bad.jpg",
            "objects": {"bbox": [], "label": [], "is_difficult": []}}


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_corrupt_image_record(tfds_dir, policy):
  source = voc_tfds.TfdsVOCSource(tfds_dir, ("2007",), "test", bad_input=policy)
  source._sources = [_FakeSource(b"\xff\xd8\xff truncated")]  # pylint: disable=protected-access
  with pytest.raises(images.ImageDecodeError, match=r"test\[0\] \(bad.jpg\): cannot read image"):
    source.annotation(0)  # the size comes from the image header, which is unreadable too
  if policy == "error":
    with pytest.raises(images.ImageDecodeError, match=r"voc/2007 test\[0\] \(bad.jpg\)"):
      source[0]
  else:
    assert source[0] is None
    assert len(source.bad_input_log.skipped) == 1
    assert "bad.jpg" in source.bad_input_log.skipped[0]


def test_annotation_of_truncated_image_reads_its_header(tfds_dir):
  jpeg = trees.encode(trees.pixels("t", (30, 50)))
  source = voc_tfds.TfdsVOCSource(tfds_dir, ("2007",), "test")
  source._sources = [_FakeSource(jpeg[:-40])]  # pylint: disable=protected-access
  assert source[0] is None  # the pixels are cut short; the header is whole
  ann = source.annotation(0)
  assert ann["name"] == "bad" and ann["orig_hw"].tolist() == [30, 50]
  source._sources = [_FakeSource(jpeg)]  # pylint: disable=protected-access
  trees.assert_annotations_match(source)


def test_tfrecord_build_rejected(tfds_dir, tmp_path):
  copy = tmp_path / "data"
  shutil.copytree(tfds_dir / "voc" / "2007", copy / "voc" / "2007")
  info_path = copy / "voc" / "2007" / "5.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match="not array_record"):
    voc_tfds.TfdsVOCSource(copy, ("2007",), "test")


def test_missing_dataset_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"python scripts/prepare_voc.py --data_dir \S+ --years 2007"):
    voc_tfds.VOCTfds(data_dir=str(tmp_path)).make("train", bad_input="skip", seed=0)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="no public annotations"):
    voc_tfds.TfdsVOCSource(tmp_path, ("2012",), "test")
  with pytest.raises(ValueError, match="unknown VOC split"):
    voc_tfds.TfdsVOCSource(tmp_path, ("2007",), "testval")


def test_normalized_to_pixels_exact():
  rng = np.random.default_rng(0)
  for _ in range(200):
    height, width = (int(v) for v in rng.integers(1, 2000, 2))
    xmin, xmax = np.sort(rng.integers(1, width + 1, 2))
    ymin, ymax = np.sort(rng.integers(1, height + 1, 2))
    # tfds' voc builder: BBox(ymin / height, xmin / width, ymax / height, xmax / width) float32.
    stored = np.array([[ymin / height, xmin / width, ymax / height, xmax / width]], np.float32)
    got = voc_tfds.normalized_to_pixels(stored, (height, width))
    np.testing.assert_array_equal(got, [[xmin - 1, ymin - 1, xmax, ymax]])


def test_normalized_to_pixels_keeps_fractions():
  stored = np.array([[10.5 / 48, 20.25 / 64, 30 / 48, 40 / 64]], np.float32)
  got = voc_tfds.normalized_to_pixels(stored, (48, 64))
  np.testing.assert_allclose(got, [[19.25, 9.5, 40, 30]], atol=1e-5)
  assert voc_tfds.normalized_to_pixels(np.zeros((0, 4), np.float32), (48, 64)).shape == (0, 4)


def test_every_year_must_contribute_images(tfds_dir, tmp_path):
  copy = tmp_path / "data"
  for year in ("2007", "2012"):
    shutil.copytree(tfds_dir / "voc" / year, copy / "voc" / year)
  info_path = copy / "voc" / "2012" / "5.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  for split in info["splits"]:
    if split["name"] in ("train", "validation"):
      split["shardLengths"] = []
      split["numShards"] = "0"
  info_path.write_text(json.dumps(info))
  for policy in ("skip", "error"):
    with pytest.raises(ValueError, match=r"voc/2012 .* no images in 'trainval'"):
      voc_tfds.TfdsVOCSource(copy, ("2007", "2012"), "trainval", bad_input=policy)
  assert len(voc_tfds.TfdsVOCSource(copy, ("2007",), "trainval"))


def test_empty_data_dir_gives_commands_that_run():
  with pytest.raises(FileNotFoundError) as error:
    voc_tfds.VOCTfds(data_dir="").make("train", bad_input="skip", seed=0)
  message = str(error.value)
  assert "--config.data.voc_tfds.data_dir=~/tensorflow_datasets" in message
  command = re.search(r"python scripts/prepare_voc.py (--\S+ \S+ ?)+", message).group(0)
  assert "--data_dir ~/tensorflow_datasets --years 2007" in command
  # The command parses: prepare_voc's own parser accepts it (without running the build).
  spec = importlib.util.spec_from_file_location("prepare_voc", REPO / "scripts" / "prepare_voc.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  parsed = module.parse_args(command.split()[2:])
  assert parsed.years == ["2007"] and parsed.data_dir.endswith("tensorflow_datasets")
