"""Data parallelism: 8 fake CPU devices vs one, two processes vs one (jax.distributed), and a
Ctrl-C to one of two processes.

The children run this file as a script (`python tests/test_train_distributed.py MODE ...`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests import test_train  # pylint: disable=wrong-import-position

# Each test runs several training subprocesses (about a minute each on 2 busy cores).
pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child(args, devices, cache_dir, timeout=240):
  env = test_train.subprocess_env(devices)
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(process, timeout=300):
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-4000:]
  return out


def test_eight_devices_update_equals_one_device(tmp_path_factory):
  cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
  out = _wait(_child(["eight_devices"], 8, cache))
  assert "max_abs_diff" in out


def test_two_processes_match_one_process(tmp_path, tmp_path_factory):
  cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
  address = f"127.0.0.1:{_free_port()}"
  workers = [_child(["worker", str(tmp_path / "two"), str(tmp_path / f"p{i}.npz"), address,
                     str(i)], 1, cache) for i in range(2)]
  for worker in workers:
    _wait(worker)
  _wait(_child(["reference", str(tmp_path / "single.npz")], 2, cache))
  p0, p1, single = (np.load(tmp_path / f"{n}.npz") for n in ("p0", "p1", "single"))
  assert p0.files == single.files and len(p0.files) > 4
  for name in p0.files:
    np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
    np.testing.assert_allclose(p0[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 3]  # 3 twice: train, eval


STEPS = 100


def _train_command(workdir, address, process_id):
  # JAX's preemption sync point comes some steps after the signal (10-20 of these tiny steps
  # seen): the run is long enough for it to fall inside.
  overrides = {**test_train.TINY, "train.num_steps": STEPS, "train.checkpoint_every": 1000}
  return [sys.executable, "-m", "frcnn_jax.train", "--config", test_train.SHAPES, "--workdir",
          workdir, *test_train.cli_args(overrides), "--coordinator_address", address,
          "--num_processes", "2", "--process_id", str(process_id)]


def _start_pair(workdir, cache_dir, logs):
  """Both processes of a two-process run of the train command, each logging to a file."""
  env = test_train.subprocess_env(1)
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  address = f"127.0.0.1:{_free_port()}"
  processes = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
      processes.append(subprocess.Popen(_train_command(workdir, address, i), env=env, cwd=ROOT,
                                        stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True))
  return processes


def _ended(processes, logs, timeout=300):
  for process in processes:
    process.wait(timeout=timeout)
  outs = [log.read_text() for log in logs]
  for process, out in zip(processes, outs):
    assert process.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
  return outs


def test_ctrl_c_on_one_process_stops_both_at_one_saved_step_and_resumes(tmp_path,
                                                                         tmp_path_factory):
  cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
  workdir = str(tmp_path / "run")
  logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
  processes = _start_pair(workdir, cache, logs)
  deadline = time.monotonic() + 300
  while f"step 3/{STEPS}" not in logs[0].read_text():
    assert all(p.poll() is None for p in processes), logs[0].read_text()[-4000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGINT)  # Ctrl-C in process 1's terminal only
  out = _ended(processes, logs)[0]
  stopped = [line for line in out.splitlines() if "preempted at step" in line]
  assert len(stopped) == 1, out[-4000:]
  assert stopped[0].startswith("SIGTERM or Ctrl-C to a process of the run: preempted at step")
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < STEPS and f"at step {saved[0]};" in stopped[0]

  out = _ended(_start_pair(workdir, cache, logs), logs)[0]
  assert f"step {saved[0] + 1}/{STEPS}" in out and f"step {STEPS}/{STEPS}" in out, out[-4000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [*range(1, STEPS + 1), STEPS]  # every step logged once, then the evaluation


# ------------------------------------------------------------------------------------------
# Child processes.


def _eight_devices() -> None:
  """One update with the global batch of 8 on 8 devices vs on 1 device."""
  import jax  # pylint: disable=import-outside-toplevel

  from frcnn_jax.config import build as builders  # pylint: disable=g-import-not-at-top
  from frcnn_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from frcnn_jax.training import step as train_step  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  config = test_train.tiny_config(train__batch_size=8, data__flip=False)
  model = builders.model_from_config(config, 6)
  settings = builders.detector_settings_from_config(config)
  source = builders.source_from_config(config, "train")
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    batch = next(builders.train_data_from_config(config, source, mesh))
    state, tx, lr_fn = train_step.create_train_state(config, model, mesh)
    step = jax.jit(train_step.make_train_step(model, settings, tx, lr_fn),
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))
    for _ in range(2):
      state, metrics = step(state, batch)
    assert bool(metrics["finite"])
    results.append(jax.tree.map(np.asarray, state.params))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), *results))
  # Gradients summed over 8 shards instead of one batch differ in float32 rounding (seen:
  # 1.7e-5 on one of 4608 weights after two updates); a wrong mean or a missing shard moves
  # the weights far more.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), *results)
  print("max_abs_diff", max(diffs))


def _worker(workdir: str, out: str, address: str = "", process_id: str = "0") -> None:
  """Trains the tiny config 3 steps (batch 2) and saves this process's params to `out`."""
  import jax  # pylint: disable=import-outside-toplevel

  from frcnn_jax import train  # pylint: disable=g-import-not-at-top
  from frcnn_jax.runtime import parallel  # pylint: disable=g-import-not-at-top

  if address:
    parallel.initialize_distributed(address, 2, int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 2
  result = train.train_and_evaluate(
      test_train.tiny_config(train__num_steps=3, train__checkpoint_every=3), workdir)
  flat = jax.tree_util.tree_flatten_with_path(result["params"])[0]
  np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat})


def _reference(out: str) -> None:
  """The two-process run in one process with 2 devices: the same global batches (each half
  read from that process's data shard), the same jitted step."""
  import jax  # pylint: disable=import-outside-toplevel

  from frcnn_jax.config import build as builders  # pylint: disable=g-import-not-at-top
  from frcnn_jax.data import batching  # pylint: disable=import-outside-toplevel
  from frcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from frcnn_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from frcnn_jax.training import step as train_step  # pylint: disable=g-import-not-at-top

  config = test_train.tiny_config(train__num_steps=3)
  d = config.data
  mesh = parallel.make_mesh()
  source = builders.source_from_config(config, "train")
  loaders = [pipeline.train_loader(
      source, batch_size=config.train.batch_size, seed=config.seed, min_size=d.min_size,
      max_size=d.max_size, pad_hw=d.pad_hw, max_gt=d.max_gt, flip=d.flip, prefetch=0,
      shard_options=batching.Shard(i, 2)) for i in range(2)]
  model = builders.model_from_config(config, len(source.classes))
  settings = builders.detector_settings_from_config(config)
  state, tx, lr_fn = train_step.create_train_state(config, model, mesh)
  step = jax.jit(train_step.make_train_step(model, settings, tx, lr_fn),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))
  for _ in range(config.train.num_steps):
    halves = [next(loader) for loader in loaders]
    batch = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
    state, _ = step(state, parallel.host_batch_to_global(batch, mesh))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat})


if __name__ == "__main__":
  {"eight_devices": _eight_devices, "worker": _worker,
   "reference": _reference}[sys.argv[1]](*sys.argv[2:])
