"""Tests for frcnn_jax/evaluate.py: checkpoint restore, gathering, report, CLI, 8 devices."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import evaluate
from frcnn_jax.config import build as builders
from frcnn_jax.data import eval_loader
from frcnn_jax.data.sources import base
from frcnn_jax.detection import detector
from frcnn_jax.evaluation import runner as eval_runner
from frcnn_jax.runtime import parallel
from frcnn_jax.training import checkpointing
from frcnn_jax.training import restore
from frcnn_jax.training import step as train_step
from tests.evaluation.tiny_run import STEP
from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def test_restore_params_newest_and_missing(tiny_run, tmp_path):
  mesh = parallel.make_mesh(jax.devices()[:1])
  params, step = restore.restore_params(tiny_run.workdir, mesh)
  assert step == STEP
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), tiny_run.params)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7.*\[5\]"):
    restore.restore_params(tiny_run.workdir, mesh, step=7)
  with pytest.raises(FileNotFoundError, match="train first"):
    restore.restore_params(tmp_path, mesh)


def _saved_run(workdir, steps):
  """Checkpoints of a TrainState whose parameters are one large array, in `workdir`."""
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", keep=len(steps))
  for step in steps:
    checkpointer.save(step, train_step.TrainState(
        params={"w": jnp.arange(20000, dtype=jnp.float32) * step}, opt_state=(),
        step=jnp.int32(step), rng=jnp.zeros(2, jnp.uint32), nonfinite_skips=jnp.int32(0)))
  checkpointer.close()


def test_restore_params_refuses_damaged_parameters_and_moves_nothing(tmp_path):
  _saved_run(tmp_path, (1, 2))
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  largest = max((p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  largest.write_bytes(bytes(data))
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  mesh = parallel.make_mesh(jax.devices()[:1])
  with pytest.raises(ValueError, match=r"checkpoints/2 is damaged: .*\.params\['w'\].*\[1\]"):
    restore.restore_params(tmp_path, mesh)
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before
  params, step = restore.restore_params(tmp_path, mesh, step=1)
  assert step == 1
  np.testing.assert_array_equal(params["w"], np.arange(20000, dtype=np.float32))


def _one_device_result(tiny_run, workdir=None):
  return eval_runner.run_evaluation(tiny_run.config, tiny_run.params, step=STEP, workdir=workdir,
                                 mesh=parallel.make_mesh(jax.devices()[:1]))


def test_gathered_detections_match_per_image_runs(tiny_run):
  mesh = parallel.make_mesh(jax.devices()[:1])
  cfg, source = tiny_run.config, tiny_run.source
  kw = dict(model=tiny_run.model, settings=tiny_run.settings, mesh=mesh)
  dets, gts, ids = eval_runner.collect_detections(
      tiny_run.params, builders.eval_data_from_config(cfg, source, mesh), source=source, **kw)
  np.testing.assert_array_equal(ids, np.arange(len(source)))
  assert sum(len(d["scores"]) for d in dets) > 0
  for i in range(len(source)):
    example = source[i]
    one_source = _One(example)
    one, _, _ = eval_runner.collect_detections(
        tiny_run.params, builders.eval_data_from_config(cfg, one_source, mesh),
        source=one_source, **kw)
    for key in ("boxes", "scores", "labels"):
      np.testing.assert_allclose(dets[i][key], one[0][key], atol=1e-4)
    # Ground truth is the original annotation, with its difficult flags.
    np.testing.assert_array_equal(gts[i]["boxes"], example["boxes"])
    np.testing.assert_array_equal(gts[i]["labels"], example["labels"])
    np.testing.assert_array_equal(gts[i]["difficult"], example["difficult"])


def test_run_evaluation_writes_report(tiny_run, tmp_path):
  result = _one_device_result(tiny_run, str(tmp_path))
  report = json.loads((tmp_path / "eval" / f"test-{STEP}.json").read_text())
  assert report["step"] == STEP and report["metric"] == "voc07"
  assert list(report["ap"]) == list(tiny_run.source.classes)
  assert report["map"] == pytest.approx(result["map"])
  assert result["path"] == str(tmp_path / "eval" / f"test-{STEP}.json")
  pngs = sorted(p.name for p in (tmp_path / "eval" / f"test-{STEP}").iterdir())
  assert len(pngs) == len(tiny_run.source.classes) and pngs[0] == "001_circle.png"


class _One:
  """A one-image source with the given example (image id 0)."""

  def __init__(self, example):
    self.example = example
    self.classes = ()

  def __len__(self):
    return 1

  def __getitem__(self, i):
    return {**self.example, "image_id": np.int64(0)}

  def annotation(self, i):
    return {k: self.example[k] for k in base.ANNOTATION_KEYS}


def test_format_table_marks_classes_without_gt():
  result = {"metric": "voc07", "map": 0.5, "num_images": 3,
            "ap": {"cat": 0.5, "dog": None}}
  table = eval_runner.format_table(result)
  assert "cat    0.5000" in table and "n/a (no ground truth)" in table
  assert table.splitlines()[-1].startswith("mAP")


def test_cli_prints_table_and_writes_json(tiny_run):
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.evaluate", "--config", str(tiny_run.config_path),
       "--workdir", str(tiny_run.workdir), f"--step={STEP}"],
      capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mAP" in proc.stdout and "circle" in proc.stdout
  assert (tiny_run.workdir / "eval" / f"test-{STEP}.json").exists()


def test_cli_stops_with_a_message_on_a_damaged_checkpoint(tiny_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run.workdir, workdir)
  for path in (workdir / "checkpoints" / str(STEP) / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"")
  before = sorted(str(p) for p in workdir.rglob("*"))
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.evaluate", "--config", str(tiny_run.config_path),
       "--workdir", str(workdir)],
      capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"error: checkpoint {workdir / 'checkpoints' / str(STEP)} cannot be read (" in proc.stderr
  # tensorstore's reads still in flight may print asyncio's "Event loop is closed" at exit.
  assert "frcnn_jax" not in "".join(line for line in proc.stderr.splitlines()
                                    if line.lstrip().startswith("File "))
  assert sorted(str(p) for p in workdir.rglob("*")) == before


def test_cli_help():
  proc = subprocess.run([sys.executable, "-m", "frcnn_jax.evaluate", "--help"],
                        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120,
                        check=False)
  assert "Usage:" in proc.stdout and "--workdir" in proc.stdout and "--step" in proc.stdout


_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from frcnn_jax.config import build as builders
    from frcnn_jax.config import flags as config_flags
    from frcnn_jax.evaluation import runner as eval_runner
    from frcnn_jax.runtime import parallel
    from frcnn_jax.training import restore
    config = config_flags.load_config(sys.argv[1], {"eval.batch_size": 8})
    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh()
    params, _ = restore.restore_params(sys.argv[2], mesh)
    source = builders.source_from_config(config, "eval")
    model = builders.model_from_config(config, len(source.classes))
    dets, gts, ids = eval_runner.collect_detections(
        params, builders.eval_data_from_config(config, source, mesh), source=source,
        model=model, settings=builders.detector_settings_from_config(config), mesh=mesh)
    r = eval_runner.compute_metrics(dets, gts, source.classes)
    # eval.batch_size=2 is rounded up to the 8 devices by run_evaluation.
    rounded = eval_runner.run_evaluation(config_flags.load_config(sys.argv[1]), params, step=0,
                                      mesh=mesh)
    assert rounded["map"] == r["map"] and rounded["ap"] == r["ap"], (rounded, r)
    print(json.dumps({"map": r["map"], "ap": r["ap"], "ids": ids.tolist(),
                      "dets": [{k: v.tolist() for k, v in d.items()} for d in dets]}))
    """)


