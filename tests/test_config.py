"""Tests of config loading, overrides and validation (frcnn_jax/config_flags.py, experiments/)."""

import glob
import os
import sys

import pytest
from absl import flags

from frcnn_jax import config_flags
from frcnn_jax import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True))


def _parse(argv, monkeypatch):
  """Parses argv on a fresh FlagValues; returns the config or the SystemExit message."""
  flag_values = flags.FlagValues()
  holder = config_flags.define_config_flag(flag_values)
  monkeypatch.setattr(sys, "argv", ["prog", *argv])  # ml_collections reads overrides there
  try:
    config_flags.parse_flags(["prog", *argv], flag_values)
  except SystemExit as e:
    return str(e.code)
  return holder.value


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_experiment_loads_and_validates(path):
  config = config_flags.load_config(path)
  assert config.train.num_steps >= 1
  assert config.data.name in config_flags.CHOICES["data.name"]


def test_voc_is_the_paper_setting_and_scales_with_batch():
  voc = config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py"))
  assert (voc.train.batch_size, voc.train.num_steps, voc.train.lr_boundaries) == (1, 70000,
                                                                                  (50000,))
  assert (voc.train.learning_rate, voc.train.momentum, voc.train.weight_decay) == (1e-3, 0.9,
                                                                                   5e-4)
  assert (voc.train.bias_lr_mult, voc.train.bias_weight_decay, voc.data.min_size) == (2.0,
                                                                                      False, 600)
  voc8 = config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py") + ":8")
  assert (voc8.train.batch_size, voc8.train.num_steps, voc8.train.lr_boundaries) == (
      8, 8750, (6250,))
  assert voc8.train.learning_rate == pytest.approx(8e-3) and voc8.train.warmup_steps > 0
  voc0712 = config_flags.load_config(os.path.join(ROOT, "experiments", "voc0712.py"))
  assert voc0712.data.years == ("2007", "2012") and voc0712.data.eval_year == "2007"


def test_overrides_are_applied_and_type_checked():
  config = defaults.get_config()
  config_flags.apply_overrides(config, {"train.num_steps": 5, "model.anchor_sizes": [8, 16],
                                        "train.learning_rate": 1})
  assert config.train.num_steps == 5 and config.model.anchor_sizes == (8, 16)
  with pytest.raises(config_flags.ConfigError, match=r"'train.num_stepz'.*'train.num_steps'"):
    config_flags.apply_overrides(config, {"train.num_stepz": 5})
  with pytest.raises(config_flags.ConfigError, match="'train.num_steps' expects int"):
    config_flags.apply_overrides(config, {"train.num_steps": "many"})
  with pytest.raises(config_flags.ConfigError, match="'train.num_steps'"):
    config_flags.apply_overrides(config, {"train.num_steps": 1.5})
  with pytest.raises(config_flags.ConfigError, match="'data.flip' expects bool"):
    config_flags.apply_overrides(config, {"data.flip": 1})


@pytest.mark.parametrize("overrides,key", [
    ({"train.nonfinite": "ignore"}, "train.nonfinite"),
    ({"train.schedule": "step"}, "train.schedule"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.momentum": 1.0}, "train.momentum"),
    ({"train.lr_boundaries": (10, 5)}, "train.lr_boundaries"),
    ({"eval.metric": "map"}, "eval.metric"),
])
def test_bad_values_name_the_key(overrides, key):
  with pytest.raises(config_flags.ConfigError, match=key.replace(".", r"\.")):
    config_flags.load_config(os.path.join(ROOT, "experiments", "shapes.py"), overrides)


def test_command_line_overrides(monkeypatch):
  config = _parse(["--config", os.path.join(ROOT, "experiments", "shapes.py"),
                   "--config.train.num_steps=7", "--config.model.roi_op=roi_align"], monkeypatch)
  assert config.train.num_steps == 7 and config.model.roi_op == "roi_align"


@pytest.mark.parametrize("arg,expected", [
    ("--config.train.num_stepz=5", "unknown config key 'train.num_stepz'"),
    ("--config.trian.num_steps=5", "unknown config key 'trian.num_steps'"),
    ("--config.train.num_steps=abc", "--config.train.num_steps"),
    ("--config.train.nonfinite=maybe", "'train.nonfinite' must be one of"),
])
def test_command_line_errors_name_the_key(arg, expected, monkeypatch):
  message = _parse(["--config", os.path.join(ROOT, "experiments", "shapes.py"), arg],
                   monkeypatch)
  assert isinstance(message, str) and expected in message, message


def test_missing_config_file(monkeypatch):
  message = _parse(["--config", os.path.join(ROOT, "experiments", "nope.py")], monkeypatch)
  assert isinstance(message, str) and "nope.py" in message
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_flags.load_config("nope.py")
