"""Tests of frcnn_jax/config/run.py and the command-line rules of frcnn_jax/config/flags.py:
the run folder's config.json decides, overrides are classified, tuples replace, --help exits 0.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from frcnn_jax.config import defaults
from frcnn_jax.config import flags as config_flags
from frcnn_jax.config import run as run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True))
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")


def _typed(config):
  """{key: (type tree, value)}: equal only when the values and their types are equal."""
  def kind(value):
    if isinstance(value, tuple):
      return ("tuple", tuple(kind(v) for v in value))
    return type(value).__name__
  return {k: (kind(v), v) for k, v in run_config.flatten(config).items()}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_json_round_trips_every_experiment(path):
  config = config_flags.load_config(path)
  restored, notes = run_config.from_json(json.loads(config.to_json_best_effort()))
  assert notes == []
  assert _typed(restored) == _typed(config)
  assert restored.is_locked


def test_from_json_fills_missing_keys_and_rejects_wrong_types():
  record = json.loads(defaults.get_config().to_json_best_effort())
  del record["test"]["nms_threshold"]
  record["old_section"] = {"gone": 1}
  config, notes = run_config.from_json(record)
  assert config.test.nms_threshold == defaults.get_config().test.nms_threshold
  assert any("test.nms_threshold" in n for n in notes)
  assert any("old_section.gone" in n for n in notes)
  # A key whose type changed since the run was written: a note and the default, unless the
  # key shapes the model.
  record["train"]["log_every"] = "often"
  config, notes = run_config.from_json(record)
  assert config.train.log_every == defaults.get_config().train.log_every
  assert any("train.log_every='often'" in n for n in notes)
  record["anchors"]["sizes"] = 128
  with pytest.raises(run_config.RunConfigError, match="anchors.sizes"):
    run_config.from_json(record)


def test_every_default_key_has_a_kind():
  kinds = {k: run_config.kind_of(k) for k in run_config.flatten(defaults.get_config())}
  assert kinds["test.nms_threshold"] == kinds["rpn.post_nms_top_n_test"] == "test"
  assert kinds["data.voc_tfds.data_dir"] == kinds["eval.batch_size"] == "local"
  assert kinds["train.num_steps"] == kinds["roi.fg_fraction"] == "training"
  for key in ("model.roi_op", "model.fc.dim", "data.voc_tfds.classes", "roi.box_weights", "data.name",
              "anchors.sizes", "model.vgg16.stride"):
    assert kinds[key] == "fixed", key


def _workdir(tmp_path, **changes):
  config = config_flags.load_config(SHAPES, changes)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  return workdir, config


def test_resolve_classifies_every_difference(tmp_path):
  workdir, _ = _workdir(tmp_path, **{"train.num_steps": 300,
                                     "data.voc_tfds.data_dir": "/data/mine"})
  # The experiment file differs from the run in train.num_steps and data.voc_tfds.data_dir (set on the
  # training command line): neither may change what evaluation computes.
  given = config_flags.load_config(SHAPES, {"test.nms_threshold": 0.4})
  resolved = run_config.resolve(workdir, given, from_file=True)
  assert resolved.overrides == {"test.nms_threshold": 0.4}
  assert resolved.config.test.nms_threshold == 0.4
  assert resolved.config.train.num_steps == 300
  assert resolved.config.data.voc_tfds.data_dir == "/data/mine"
  assert any("train.num_steps" in n for n in resolved.notes)
  # A local key given explicitly on the command line is used, and is no override.
  given = config_flags.load_config(SHAPES, {"data.voc_tfds.data_dir": "/elsewhere"})
  resolved = run_config.resolve(workdir, given, from_file=True, explicit=["data.voc_tfds.data_dir"])
  assert resolved.config.data.voc_tfds.data_dir == "/elsewhere" and resolved.overrides == {}
  # Keys that shape the model are errors naming the key and both values.
  for key, value in (("model.roi_op", "roi_pool"), ("model.fc.dim", 128),
                     ("anchors.sizes", (16, 32))):
    given = config_flags.load_config(SHAPES, {key: value})
    with pytest.raises(run_config.RunConfigError, match=key.replace(".", r"\.")):
      run_config.resolve(workdir, given, from_file=True)
  # No config.json: the given config is the run's.
  (workdir / "config.json").unlink()
  resolved = run_config.resolve(workdir, given, from_file=True)
  assert resolved.config is given and resolved.overrides == {}


def test_unreadable_config_json_names_the_file(tmp_path):
  (tmp_path / "config.json").write_text("")
  with pytest.raises(run_config.RunConfigError, match="config.json"):
    run_config.read(tmp_path)


def test_override_tag_and_free_stem(tmp_path):
  assert run_config.override_tag({}) == ""
  assert (run_config.override_tag({"test.nms_threshold": 0.4, "rpn.post_nms_top_n_test": 16})
          == "rpn.post_nms_top_n_test=16-test.nms_threshold=0.4")
  long_a = run_config.override_tag({"data.pad_hw": (600, 1000), "test.nms_threshold": 0.45,
                                    "test.score_threshold": 0.1})
  long_b = run_config.override_tag({"data.pad_hw": (600, 1000), "test.nms_threshold": 0.45,
                                    "test.score_threshold": 0.2})
  assert len(long_a) <= 64 and long_a != long_b
  assert run_config.free_stem(tmp_path, "test-5") == "test-5"
  (tmp_path / "test-5.json").write_text("{}")
  assert run_config.free_stem(tmp_path, "test-5") == "test-5.2"
  (tmp_path / "test-5.2").mkdir()
  assert run_config.free_stem(tmp_path, "test-5") == "test-5.3"


def _parse(argv, monkeypatch):
  """Parses argv on a fresh FlagValues; returns the config flag or the SystemExit message."""
  flag_values = flags.FlagValues()
  config_flags.define_config_flag(flag_values)
  flags.DEFINE_string("workdir", None, "run folder", flag_values=flag_values)
  monkeypatch.setattr(sys, "argv", ["prog", *argv])  # ml_collections reads overrides there
  try:
    config_flags.parse_flags(["prog", *argv], flag_values)
  except SystemExit as e:
    return str(e.code)
  return flag_values["config"]


def test_workdir_config_is_the_default(tmp_path, monkeypatch):
  workdir, config = _workdir(tmp_path, **{"train.num_steps": 300})
  flag = _parse(["--workdir", str(workdir), "--config.test.nms_threshold=0.4"], monkeypatch)
  assert run_config.is_run_config_flag(flag.config_filename)
  assert flag.value.test.nms_threshold == 0.4
  assert flag.value.train.num_steps == 300
  assert flag.value.anchors.sizes == config.anchors.sizes  # a tuple again
  resolved = run_config.resolve(workdir, flag.value, from_file=False,
                                explicit=flag.override_values)
  assert resolved.overrides == {"test.nms_threshold": 0.4}
  flag = _parse(["--workdir", str(workdir), "--config.model.fc.dim=8"], monkeypatch)
  with pytest.raises(run_config.RunConfigError, match="model.fc.dim"):
    run_config.resolve(workdir, flag.value, from_file=False, explicit=flag.override_values)


@pytest.mark.parametrize("argv,expected", [
    ([], "--config is required"),
    (["--workdir", "{tmp}"], "holds no run: {tmp}/config.json does not exist"),
    (["--workdir", "{tmp}/nope"], "--workdir {tmp}/nope holds no run: the folder does not exist"),
    (["--config", "nope.py", "--config.train.num_steps=5"], "'nope.py' does not exist"),
])
def test_missing_config_is_a_message(argv, expected, tmp_path, monkeypatch):
  message = _parse([a.format(tmp=tmp_path) for a in argv], monkeypatch)
  expected = expected.format(tmp=tmp_path)
  assert isinstance(message, str) and expected in message, message
  assert "--config is required" not in message or not argv


def test_tuple_given_twice_last_wins(monkeypatch):
  flag = _parse(["--config", SHAPES, "--config.anchors.sizes=(16,32)",
                 "--config.anchors.sizes=(64,128)"], monkeypatch)
  assert flag.value.anchors.sizes == (64, 128)
  flag = _parse(["--config", SHAPES, "--config.data.voc_tfds.years='2007'", "--config.data.voc_tfds.years='2012'"],
                monkeypatch)
  assert flag.value.data.voc_tfds.years == ("2007", "2012")


COMMANDS = [["-m", "frcnn_jax.train"], ["-m", "frcnn_jax.evaluate"], ["-m", "frcnn_jax.detect"],
            ["-m", "frcnn_jax.export"], ["-m", "frcnn_jax.sweep"],
            [os.path.join(ROOT, "scripts", "benchmark.py")],
            [os.path.join(ROOT, "scripts", "visualize.py")],
            [os.path.join(ROOT, "scripts", "prepare_voc.py")]]


def test_help_exits_zero_and_shows_config():
  procs = [subprocess.Popen([sys.executable, *command, "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT) for command in COMMANDS]
  for command, proc in zip(COMMANDS, procs):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (command, err[-2000:])
    if "prepare_voc" not in command[-1]:
      assert "--config" in out and "frcnn_jax.config" in out, (command, out)


def test_config_printer_shows_every_key_with_its_comment():
  from frcnn_jax.config import printer as config_printer  # pylint: disable=g-import-not-at-top
  text = config_printer.describe(config_flags.load_config(SHAPES))
  lines = text.splitlines()
  keys = run_config.flatten(config_flags.load_config(SHAPES))
  for key in keys:
    assert any(line.split()[0] == key for line in lines if line.strip()), key
  nms = next(line for line in lines if line.split()[0] == "test.nms_threshold")
  assert "0.5" in nms
  stride = next(line for line in lines if line.split()[0] == "model.vgg16.stride")
  assert "8" in stride
  data_dir = next(line for line in lines if line.split()[0] == "data.voc_tfds.data_dir")
  assert "tfds data_dir" in data_dir and "[local]" in data_dir  # its declaration


def test_config_printer_command(tmp_path):
  workdir, _ = _workdir(tmp_path, **{"train.num_steps": 300})
  proc = subprocess.run([sys.executable, "-m", "frcnn_jax.config", str(workdir)],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert any(line.split()[:2] == ["train.num_steps", "300"]
             for line in proc.stdout.splitlines() if line.strip())


def test_unreadable_run_config_is_a_message(tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text("")    # e.g. a run killed while writing it
  message = _parse(["--workdir", str(tmp_path)], monkeypatch)
  assert isinstance(message, str) and "cannot read the run's config" in message
  assert "Traceback" not in message
