"""frcnn_jax.benchmarking.grain_loader: grain's batches against the project's loaders, and the
pipeline's guarantees (issue 21, item 4).

The batches must be equal bit for bit (hard assertions). The guarantees are measured and
reported: each guarantee test prints its outcome as one JSON line ("GRAIN_GUARANTEE {...}"),
records it as a junit property, passes when the guarantee holds and is reported as XFAIL with
the outcome in its reason (shown by `-ra`) when grain misses it. The project's pool runs
through the same harness as a control, and must hold every guarantee. Variants:

  pool          frcnn_jax.data.pipeline.train_loader (worker_pool.OrderedPool)
  grain-watch   grain with this module's worker_init_fn: workers poll their parent's pid and
                ignore Ctrl-C
  grain-plain   grain as it is (no worker_init_fn)

`GRAIN_KILL_TRIALS` (default 8) sets the number of SIGKILL trials per variant.
"""

import gc
import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from frcnn_jax.data import eval_loader
from frcnn_jax.data import pipeline
from tests import mixed_shapes

try:
  from frcnn_jax.benchmarking import grain_loader
except ImportError:
  grain_loader = None

needs_grain = pytest.mark.skipif(grain_loader is None, reason="grain is not importable")
REPO = pathlib.Path(__file__).resolve().parents[2]
SHM = pathlib.Path("/dev/shm")
# Landscape 48x64 / portrait 64x48 records enlarged onto two canvases (tests/data/
# test_device_resize.py), record 5 unreadable (replaced and counted).
SIZES = {"min_size": 72, "max_size": 120, "canvases": ((72, 96), (96, 72)), "max_gt": 6}
KILL_TRIALS = int(os.environ.get("GRAIN_KILL_TRIALS", "8"))
GRAIN_VARIANTS = ("grain-watch", "grain-plain")


class Holes:
  """MixedShapes whose records in `bad` are unreadable (None, as under bad_input='skip');
  module level so that worker processes can unpickle it."""

  def __init__(self, n: int, split: str, bad=(5,)):
    self._source, self._bad = mixed_shapes.MixedShapes(n, split), set(bad)
    self.classes, self.name = self._source.classes, "holes"

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return None if index in self._bad else self._source[index]

  def annotation(self, index):
    return self._source.annotation(index)


def _assert_same(expected, got):
  assert len(expected) == len(got)
  for n, (a, b) in enumerate(zip(expected, got)):
    assert set(a) == set(b), n
    for k in a:
      assert np.asarray(b[k]).dtype == a[k].dtype, (n, k)
      np.testing.assert_array_equal(np.asarray(b[k]), a[k], err_msg=f"batch {n} {k}")


def _train_args(resize: str) -> dict:
  return dict(batch_size=2, seed=5, flip=True, resize_on_device=resize == "device", **SIZES)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# --- Batches -------------------------------------------------------------------------------

def test_a_missing_grain_is_a_clear_import_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "grain", None)   # what `import grain` meets without grain
  monkeypatch.delitem(sys.modules, "frcnn_jax.benchmarking.grain_loader", raising=False)
  with pytest.raises(ImportError, match="needs the grain package"):
    importlib.import_module("frcnn_jax.benchmarking.grain_loader")


@needs_grain
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("resize", ["host", "device"])
def test_train_batches_equal_the_pool_loader(resize, workers):
  source = Holes(12, "train")
  pool = pipeline.train_loader(source, num_workers=workers, prefetch=0, **_train_args(resize))
  grain = grain_loader.grain_train_loader(source, num_workers=workers, **_train_args(resize))
  try:
    expected, got = _take(pool, 8), _take(grain, 8)   # 6 batches per epoch: into the second
  finally:
    pool.close()
    grain.close()
  _assert_same(expected, got)
  assert grain.counts == pool.counts and grain.counts["skipped_records"] >= 1
  assert grain.source_canvases == pool.source_canvases
  assert grain.get_state() == {k: v for k, v in pool.get_state().items() if k != "version"}


