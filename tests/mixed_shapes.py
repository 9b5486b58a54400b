"""A shapes dataset with two aspect ratios (landscape and portrait), for canvas tests.

`python -m tests.mixed_shapes ARGS` runs `frcnn_jax.train` with this dataset as the train and
eval split of `data.name=shapes` (sizes `LANDSCAPE` and `PORTRAIT`, alternating).
"""

import numpy as np

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


def _mixed_source_from_config(config, split):
  d = config.data
  n = d.shapes_num_train if split == "train" else d.shapes_num_test
  return MixedShapes(n, "train" if split == "train" else "test", seed=config.seed)


def main() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top

  from frcnn_jax import train  # pylint: disable=g-import-not-at-top
  from frcnn_jax.config import build as builders  # pylint: disable=g-import-not-at-top
  from frcnn_jax.config import flags as config_flags  # pylint: disable=g-import-not-at-top
  builders.source_from_config = _mixed_source_from_config
  train.define_flags()
  app.run(train.main, flags_parser=config_flags.parse_flags)


if __name__ == "__main__":
  main()
