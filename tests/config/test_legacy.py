"""Run folders written with the keys of the layout before the plug-ins (frcnn_jax/config/legacy.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from frcnn_jax.config import build as builders
from frcnn_jax.config import legacy
from frcnn_jax.config import run as run_config
from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _old_record(config) -> dict:
  """`config` as the earlier layout wrote it: every renamed key under its old name."""
  record = json.loads(config.to_json_best_effort())
  for old, new in legacy.RENAMED.items():
    *parents, leaf = new.split(".")
    node = record
    for part in parents:
      node = node[part]
    value = node.pop(leaf)
    old_parent, old_leaf = old.split(".")
    record[old_parent][old_leaf] = value
  name = record["data"]["name"]
  for key, value in record["data"].pop(name, {}).items():
    record["data"][key] = value
  for section in ("voc_tfds", "voc_folder", "coco_json", "shapes"):
    record["data"].pop(section, None)
  record.pop("loss")
  record.pop("anchors")
  record["model"].pop("backbone"), record["model"].pop("roi_head")
  record["model"].pop("vgg16"), record["model"].pop("fc")
  return record


def _old_run(tiny_run, tmp_path):  # pylint: disable=redefined-outer-name
  workdir = tmp_path / "old_run"
  shutil.copytree(tiny_run.workdir, workdir)
  (workdir / "config.json").write_text(json.dumps(_old_record(tiny_run.config), indent=2))
  return workdir


def test_upgrade_maps_every_old_key_back(tiny_run):  # pylint: disable=redefined-outer-name
  old = _old_record(tiny_run.config)
  new, renamed = legacy.upgrade(old)
  config, _ = run_config.from_json(new)
  assert run_config.flatten(config) == run_config.flatten(tiny_run.config)
  assert renamed["model.width"] == "model.vgg16.width"
  assert renamed["model.anchor_sizes"] == "anchors.sizes"
  assert legacy.upgrade(new)[1] == {}   # the current layout needs nothing


def test_voc_keys_move_under_the_runs_dataset():
  new, renamed = legacy.upgrade({"data": {"name": "voc_tfds", "years": ["2007", "2012"],
                                          "data_dir": "/d", "coco_train_json": "x.json"}})
  assert new["data"]["voc_tfds"] == {"years": ["2007", "2012"], "data_dir": "/d"}
  assert new["data"]["coco_json"] == {"train_json": "x.json"}
  assert renamed["data.years"] == "data.voc_tfds.years"
  _, renamed = legacy.upgrade({"data": {"name": "shapes", "years": ["2007"]}})
  assert renamed == {"data.years": ""} and "unused" in legacy.describe(renamed)


def test_an_old_run_evaluates_training_asks_for_the_upgrade_which_keeps_the_original(
    tiny_run, tmp_path):  # pylint: disable=redefined-outer-name
  workdir = _old_run(tiny_run, tmp_path)
  original = (workdir / "config.json").read_bytes()
  config = run_config.read(workdir)
  assert run_config.flatten(config) == run_config.flatten(tiny_run.config)
  # Training stops before it creates or changes anything, naming the keys and the command.
  with pytest.raises(ValueError, match=r"model\.width -> model\.vgg16\.width.*"
                                       r"python -m frcnn_jax\.config --upgrade"):
    builders.check(config, str(workdir))
  assert (workdir / "config.json").read_bytes() == original
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]
  # The read-only commands read it as it is.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "frcnn_jax.evaluate", "--workdir", str(workdir)],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--upgrade" in proc.stderr and "model.width -> model.vgg16.width" in proc.stderr
  assert (workdir / "config.json").read_bytes() == original
  # Asked to, the command converts it and keeps the original next to it.
  proc = subprocess.run([sys.executable, "-m", "frcnn_jax.config", "--upgrade", str(workdir)],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "config.legacy.json").read_bytes() == original
  builders.check(run_config.read(workdir), str(workdir))
  assert run_config.upgrade_folder(workdir) == {}   # nothing left to convert
  # A second old file is not written over the kept original.
  (workdir / "config.json").write_bytes(original)
  with pytest.raises(run_config.RunConfigError, match="config.legacy.json exists"):
    run_config.upgrade_folder(workdir)
  assert (workdir / "config.json").read_bytes() == original