@needs_grain
@pytest.mark.parametrize("resize, before, after", [("host", 2, 1), ("host", 0, 2),
                                                    ("device", 1, 0), ("device", 2, 2)])
def test_train_resumes_at_a_batch_with_another_worker_count(resize, before, after):
  source = Holes(12, "train")
  expected = _take(pipeline.train_loader(source, num_workers=0, prefetch=0,
                                         **_train_args(resize)), 9)
  first = grain_loader.grain_train_loader(source, num_workers=before, **_train_args(resize))
  try:
    _assert_same(expected[:4], _take(first, 4))
    state = json.loads(json.dumps(first.get_state()))   # what a checkpoint keeps
  finally:
    first.close()
  resumed = grain_loader.grain_train_loader(source, num_workers=after, **_train_args(resize))
  try:
    resumed.set_state(state)
    _assert_same(expected[4:9], _take(resumed, 5))
    # The pool's own state resumes it as well (same position and plan fingerprint).
    pool = pipeline.train_loader(source, num_workers=0, prefetch=0, **_train_args(resize))
    _take(pool, 2)
    resumed.set_state(pool.get_state())
    _assert_same(expected[2:4], _take(resumed, 2))
  finally:
    resumed.close()
  with pytest.raises(ValueError, match="seed: saved 5, now 6"):
    grain_loader.grain_train_loader(source, **{**_train_args(resize), "seed": 6}).set_state(
        state)


@needs_grain
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("resize", ["host", "device"])
def test_eval_batches_equal_the_pool_loader(resize, workers):
  source = Holes(7, "test")   # 4 landscape, 3 portrait (one unreadable): padded last batches
  args = dict(batch_size=2, resize_on_device=resize == "device", **SIZES)
  pool = eval_loader.eval_batches(source, num_workers=workers, **args)
  grain = grain_loader.grain_eval_batches(source, num_workers=workers, **args)
  assert len(grain) == len(pool) == 4 and grain.batch_canvases == pool.batch_canvases
  expected, got = list(pool), list(grain)
  _assert_same(expected, got)
  assert grain.counts == pool.counts and grain.counts["skipped_records"] == 1
  assert not got[-1]["valid"].all()


@needs_grain
def test_bad_options_raise():
  source = Holes(12, "train")
  with pytest.raises(ValueError, match="die_with_parent"):
    grain_loader.grain_train_loader(source, die_with_parent="sometimes", **_train_args("host"))
  with pytest.raises(ValueError, match="num_workers"):
    grain_loader.grain_train_loader(source, num_workers=-1, **_train_args("host"))


# --- Guarantees: measured and reported -----------------------------------------------------

def _psm(pattern: str = "psm_*") -> set[str]:
  """Python shared-memory blocks in /dev/shm (grain's are psm_*; so may another process's);
  `pattern="sem.mp-*"`: multiprocessing's named semaphores (its queues, locks, events)."""
  return {p.name for p in SHM.glob(pattern)} if SHM.is_dir() else set()


def _report(request, name: str, outcome: dict, holds: bool, variant: str) -> None:
  """Prints and records the outcome; the pool must hold it, grain is XFAIL when it does not."""
  outcome = {"guarantee": name, "variant": variant, "holds": holds, **outcome}
  line = json.dumps(outcome, sort_keys=True)
  print("GRAIN_GUARANTEE", line)
  request.node.user_properties.append(("outcome", line))
  if variant == "pool":
    assert holds, line
  elif not holds:
    pytest.xfail(f"{variant} misses it: {line}")


@needs_grain
def test_no_shared_memory_left_after_close(request):
  before = _psm()
  loader = grain_loader.grain_train_loader(Holes(12, "train"), num_workers=2,
                                           **_train_args("host"))
  batches = _take(loader, 5)
  during = _psm() - before
  del batches
  loader.close()
  gc.collect()
  deadline = time.monotonic() + 3
  while _psm() - before and time.monotonic() < deadline:
    time.sleep(0.1)
  left = sorted(_psm() - before)
  _report(request, "no /dev/shm left after close()",
          {"shm_blocks_while_running": len(during), "left_after_close": left},
          not left, "grain-watch")


