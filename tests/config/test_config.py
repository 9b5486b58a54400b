"""Tests of config loading, overrides and validation (frcnn_jax/config/flags.py, experiments/)."""

import glob
import json
import os
import sys

import jax
import numpy as np
import pytest
from absl import flags

from frcnn_jax.config import build as builders
from frcnn_jax.config import defaults
from frcnn_jax.config import flags as config_flags
from frcnn_jax.data.sources import base
from frcnn_jax.ops import anchors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  assert config.data.name in base.SOURCES.names()


def test_voc_is_the_paper_setting():
  voc = config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py"))
  # py-faster-rcnn end2end: IMS_PER_BATCH 1 x iter_size 2, 70k updates, drop at 50k, lr 1e-3.
  assert (voc.train.batch_size, voc.train.grad_accum_steps) == (2, 1)
  assert (voc.train.num_steps, voc.train.lr_boundaries, voc.train.warmup_steps) == (
      70000, (50000,), 0)
  assert (voc.train.learning_rate, voc.train.momentum, voc.train.weight_decay) == (1e-3, 0.9,
                                                                                   5e-4)
  # Biases: lr_mult 2 and Caffe's default decay_mult 1 (decayed).
  assert (voc.train.bias_lr_mult, voc.train.bias_weight_decay) == (2.0, True)
  assert (voc.data.min_size, voc.data.max_size, voc.model.vgg16.frozen_blocks) == (600, 1000, 2)
  assert voc.data.drop_images_without_objects
  # Caffe geometry (README "Deviations from py-faster-rcnn").
  assert (voc.anchors.style, voc.model.vgg16.pool_ceil_mode, voc.model.roi_pool_coordinates,
          voc.model.legacy_plus_one) == ("py-faster-rcnn", True, "caffe", True)
  voc0712 = config_flags.load_config(os.path.join(ROOT, "experiments", "voc0712.py"))
  assert voc0712.data.voc_tfds.years == ("2007", "2012") and voc0712.data.voc_tfds.eval_year == "2007"
  assert (voc0712.train.batch_size, voc0712.train.num_steps, voc0712.train.lr_boundaries) == (
      2, 110000, (80000,))


def test_coco_is_the_paper_setting():
  coco = config_flags.load_config(os.path.join(ROOT, "experiments", "coco.py"))
  assert (coco.train.batch_size, coco.train.num_steps, coco.train.lr_boundaries) == (
      8, 320000, (240000,))
  assert (coco.train.learning_rate, coco.train.warmup_steps) == (0.003, 0)
  assert coco.anchors.sizes == (64, 128, 256, 512) and len(coco.anchors.ratios) == 3
  assert (coco.data.name, coco.eval.metric, coco.roi.bg_iou_lo) == ("coco_json", "coco", 0.0)
  assert coco.data.drop_images_without_objects and coco.train.bias_weight_decay
  assert coco.model.fc.dropout == 0.0      # py-faster-rcnn's coco prototxts have no drop6 / drop7


def _generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(8, 16, 32)):
  """py-faster-rcnn's lib/rpn/generate_anchors.py, line by line (inclusive pixel boxes)."""
  def whctrs(anchor):
    w, h = anchor[2] - anchor[0] + 1, anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)

  def mkanchors(ws, hs, x_ctr, y_ctr):
    ws, hs = np.asarray(ws)[:, None], np.asarray(hs)[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                      x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))

  def ratio_enum(anchor):
    w, h, x_ctr, y_ctr = whctrs(anchor)
    size_ratios = w * h / np.asarray(ratios, np.float64)
    ws = np.round(np.sqrt(size_ratios))
    return mkanchors(ws, np.round(ws * np.asarray(ratios)), x_ctr, y_ctr)

  def scale_enum(anchor):
    w, h, x_ctr, y_ctr = whctrs(anchor)
    return mkanchors(w * np.asarray(scales), h * np.asarray(scales), x_ctr, y_ctr)

  ratio_anchors = ratio_enum(np.array([1, 1, base_size, base_size]) - 1)
  return np.vstack([scale_enum(ratio_anchors[i]) for i in range(ratio_anchors.shape[0])])


