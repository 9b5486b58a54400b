"""A shapes dataset with two aspect ratios (landscape and portrait), for canvas tests.

`python -m tests.mixed_shapes ARGS` runs `frcnn_jax.train` with this dataset registered as
`data.name=mixed_shapes` (sizes `LANDSCAPE` and `PORTRAIT`, alternating; the keys of
`data.shapes` under `data.mixed_shapes`), a dataset plug-in defined outside the package.
"""

import dataclasses

import numpy as np

from frcnn_jax.data.sources import base
from frcnn_jax.data.sources import shapes

LANDSCAPE = (48, 64)   # (height, width)
PORTRAIT = (64, 48)


class MixedShapes:
  """Record i is image i // 2 of a landscape (i even) or portrait (i odd) ShapesSource."""

  classes = shapes.CLASSES

  def __init__(self, num_images: int, split: str = "train", seed: int = 0):
    half = (num_images + 1) // 2
    self._parts = [shapes.ShapesSource(half, split=split, image_size=hw, seed=seed,
                                       noise_std=0.0) for hw in (LANDSCAPE, PORTRAIT)]
    self._n = num_images
    self.name = f"mixed_shapes_{split}"

  def __len__(self) -> int:
    return self._n

  def _record(self, index: int, example: dict) -> dict:
    example = dict(example)
    if "image_id" in example:
      example["image_id"] = np.int64(index)
    return example

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._record(index, self._parts[index % 2][index // 2])

  def annotation(self, index: int) -> dict:
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._parts[index % 2].annotation(index // 2)


@dataclasses.dataclass(frozen=True)
class MixedShapesSettings(shapes.Shapes):
  """`data.mixed_shapes`: the settings of `data.shapes`, for `MixedShapes`."""

  def make(self, split: str, *, bad_input: str, seed: int) -> MixedShapes:
    del bad_input
    return MixedShapes(self.num_train if split == "train" else self.num_test,
                       "train" if split == "train" else "test", seed=seed)


def main() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top

  from frcnn_jax import train  # pylint: disable=g-import-not-at-top
  from frcnn_jax.config import flags as config_flags  # pylint: disable=g-import-not-at-top
  base.SOURCES.register("mixed_shapes")(MixedShapesSettings)
  train.define_flags()
  app.run(train.main, flags_parser=config_flags.parse_flags)


if __name__ == "__main__":
  main()
