"""The `data` config section: which dataset, and how its images become static-shape batches.

The chosen dataset's own keys are in `data.<name>` (frcnn_jax/data/sources/).
"""

import dataclasses

from frcnn_jax.config.fields import setting
from frcnn_jax.data.sources import base

RESIZE_ON = ("auto", "host", "device")


def _dataset_name(name: str) -> str:
  names = base.SOURCES.names()
  return "" if name in names else f"must be a registered dataset source {names}"


def _canvas_list(value: tuple) -> str:
  ok = all(isinstance(c, tuple) and len(c) == 2 and all(isinstance(s, int) and s > 0 for s in c)
           for c in value)
  return "" if ok else "must be a tuple of (height, width) pairs of positive integers"


def _one_canvas(value: tuple) -> str:
  return "" if not value or _canvas_list((value,)) == "" else "must be () or (height, width)"


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """`data`: the dataset (`data.name` selects `data.<name>`) and the batching of its images."""
  name: str = setting("voc_tfds", "dataset source; its keys are data.<name>",
                      check=_dataset_name)
  min_size: int = setting(600, "shorter side after resizing", role="test", minimum=1)
  max_size: int = setting(1000, "cap on the longer side", role="test", minimum=1)
  canvases: tuple = setting((), "static canvases ((h, w), ...), multiples of the trunk's "
                            "stride; () chooses data.num_canvases from the split's resized "
                            "sizes (least padding)", role="test", check=_canvas_list)
  num_canvases: int = setting(4, "canvases chosen when data.canvases is ()", role="test",
                              minimum=1)
  canvas_multiple: int = setting(32, "sides of chosen canvases are multiples of this (a "
                                 "multiple of the trunk's stride)", role="test", minimum=1)
  pad_hw: tuple = setting((), "one fixed canvas (h, w) instead; larger images are scaled "
                          "down to fit; () = unused", role="test", check=_one_canvas)
  max_gt: int = setting(64, "ground-truth boxes per image after padding", role="training",
                        minimum=1)
  flip: bool = setting(True, "random horizontal flip in training", role="training")
  drop_images_without_objects: bool = setting(
      True, "train split: leave out images with no object left after difficult / crowd "
      "ones are removed (counted, logged), as py-faster-rcnn's filter_roidb", role="training")
  bad_input: str = setting("skip", "corrupt images and bad boxes: skip (counted warning) | "
                           "error", role="local", choices=base.POLICIES)
  proposals: str = setting("", "stored proposals of the train split (.npz from "
                           "frcnn_jax.dump_proposals) that train.loss_mode=head trains on",
                           role="training")
  num_proposals: int = setting(2000, "the best R stored proposals per image used",
                               role="training", minimum=1)
  num_workers: int | None = setting(None, "input worker processes per host (0: in the main "
                                    "process); None: from the host's cores and devices",
                                    role="local", type=int, minimum=0)
  prefetch: int = setting(2, "batches prepared ahead", role="local", minimum=1)
  resize_on: str = setting("auto", "where images are resized, flipped and padded: host | "
                           "device | auto (device on GPU/TPU, host on CPU)", role="local",
                           choices=RESIZE_ON)
