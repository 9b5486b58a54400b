"""Tests of the training loop (frcnn_jax/train.py) on a tiny shapes config, single process."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import train
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.detection import detector
from frcnn_jax.runtime import parallel
from frcnn_jax.runtime import workdir_lock
from frcnn_jax.training import checkpointing
from frcnn_jax.training import step as train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")

# A tiny detector on 64 x 64 shapes: compiles and steps in seconds on one CPU core.
TINY = {
    "data.shapes.num_train": 16, "data.shapes.num_test": 4, "data.shapes.image_size": 64,
    "data.min_size": 64, "data.max_size": 64, "data.pad_hw": (64, 64), "data.max_gt": 8,
    "data.num_workers": 0, "data.prefetch": 1,
    "model.vgg16.width": 0.125, "model.vgg16.convs_per_block": (1, 1, 1, 1, 1), "model.fc.dim": 32,
    "anchors.sizes": (16, 32), "anchors.ratios": (1.0,),
    "rpn.pre_nms_top_n_train": 64, "rpn.post_nms_top_n_train": 16,
    "rpn.pre_nms_top_n_test": 64, "rpn.post_nms_top_n_test": 8, "rpn.batch_size_per_image": 32,
    "roi.batch_size_per_image": 16, "test.detections_per_image": 10,
    "train.batch_size": 2, "train.num_steps": 4, "train.learning_rate": 0.01,
    "train.warmup_steps": 0, "train.lr_boundaries": (), "train.checkpoint_every": 2,
    "train.log_every": 1, "eval.batch_size": 4,
}


def tiny_config(**overrides):
  """The tiny config; keyword names use "__" for "." (train__num_steps=3)."""
  extra = {key.replace("__", "."): value for key, value in overrides.items()}
  return config_flags.load_config(SHAPES, {**TINY, **extra})


def subprocess_env(devices: int = 1) -> dict[str, str]:
  """Environment for a child JAX process on CPU with `devices` fake devices (and the suite's
  cheap compiles, tests/conftest.py)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def cli_args(overrides: dict) -> list[str]:
  """`--config.key=value` arguments for `python -m frcnn_jax.train`."""
  def fmt(value):
    if isinstance(value, tuple):
      return "(" + ",".join(fmt(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)
  return [f"--config.{key}={fmt(value)}" for key, value in overrides.items()]


def load_params(workdir: str, config) -> tuple[int, dict]:
  """Newest checkpoint's (step, params) as numpy."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = builders.model_from_config(config, 6)
  state, _, _ = train_step.create_train_state(config, model, mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=5)
  restored, _ = checkpointer.restore_latest(abstract)
  checkpointer.close()
  return int(restored.step), jax.tree.map(np.asarray, restored.params)


@pytest.fixture(scope="module")
def fixed_setup():
  """One batch, the initial state, the jitted step of the tiny config (compiled once) and its
  loss at a fixed key with dropout off (a deterministic measure of progress on the batch)."""
  config = tiny_config(train__optimizer="adamw", train__learning_rate=3e-3)
  source = builders.source_from_config(config, "train")
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = next(builders.train_data_from_config(config, source, mesh))
  model = builders.model_from_config(config, len(source.classes))
  settings = builders.detector_settings_from_config(config)
  state, tx, lr_fn = train_step.create_train_state(config, model, mesh)
  step = jax.jit(train_step.make_train_step(model, settings, tx, lr_fn))

  def fixed_loss(params):
    total, _ = detector.loss_fn(params, batch, jax.random.key(0), model=model,
                                settings=settings, train=False)
    return float(total)

  return batch, state, step, fixed_loss


def test_steps_are_finite_and_loss_decreases_on_a_fixed_batch(fixed_setup):
  batch, state, step, fixed_loss = fixed_setup
  before = fixed_loss(state.params)
  for _ in range(8):
    state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    assert metrics["finite"] and all(np.isfinite(metrics[k]) for k in ("total", "rpn_cls",
                                                                         "det_cls"))
  assert int(state.step) == 8 and int(state.nonfinite_skips) == 0
  # The sampled anchors and RoIs change every step, so the step's own loss is noisy; the loss
  # at one fixed key is not.
  after = fixed_loss(state.params)
  assert after < 0.8 * before, (before, after)


def test_nonfinite_loss_is_skipped_and_counted_or_named(fixed_setup):
  batch, state, step, _ = fixed_setup
  batch = dict(batch, gt_boxes=jnp.full_like(batch["gt_boxes"], jnp.nan))
  before = jax.tree.map(np.asarray, state.params)
  new_state, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert not metrics["finite"] and int(new_state.nonfinite_skips) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_state.params), before)
  train_step.check_finite(7, metrics, "skip")
  with pytest.raises(train_step.NonFiniteLossError, match=r"step 7.*(rpn_box|det_box|total)"):
    train_step.check_finite(7, metrics, "error")


def test_train_and_evaluate_writes_metrics_checkpoints_and_eval(tmp_path, monkeypatch,
                                                                 capsys):
  monkeypatch.chdir(tmp_path)
  workdir = "run"   # relative, as in the README's command (orbax needs absolute paths)
  result = train.train_and_evaluate(tiny_config(), workdir)
  assert result["step"] == 4 and not result["preempted"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 4]
  for key in ("total", "rpn_cls", "rpn_box", "det_cls", "det_box", "learning_rate",
              "images_per_sec", "step_time"):
    assert np.isfinite(records[-2][key]), key
  assert 0.0 <= records[-1]["eval/map"] <= 1.0
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["2", "4"]
  eval_files = [f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".json")]
  with open(os.path.join(workdir, "eval", eval_files[0])) as f:
    report = json.load(f)
  assert report["step"] == 4 and 0.0 <= report["map"] <= 1.0
  assert "skipped_records" in records[-2]  # the input pipeline's counters
  with open(os.path.join(workdir, "console.log")) as f:
    log = f.read()
  assert "step 4/4 (100%)" in log and "eval step 4:" in log
  # A second start finds the finished run complete: it says so and writes nothing.
  before = _listing(workdir), _read(os.path.join(workdir, "metrics.jsonl"))
  capsys.readouterr()
  again = train.train_and_evaluate(tiny_config(), workdir)
  assert again["complete"] and again["step"] == 4 and not again["preempted"]
  assert again["eval"]["map"] == pytest.approx(result["eval"]["map"])
  assert "is complete" in capsys.readouterr().out
  assert (_listing(workdir), _read(os.path.join(workdir, "metrics.jsonl"))) == before
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again["params"]),
               jax.tree.map(np.asarray, result["params"]))
  # A changed model key stops the run before anything is moved, naming the key.
  checkpoints = _listing(os.path.join(workdir, "checkpoints"))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"(?s)does not fit this run.*model\.fc\.dim: 32 -> 48"):
    train.train_and_evaluate(tiny_config(model__fc__dim=48, train__num_steps=6), workdir)
  assert _listing(os.path.join(workdir, "checkpoints")) == checkpoints
  assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))


def _listing(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


def _read(path):
  with open(path) as f:
    return f.read()


def test_a_second_run_in_the_same_workdir_is_refused_naming_the_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom frcnn_jax.runtime import workdir_lock\n"
       "workdir_lock.WorkdirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\n"
       "time.sleep(300)", str(tmp_path)],
      env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"process {holder.pid} on host {socket.gethostname()}"):
      train.train_and_evaluate(tiny_config(), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert not os.path.exists(tmp_path / "checkpoints")
  lock = workdir_lock.WorkdirLock(tmp_path)  # the dead holder's lock file does not block
  lock.acquire()
  lock.release()


def test_unreadable_config_json_is_a_warning_and_is_replaced_whole(tmp_path, caplog):
  (tmp_path / "config.json").write_text("")  # left empty by a kill in an in-place rewrite
  config = tiny_config()
  train._write_config(config, str(tmp_path))
  assert "config.json is unreadable" in caplog.text
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())
  assert os.listdir(tmp_path) == ["config.json"]


def test_missing_dataset_and_weights_are_clear_errors(tmp_path):
  config = tiny_config(data__name="voc_folder", data__voc_folder__data_dir=str(tmp_path / "no_voc"))
  with pytest.raises((FileNotFoundError, ValueError), match="no_voc"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny_config(model__pretrained=str(tmp_path / "vgg.npz"))
  with pytest.raises(FileNotFoundError, match="vgg.npz"):
    train.train_and_evaluate(config, str(tmp_path / "b"))


@pytest.mark.parametrize("overrides, message", [
    ({"data.pad_hw": (), "data.canvases": ((250, 250),)}, r"multiples of the backbone's stride"),
    ({"data.canvas_multiple": 20}, r"data\.canvas_multiple=20 must be a positive multiple"),
    ({}, r"model\.vgg16\.width' must be > 0"),
])
def test_a_bad_value_stops_before_the_workdir_is_created(tmp_path, overrides, message):
  config = tiny_config(**{key.replace(".", "__"): value for key, value in overrides.items()})
  if not overrides:   # set after loading, which checks it: training checks again
    config.model.vgg16.width = -1.0
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_bad_value_on_the_command_line_leaves_the_workdir_as_it_was(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.train", "--config", SHAPES, "--workdir", str(workdir),
       "--config.data.pad_hw=()", "--config.data.canvases=((250,250),)"],
      capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
  assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_orbax_info_logs_are_dropped_and_its_warnings_kept():
  quiet = config_flags._QuietFilter()  # pylint: disable=protected-access
  orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "atomicity.py")

  def record(level, pathname):
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)
  assert not quiet.filter(record(logging.INFO, orbax_file))
  assert quiet.filter(record(logging.WARNING, orbax_file))
  assert quiet.filter(record(logging.INFO, train.__file__))


def test_command_line_help():
  help_text = subprocess.run([sys.executable, "-m", "frcnn_jax.train", "--help"],
                             env=subprocess_env(), capture_output=True, text=True,
                             cwd=ROOT).stdout
  for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes",
               "--process_id"):
    assert flag in help_text, flag


def test_sigint_and_sigterm_become_a_stop_request_and_a_second_ctrl_c_interrupts():
  previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  stop = train._Preemption()
  try:
    assert not stop.now() and not stop.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal_name == "SIGINT" and stop.now() and stop.reached(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal_name == "SIGTERM"
  finally:
    stop.restore()
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous


def test_a_stop_during_start_up_exits_before_training_saving_nothing(tmp_path, capsys):
  stop = train._Preemption()
  try:
    stop.signal_name = "SIGTERM"  # arrived while the model was being built
    result = train.train_and_evaluate(tiny_config(), str(tmp_path), stop=stop)
  finally:
    stop.restore()
  assert result["preempted"] and result["step"] == 0 and not result["eval"]
  assert "SIGTERM during start-up" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / "checkpoints" / "0")
  assert not os.path.exists(tmp_path / "metrics.jsonl")
