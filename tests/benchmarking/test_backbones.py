"""The backbone comparison's library (frcnn_jax/benchmarking/backbones.py): its entries, their
experiments and overrides. The command end to end: tests/test_bench_backbones.py."""

import pytest

from frcnn_jax.benchmarking import backbones
from frcnn_jax.models.registry import BACKBONES


def test_an_entry_names_a_backbone_its_depth_and_experiment():
  entry = backbones.parse_entry("resnet_c4:101")
  assert (entry.backbone, entry.experiment) == ("resnet_c4", "experiments/voc_r101_c4.py")
  assert entry.overrides == {"model.resnet_c4.depth": 101}
  entry = backbones.parse_entry("zf=experiments/voc_zf.py")
  assert (entry.label, entry.backbone, entry.overrides) == ("zf=experiments/voc_zf.py", "zf", {})
  for spec, message in (("alexnet", "not a registered backbone"),
                        ("resnet_c4:deep", "must be an integer")):
    with pytest.raises(ValueError, match=message):
      backbones.parse_entry(spec)


def test_the_default_entries_are_those_registered_here():
  entries, skipped = backbones.default_entries()
  names = [e.backbone for e in entries]
  assert names[:3] == ["vgg16", "zf", "resnet_c4"]
  assert entries[2].overrides == {"model.resnet_c4.depth": 50}
  if "resnet_fpn" not in BACKBONES.names():
    assert skipped == ["resnet_fpn: not a registered backbone here: skipped"]


def test_configs_take_the_entry_and_every_override():
  overrides = dict(backbones.parse_override(o) for o in (
      "model.resnet_c4.blocks=(1, 1, 1)", "model.zf.width=0.0625", "data.name=voc_folder"))
  assert overrides == {"model.resnet_c4.blocks": (1, 1, 1), "model.zf.width": 0.0625,
                       "data.name": "voc_folder"}
  config = backbones.load_config(backbones.parse_entry("resnet_c4:50"), overrides)
  assert (config.model.resnet_c4.depth, config.model.resnet_c4.blocks) == (50, (1, 1, 1))
  assert config.model.zf.width == 0.0625 and config.data.name == "voc_folder"
  assert backbones.canvas_of(config, 600, 801) == (600, 801)   # one map: the image itself
  with pytest.raises(ValueError, match="model.backbone=vgg16, not zf"):
    backbones.load_config(backbones.parse_entry("zf=experiments/voc.py"), {})
  with pytest.raises(ValueError, match="KEY=VALUE"):
    backbones.parse_override("model.zf.width")