_PARENT = """
import sys, time
from frcnn_jax.data import pipeline
from frcnn_jax.data.sources import shapes
def main():
  variant, action = sys.argv[1:3]
  source = shapes.ShapesSource(16, image_size=32, noise_std=0.0)
  kw = dict(batch_size=2, seed=0, min_size=32, max_size=32, pad_hw=(32, 32), max_gt=4)
  if variant == "pool":
    loader = pipeline.train_loader(source, num_workers=2, prefetch=1, **kw)
  else:
    from frcnn_jax.benchmarking import grain_loader
    plain = variant == "grain-plain"
    loader = grain_loader.grain_train_loader(
        source, num_workers=2, die_with_parent="none" if plain else "watch",
        ignore_sigint=not plain, **kw)
  try:  # the test may interrupt as soon as it reads READY
    for _ in range(4):
      next(loader)
    print("READY", flush=True)
    if action in ("wait", "interrupt"):
      time.sleep(600)
  except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
  loader.close()
  print("CLOSED", flush=True)
if __name__ == "__main__":
  main()
"""


def _state(pid: int) -> str | None:
  """The process's state letter, None when it is gone."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return None


def _alive(pid: int) -> bool:
  return _state(pid) not in (None, "Z", "X")


def _children(parent: int) -> dict[int, str]:
  """{pid: "worker" | "resource_tracker" | "other"} of the live children of `parent`."""
  out = {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
      if int(fields[1]) != parent or fields[0] in ("Z", "X"):
        continue
      command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, IndexError, ValueError):
      continue
    kind = ("resource_tracker" if "resource_tracker" in command else
            "worker" if "spawn_main" in command else "other")
    out[int(stat.parent.name)] = kind
  return out


def _start(script: pathlib.Path, variant: str, action: str, **popen) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, str(script), variant, action], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _ready(process: subprocess.Popen) -> dict[int, str]:
  """Waits for READY and both workers; returns the children."""
  line = process.stdout.readline()
  if not line.startswith("READY"):
    process.kill()
    raise AssertionError(process.stderr.read()[-3000:])
  deadline = time.monotonic() + 60
  while True:
    children = _children(process.pid)
    if list(children.values()).count("worker") >= 2 or time.monotonic() > deadline:
      return children
    time.sleep(0.1)


def _end(pids) -> None:
  """Ends processes this test started (orphaned workers, their resource tracker)."""
  for pid in pids:
    if _alive(pid):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def kill_trials(script: pathlib.Path, variant: str, trials: int) -> dict:
  """SIGKILLs the parent `trials` times; counts the trials that left a worker alive 2 s later
  and what stayed in /dev/shm."""
  orphaned, trackers_alive, shm_left, all_left, blocks = 0, 0, 0, [], []
  for _ in range(trials):
    before = _psm()
    process = _start(script, variant, "wait")
    children = _ready(process)
    workers = [p for p, kind in children.items() if kind == "worker"]
    during = _psm() - before
    blocks.append(len(during))
    process.kill()
    process.wait()
    time.sleep(2.0)
    orphaned += any(_alive(p) for p in workers)
    trackers_alive += any(_alive(p) for p, kind in children.items()
                          if kind == "resource_tracker")
    _end(workers)   # a surviving worker would run forever
    time.sleep(1.0)
    left = sorted(_psm() - before)
    shm_left += bool(left)
    all_left += left
    process.stdout.close()
    process.stderr.close()
  return {"trials": trials, "trials_with_a_worker_alive_2s_after": orphaned,
          "trials_with_the_resource_tracker_alive_2s_after": trackers_alive,
          "trials_leaving_shm_after_the_workers_ended": shm_left,
          "shm_blocks_while_waiting": blocks, "shm_left": all_left[:10]}


@needs_grain
@pytest.mark.slow
@pytest.mark.parametrize("variant", ("pool",) + GRAIN_VARIANTS)
def test_workers_die_with_a_sigkilled_parent(tmp_path, request, variant):
  script = tmp_path / "parent.py"
  script.write_text(_PARENT)
  outcome = kill_trials(script, variant, KILL_TRIALS)
  _report(request, "no worker alive 2 s after SIGKILL of the parent", outcome,
          outcome["trials_with_a_worker_alive_2s_after"] == 0
          and outcome["trials_leaving_shm_after_the_workers_ended"] == 0, variant)


@needs_grain
@pytest.mark.slow
@pytest.mark.parametrize("variant", ("pool", "grain-watch"))
def test_sigkill_of_the_whole_group_leaves_no_shared_memory(tmp_path, request, variant):
  """The parent, its workers and the resource tracker SIGKILLed at once (`kill -9 -PGID`, a
  cgroup's OOM kill): nothing is left to unlink grain's data blocks in flight (the guarantee),
  nor multiprocessing's named semaphores of either loader's queues (reported)."""
  script = tmp_path / "parent.py"
  script.write_text(_PARENT)
  trials, leaving, names, semaphores = max(KILL_TRIALS // 2, 1), 0, [], 0
  for _ in range(trials):
    before, sem_before = _psm(), _psm("sem.mp-*")
    process = _start(script, variant, "wait", start_new_session=True)
    children = _ready(process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(2.0)
    _end(children)
    # Everything new since the start that outlives the kill (the workers kept filling their
    # buffers after any earlier look).
    left = sorted(_psm() - before)
    sem_left = sorted(_psm("sem.mp-*") - sem_before)
    leaving += bool(left)
    names += left
    semaphores += len(sem_left)
    for name in left + sem_left:   # this test's processes made them: not left by the test
      (SHM / name).unlink(missing_ok=True)
    process.stdout.close()
    process.stderr.close()
  outcome = {"trials": trials, "trials_leaving_shm": leaving, "shm_blocks_left": len(names),
             "shm_left": names[:5], "named_semaphores_left": semaphores}
  _report(request, "no /dev/shm data left after SIGKILL of the whole process group", outcome,
          not leaving, variant)


@needs_grain
@pytest.mark.slow
@pytest.mark.parametrize("variant", ("pool",) + GRAIN_VARIANTS)
def test_ctrl_c_to_the_group_is_quiet(tmp_path, request, variant):
  script = tmp_path / "parent.py"
  script.write_text(_PARENT)
  before = _psm()
  process = _start(script, variant, "interrupt", start_new_session=True)
  children = _ready(process)
  workers = [p for p, kind in children.items() if kind == "worker"]
  os.killpg(process.pid, signal.SIGINT)
  try:
    out, err = process.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
  time.sleep(2.0)
  alive = [p for p in workers if _alive(p)]
  _end(workers)
  noise = [w for w in ("Traceback", "KeyboardInterrupt", "leaked") if w in err]
  outcome = {"parent_returncode": process.returncode,
             "parent_closed_the_loader": "INTERRUPTED" in out and "CLOSED" in out,
             "workers_alive_2s_after": len(alive), "noise_on_stderr": noise,
             "shm_left": sorted(_psm() - before)[:10], "stderr_tail": err[-600:] if noise else ""}
  holds = (outcome["parent_closed_the_loader"] and not alive and not noise
           and process.returncode == 0)
  _report(request, "Ctrl-C to the process group: workers quiet, parent closes", outcome,
          holds, variant)


@needs_grain
@pytest.mark.slow
@pytest.mark.parametrize("variant", ("pool",) + GRAIN_VARIANTS)
def test_close_and_exit_leave_nothing(tmp_path, request, variant):
  script = tmp_path / "parent.py"
  script.write_text(_PARENT)
  before = _psm()
  process = _start(script, variant, "close")
  out, err = process.communicate(timeout=300)
  time.sleep(1.0)
  left = sorted(_psm() - before)
  noise = [w for w in ("Traceback", "leaked") if w in err]
  outcome = {"returncode": process.returncode, "noise_on_stderr": noise, "shm_left": left[:10],
             "stderr_tail": err[-600:] if noise else ""}
  _report(request, "close() and exit: no /dev/shm left, no warnings", outcome,
          process.returncode == 0 and "CLOSED" in out and not noise and not left, variant)