def test_eight_devices_give_the_same_detections_and_metrics(tiny_run):
  proc = subprocess.run(
      [sys.executable, "-c", _PARALLEL_SCRIPT, str(tiny_run.config_path), str(tiny_run.workdir)],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = json.loads(proc.stdout.strip().splitlines()[-1])
  mesh = parallel.make_mesh(jax.devices()[:1])
  dets, gts, ids = eval_runner.collect_detections(
      tiny_run.params, builders.eval_data_from_config(tiny_run.config, tiny_run.source, mesh),
      source=tiny_run.source, model=tiny_run.model, settings=tiny_run.settings, mesh=mesh)
  one = eval_runner.compute_metrics(dets, gts, tiny_run.source.classes)
  assert eight["ids"] == ids.tolist()
  for d8, d1 in zip(eight["dets"], dets):
    for key in ("boxes", "scores", "labels"):
      np.testing.assert_allclose(np.asarray(d8[key]).reshape(d1[key].shape), d1[key],
                                 atol=1e-4)
  assert eight["ap"] == pytest.approx(one["ap"], abs=1e-6, nan_ok=True)
  assert eight["map"] == pytest.approx(one["map"], abs=1e-6)


# Original annotations (DESIGN pixels): image 0 holds 5 objects (more than max_gt=3; the two
# smallest are cut from its batch), image 1 a box 0.2 px wide once resized that the resize
# rounding pushes past the image border (dropped from its batch as degenerate), image 2 cannot
# be decoded (skipped by the pipeline, so never evaluated).
_ORACLE_SIZES = ((40, 50), (40, 47), (40, 40))
_ORACLE_BOXES = (
    [[0, 0, 20, 20], [25, 0, 50, 20], [0, 22, 20, 40], [30, 30, 34, 34], [40, 30, 44, 33]],
    [[0, 0, 30, 30], [46, 10, 47, 20]],
    [[5, 5, 30, 30]])
_ORACLE_LABELS = ([1, 2, 3, 1, 2], [2, 1], [3])


class _Annotated:
  """Flat images with the annotations above (image 2 unreadable: `source[2]` is None)."""

  classes = ("a", "b", "c")
  name = "annotated"

  def __len__(self):
    return len(_ORACLE_SIZES)

  def annotation(self, i):
    return base.annotation(_ORACLE_BOXES[i], _ORACLE_LABELS[i],
                              np.zeros(len(_ORACLE_LABELS[i]), bool), f"img{i}",
                              _ORACLE_SIZES[i])

  def __getitem__(self, i):
    if i == 2:
      return None
    return base.example(np.zeros(_ORACLE_SIZES[i] + (3,), np.uint8), self.annotation(i), i)


def _oracle_predict(params, batch, *, model, settings):
  """Stands in for detector.predict: the detections stored for each image id in `params`."""
  del model, settings
  return jax.tree.map(lambda table: table[batch["image_id"]], params)


def test_ground_truth_is_the_original_annotation(monkeypatch):
  source = _Annotated()
  batches = list(eval_loader.eval_batches(source, batch_size=2, min_size=8, max_size=100,
                                       pad_hw=(16, 16), max_gt=3))
  # The batches lost objects: 3 of 5 slots in image 0, the degenerate box of image 1.
  assert batches[0]["gt_valid"].sum(1).tolist() == [3, 1]
  # Perfect detections: the original boxes; the cut objects score highest, so that losing
  # their ground truth would make them false positives ranked first.
  table = {"boxes": np.zeros((3, 5, 4), np.float32), "scores": np.zeros((3, 5), np.float32),
           "labels": np.ones((3, 5), np.int32), "valid": np.zeros((3, 5), bool)}
  for i, (boxes, labels) in enumerate(zip(_ORACLE_BOXES, _ORACLE_LABELS)):
    n = len(boxes)
    table["boxes"][i, :n], table["labels"][i, :n], table["valid"][i, :n] = boxes, labels, True
    table["scores"][i, :n] = np.linspace(0.5, 0.9, n)
  monkeypatch.setattr(detector, "predict", _oracle_predict)
  eval_runner._gathered_predict.cache_clear()  # pylint: disable=protected-access
  try:
    dets, gts, ids = eval_runner.collect_detections(
        table, batches, source=source, model="oracle", settings=None,
        mesh=parallel.make_mesh(jax.devices()[:1]))
  finally:
    eval_runner._gathered_predict.cache_clear()  # pylint: disable=protected-access
  np.testing.assert_array_equal(ids, [0, 1])
  for i in ids:
    np.testing.assert_array_equal(gts[i]["boxes"], _ORACLE_BOXES[i])
    np.testing.assert_array_equal(gts[i]["labels"], _ORACLE_LABELS[i])
    np.testing.assert_array_equal(dets[i]["boxes"], _ORACLE_BOXES[i])
  for metric in ("voc07", "voc12"):
    result = eval_runner.compute_metrics(dets, gts, source.classes, metric=metric)
    assert result["map"] == 1.0 and result["ap"] == {"a": 1.0, "b": 1.0, "c": 1.0}, result


def test_cli_reads_the_run_folder_and_keeps_a_clean_console(tiny_run, tmp_path):
  from tests.evaluation.run_folder import run_folder  # pylint: disable=g-import-not-at-top
  workdir = run_folder(tiny_run, tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.evaluate", "--config", str(tiny_run.config_path),
       "--workdir", str(workdir)],
      capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "eval" / f"test-{STEP}.json").read_text())
  assert report["overrides"] == {} and report["config"].endswith("config.json")
  console = proc.stdout + proc.stderr
  for noise in ("orbax", "could not be restored", "read only", "libtpu", "backend 'tpu'"):
    assert noise not in console, (noise, proc.stderr)
  assert console.count("mAP") == 1, console
  assert len(proc.stderr.splitlines()) <= 3, proc.stderr      # the progress lines


