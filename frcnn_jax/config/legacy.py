"""Run folders written before the backbones, heads and datasets became plug-ins.

Their `config.json` holds keys that have moved (`model.width` is now `model.vgg16.width`,
`data.years` is `data.<dataset>.years` ...). Read-only commands read such a folder with the
keys renamed in memory; training stops and names `python -m frcnn_jax.config --upgrade
WORKDIR`, which writes the renamed `config.json` after keeping the original as
`config.legacy.json`. The parameters need no change: the network's layer names are the same.
"""

import copy
from collections.abc import Mapping
from typing import Any

RENAMED = {
    "model.width": "model.vgg16.width",
    "model.convs_per_block": "model.vgg16.convs_per_block",
    "model.frozen_blocks": "model.vgg16.frozen_blocks",
    "model.pool_ceil_mode": "model.vgg16.pool_ceil_mode",
    "model.anchor_stride": "model.vgg16.stride",
    "model.anchor_sizes": "anchors.sizes",
    "model.anchor_ratios": "anchors.ratios",
    "model.anchor_style": "anchors.style",
    "model.fc_dim": "model.fc.dim",
    "model.dropout": "model.fc.dropout",
    "rpn.box_loss_weight": "loss.rpn_box",
    "roi.box_loss_weight": "loss.det_box",
    "data.shapes_num_train": "data.shapes.num_train",
    "data.shapes_num_test": "data.shapes.num_test",
    "data.shapes_image_size": "data.shapes.image_size",
    "data.shapes_cache_mb": "data.shapes.cache_mb",
    "data.coco_train_json": "data.coco_json.train_json",
    "data.coco_train_images": "data.coco_json.train_images",
    "data.coco_eval_json": "data.coco_json.eval_json",
    "data.coco_eval_images": "data.coco_json.eval_images",
}
# Keys that moved into the section of the run's dataset (`data.name`), where it has them.
_PER_DATASET = {
    "voc_tfds": ("data_dir", "years", "train_split", "eval_year", "eval_split", "classes"),
    "voc_folder": ("data_dir", "years", "train_split", "eval_year", "eval_split", "classes"),
    "coco_json": ("data_dir",),
}
_MOVED_DATA_KEYS = ("data_dir", "years", "train_split", "eval_year", "eval_split", "classes")


def _pop(tree: dict, key: str) -> tuple[bool, Any]:
  *parents, leaf = key.split(".")
  for part in parents:
    tree = tree.get(part)
    if not isinstance(tree, dict):
      return False, None
  if leaf not in tree:
    return False, None
  return True, tree.pop(leaf)


def _put(tree: dict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def upgrade(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
  """A run's config.json record with its moved keys under their new names.

  Returns:
    (the new record, {old key: new key, or "" for a key the run's dataset has no use for});
    the second is empty when the record needs no change.
  """
  new = copy.deepcopy(dict(record))
  renamed: dict[str, str] = {}
  for old, target in RENAMED.items():
    found, value = _pop(new, old)
    if found:
      _put(new, target, value)
      renamed[old] = target
  dataset = str(new.get("data", {}).get("name", ""))
  for key in _MOVED_DATA_KEYS:
    found, value = _pop(new, f"data.{key}")
    if not found:
      continue
    if key in _PER_DATASET.get(dataset, ()):
      _put(new, f"data.{dataset}.{key}", value)
      renamed[f"data.{key}"] = f"data.{dataset}.{key}"
    else:
      renamed[f"data.{key}"] = ""
  return new, renamed


def describe(renamed: Mapping[str, str]) -> str:
  """"model.width -> model.vgg16.width, data.years (unused by this dataset), ..."."""
  return ", ".join(f"{old} -> {new}" if new else f"{old} (unused by the run's dataset)"
                   for old, new in renamed.items())