@pytest.mark.parametrize("name,scales", [("voc.py", (8, 16, 32)), ("coco.py", (4, 8, 16, 32))])
def test_paper_config_anchors_are_py_faster_rcnn_anchors(name, scales):
  """The configs' anchors, as the detector builds them, are py-faster-rcnn's (its coco models
  pass scales 4, 8, 16, 32), inclusive boxes centred at 7.5 = continuous boxes centred at 8."""
  config = config_flags.load_config(os.path.join(ROOT, "experiments", name))
  settings = builders.detector_settings_from_config(config)
  ours = anchors.anchor_grid(1, 1, settings.strides[0], settings.anchors.sizes,
                             settings.anchors.ratios, settings.anchors.style)
  reference = _generate_anchors(scales=scales) + np.array([0.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(ours, reference, atol=1e-4)


def _reference_lr_per_image(images_seen, updates, drop_at, lr=1e-3, per_update=2):
  """py-faster-rcnn's Caffe "step" policy at the update that starts after `images_seen` images,
  per image of that update (Caffe averages the iter_size passes)."""
  update = images_seen // per_update
  return lr * (0.1 if update >= drop_at else 1.0) / per_update if update < updates else None


# (file, reference updates, drop at update, lr, images per update, warmup from N images):
# py-faster-rcnn's VOC solver, our 07+12 choice, the paper's COCO schedule.
RECIPES = [("voc.py", 70000, 50000, 1e-3, 2, 8), ("voc0712.py", 110000, 80000, 1e-3, 2, 8),
           ("coco.py", 320000, 240000, 3e-3, 8, 16)]


@pytest.mark.parametrize("name,updates,drop_at,lr,per_update,warmup_from", RECIPES)
@pytest.mark.parametrize("arg", ["", "2", "1x2", "1", "4", "2x4", "8", "16", "4x4"])
def test_scaling_rule_keeps_lr_per_image_and_images(name, updates, drop_at, lr, per_update,
                                                    warmup_from, arg):
  """Any images-per-update N (= batch x accumulation) sees the reference's images with the
  reference's learning rate per image, the schedule read through the built optimizer's lr_fn
  at update counts (so `train.grad_accum_steps` is accounted for as train.py does)."""
  config = config_flags.load_config(os.path.join(ROOT, "experiments", name) + (
      f":{arg}" if arg else ""))
  t = config.train
  b, k = t.batch_size, t.grad_accum_steps
  n = b * k
  assert (b, k) == ((per_update, 1) if not arg else tuple(
      int(v) for v in (arg.split("x") + ["1"])[:2]))
  assert t.num_steps % k == 0
  num_updates = t.num_steps // k
  assert num_updates * n == per_update * updates            # the reference's images
  _, lr_fn = builders.optimizer_from_config(config, {"w": {"kernel": np.zeros(2)}}, _NoFrozen())
  warmup_updates = t.warmup_steps // k
  assert (warmup_updates > 0) == (n >= warmup_from)
  assert warmup_updates * n <= 2000
  for update in sorted({warmup_updates, num_updates // 2, drop_at * per_update // n - 1,
                        drop_at * per_update // n, num_updates - 1}):
    expected = _reference_lr_per_image(update * n, updates, drop_at, lr, per_update)
    assert float(lr_fn(update)) / n == pytest.approx(expected, rel=1e-6), update
  # Warmup: linear from a third, reaching the reference's rate when it ends.
  if warmup_updates:
    assert float(lr_fn(0)) == pytest.approx(t.learning_rate / 3, rel=1e-6)
    assert float(lr_fn(warmup_updates - 1)) < t.learning_rate


def test_accumulated_steps_make_one_update_at_the_update_count_learning_rate():
  """`train.grad_accum_steps=2`: config step counts are train steps, every 2 steps apply one
  update with the mean gradient and the learning rate of the update count (lr_boundaries=(4,)
  train steps = the drop before update 2). Plain SGD, no momentum or decay, on one weight."""
  config = defaults.get_config()
  config.train.update(grad_accum_steps=2, num_steps=8, lr_boundaries=(4,), learning_rate=1.0,
                      momentum=0.0, weight_decay=0.0, warmup_steps=0)
  params = {"w": {"kernel": np.zeros(1, np.float32)}}
  tx, lr_fn = builders.optimizer_from_config(config, params, _NoFrozen())
  state, applied = tx.init(params), []
  for step in range(8):
    grads = {"w": {"kernel": np.full(1, 1.0 + step % 2, np.float32)}}   # mean 1.5 per update
    updates, state = tx.update(grads, state, params)
    applied.append(float(updates["w"]["kernel"][0]))
  np.testing.assert_allclose(applied, [0, -1.5, 0, -1.5, 0, -0.15, 0, -0.15], rtol=1e-6)
  np.testing.assert_allclose([float(lr_fn(u)) for u in range(4)], [1, 1, 0.1, 0.1], rtol=1e-6)


class _NoFrozen:
  """Stands in for the model in `optimizer_from_config`: its trunk freezes nothing."""

  class trunk:  # pylint: disable=invalid-name

    @staticmethod
    def trainable(params):
      return jax.tree.map(lambda _: True, params)


@pytest.mark.parametrize("arg", ["0", "2x0", "x2", "1x2x3", "two"])
def test_voc_bad_batch_argument(arg):
  with pytest.raises(ValueError, match="BxK|>= 1"):
    config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py") + f":{arg}")


def test_overrides_are_applied_and_type_checked():
  config = defaults.get_config()
  config_flags.apply_overrides(config, {"train.num_steps": 5, "anchors.sizes": [8, 16],
                                        "train.learning_rate": 1})
  assert config.train.num_steps == 5 and config.anchors.sizes == (8, 16)
  with pytest.raises(config_flags.ConfigError, match=r"'train.num_stepz'.*'train.num_steps'"):
    config_flags.apply_overrides(config, {"train.num_stepz": 5})
  with pytest.raises(config_flags.ConfigError,
                     match=r"'train.num_steps'.*cannot be casted to type <class 'int'>"):
    config_flags.apply_overrides(config, {"train.num_steps": "many"})
  with pytest.raises(config_flags.ConfigError, match="'train.num_steps'"):
    config_flags.apply_overrides(config, {"train.num_steps": 1.5})
  with pytest.raises(config_flags.ConfigError, match="'data.flip' expects bool"):
    config_flags.apply_overrides(config, {"data.flip": 1})
  for value in (True, None):   # ml_collections would take both (bool is an int)
    with pytest.raises(config_flags.ConfigError, match="'train.num_steps' expects int"):
      config_flags.apply_overrides(config, {"train.num_steps": value})
  assert config.train.num_steps == 5


@pytest.mark.parametrize("overrides,key", [
    ({"train.nonfinite": "ignore"}, "train.nonfinite"),
    ({"train.schedule": "step"}, "train.schedule"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.momentum": 1.0}, "train.momentum"),
    ({"train.lr_boundaries": (10, 5)}, "train.lr_boundaries"),
    ({"eval.metric": "map"}, "eval.metric"),
    ({"model.conv_grad": "fast"}, "model.conv_grad"),
    ({"data.resize_on": "gpu"}, "data.resize_on"),
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


@pytest.mark.parametrize("args, ok", [
    ([], True), (["--coordinator_address=h:1", "--num_processes=2", "--process_id=1"], True),
    (["--coordinator_address=h:1"], False),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"], False),
])
def test_distributed_flags_that_do_not_fit_are_refused_when_parsed(args, ok):
  values = flags.FlagValues()
  config_flags.define_distributed_flags(values)
  if ok:
    values(["prog", *args])
  else:
    with pytest.raises(flags.IllegalFlagValueError, match="--num_processes >= 1"):
      values(["prog", *args])


def test_used_record_keeps_only_the_selected_parts_sections():
  record = json.loads(defaults.get_config().to_json_best_effort())
  used = defaults.used_record(record)
  assert "voc_tfds" in used["data"] and "shapes" not in used["data"]
  assert "coco_json" not in used["data"] and "vgg16" in used["model"] and "fc" in used["model"]
  assert used["data"]["min_size"] == record["data"]["min_size"] and used["train"] == record["train"]