def test_cli_refuses_a_key_that_shapes_the_model(tiny_run, tmp_path):
  from tests.evaluation.run_folder import run_folder  # pylint: disable=g-import-not-at-top
  workdir = run_folder(tiny_run, tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.evaluate", "--config", str(tiny_run.config_path),
       "--workdir", str(workdir), "--config.model.roi_op=roi_align",
       "--config.test.nms_threshold=0.3"],
      capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False)
  assert proc.returncode != 0 and "model.roi_op" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not (workdir / "eval").exists()


def test_command_report_records_overrides_and_never_overwrites(tiny_run, tmp_path):
  from frcnn_jax.config import run as run_config  # pylint: disable=g-import-not-at-top
  names = list(tiny_run.source.classes)
  dets = [{"boxes": np.array([[0, 0, 10, 10.]]), "scores": np.array([0.9]),
           "labels": np.array([1])}]
  gts = [{"boxes": np.array([[0, 0, 10, 10.]]), "labels": np.array([1]),
          "difficult": np.array([False])}]
  result = eval_runner.compute_metrics(dets, gts, names)
  result["step"] = STEP

  def write(overrides):
    resolved = run_config.CommandConfig(tiny_run.config, overrides, "run/config.json", [])
    return evaluate.write_command_report(result, resolved, tmp_path, "test")

  first = write({})
  assert first == tmp_path / "eval" / f"test-{STEP}.json"
  first_bytes = first.read_bytes()
  second = write({})
  assert second == tmp_path / "eval" / f"test-{STEP}.2.json"
  assert first.read_bytes() == first_bytes
  tagged = write({"test.nms_threshold": 0.3, "data.pad_hw": (64, 64)})
  assert tagged.name == f"test-{STEP}-data.pad_hw=64,64-test.nms_threshold=0.3.json"
  report = json.loads(tagged.read_text())
  assert report["overrides"] == {"test.nms_threshold": 0.3, "data.pad_hw": [64, 64]}
  assert report["map"] == pytest.approx(1.0)
  assert (tmp_path / "eval" / tagged.stem).is_dir()        # its own PR plots
