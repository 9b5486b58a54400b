"""A new dataset is one file: this one, through public names only, then train and evaluate."""

import dataclasses

import numpy as np
import pytest

from frcnn_jax import train
from frcnn_jax.config import flags as config_flags
from frcnn_jax.config.fields import setting
from frcnn_jax.data.sources import base
from tests.plugins import common

CLASSES = ("square", "bar")


class SquaresSource:
  """Black images with one white square (label 1) and one grey bar (label 2) each."""

  def __init__(self, num_images: int, size: int, offset: int):
    self.num_images, self.size, self.offset = num_images, size, offset
    self.classes = CLASSES
    self.name = f"squares_{offset}"
    self.bad_input_log = base.BadInputLog("error")

  def __len__(self) -> int:
    return self.num_images

  def annotation(self, index: int) -> dict:
    index = base.check_index(index, self.num_images, self.name)
    x = 4 + (index + self.offset) % 24
    boxes = [[x, x, x + 20, x + 20], [40, 4, 60, 50]]
    return base.annotation(boxes, [1, 2], [False, False], f"{index}", (self.size, self.size))

  def __getitem__(self, index: int) -> dict:
    ann = self.annotation(index)
    image = np.zeros((self.size, self.size, 3), np.uint8)
    (x1, y1, x2, y2), (bx1, by1, bx2, by2) = ann["boxes"].astype(int)
    image[y1:y2, x1:x2] = 255
    image[by1:by2, bx1:bx2] = 128
    return base.example(image, ann, index)


@dataclasses.dataclass(frozen=True)
class Squares:
  """`data.squares`: the settings of `SquaresSource`."""
  num_train: int = setting(8, "images of the train split", role="training", minimum=1)
  num_test: int = setting(4, "images of the test split", role="test", minimum=1)

  def make(self, split: str, *, bad_input: str, seed: int) -> SquaresSource:
    del bad_input, seed
    if split == "train":
      return SquaresSource(self.num_train, 64, offset=0)
    return SquaresSource(self.num_test, 64, offset=100)

  def class_names(self) -> tuple[str, ...]:
    return CLASSES


@pytest.fixture
def registered():
  base.SOURCES.register("squares")(Squares)
  yield
  base.SOURCES.unregister("squares")


@pytest.mark.slow
def test_a_registered_dataset_trains_and_evaluates(registered, tmp_path):
  del registered
  config = config_flags.load_config(common.SHAPES, {
      **common.TINY, "data.name": "squares", "data.squares.num_train": 6})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  common.check_trained(result, config)
  assert result["params"]["head"]["cls"]["kernel"].shape[1] == len(CLASSES) + 1
  assert set(result["eval"]["ap"]) == set(CLASSES)
