"""Tests for frcnn_jax.data.pipeline: determinism, sharding, resume, eval padding, counters."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from frcnn_jax.data import batching
from frcnn_jax.data import eval_loader
from frcnn_jax.data import pipeline
from frcnn_jax.data import transforms
from frcnn_jax.data.sources import shapes
from frcnn_jax.data.sources import voc_folder

SIZES = dict(min_size=32, max_size=48, pad_hw=(40, 48), max_gt=6)
REPO = pathlib.Path(__file__).resolve().parents[2]


def _source(n=12, **kw):
  return shapes.ShapesSource(n, image_size=32, noise_std=0.0, **kw)


def _loader(source, **kw):
  args = dict(batch_size=4, seed=3, flip=True, num_workers=0, prefetch=1, **SIZES)
  args.update(kw)
  return pipeline.train_loader(source, **args)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class _Holes:
  """A source whose records in `bad` are unreadable (None, as under bad_input='skip')."""

  def __init__(self, source, bad):
    self._source, self._bad = source, set(bad)
    self.classes, self.name = source.classes, "holes"

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return None if index in self._bad else self._source[index]


def test_batches_have_the_contract_fields():
  batch = next(_loader(_source()))
  expected = {"image": ((4, 40, 48, 3), np.uint8), "image_hw": ((4, 2), np.int32),
              "scale": ((4,), np.float32), "gt_boxes": ((4, 6, 4), np.float32),
              "gt_labels": ((4, 6), np.int32), "gt_valid": ((4, 6), bool),
              "gt_difficult": ((4, 6), bool), "image_id": ((4,), np.int32),
              "orig_hw": ((4, 2), np.int32), "valid": ((4,), bool)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["valid"].all()


def test_loader_is_deterministic_for_a_seed_and_flips_vary():
  source = _source()
  first = _take(_loader(source), 3)
  _assert_same(first, _take(_loader(_source()), 3))
  other = _take(_loader(source, seed=4), 3)
  assert any(not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(first, other))
  # Each image equals the transform of its record with or without a flip, and both occur.
  flips = set()
  for batch in first:
    for b, image_id in enumerate(batch["image_id"]):
      plain, _ = transforms.prepare(source[int(image_id)], training=True, flip=False, **SIZES)
      mirrored, _ = transforms.prepare(source[int(image_id)], training=True, flip=True, **SIZES)
      matches = [f for f, ref in ((False, plain), (True, mirrored))
                 if np.array_equal(ref["image"], batch["image"][b])
                 and np.array_equal(ref["gt_boxes"], batch["gt_boxes"][b])]
      assert matches, image_id
      flips.add(matches[0])
  assert flips == {False, True}


def test_two_process_shards_are_disjoint_and_cover_the_dataset():
  source = _source(12)
  epoch = []
  for index in range(2):
    shard = batching.Shard(index, 2)
    batches = _take(_loader(source, shard_options=shard, flip=False), 3)  # 6 records each
    assert all(len(b["image_id"]) == 2 for b in batches)
    epoch.append(np.concatenate([b["image_id"] for b in batches]))
  assert len(set(epoch[0])) == 6 and not set(epoch[0]) & set(epoch[1])
  assert sorted(np.concatenate(epoch)) == list(range(12))


def test_epochs_repeat_with_a_new_order():
  ids = np.concatenate([b["image_id"] for b in _take(_loader(_source(8)), 4)])
  assert sorted(ids[:8]) == sorted(ids[8:]) == list(range(8))
  assert not np.array_equal(ids[:8], ids[8:])


def test_state_restores_identical_batches_in_a_new_loader():
  iterator = _loader(_source(), prefetch=2)
  _take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))   # what the checkpoint writes
  expected = _take(iterator, 3)
  resumed = _loader(_source(), prefetch=2)
  resumed.set_state(state)
  _assert_same(expected, _take(resumed, 3))
  with pytest.raises(ValueError, match="seed: saved 3, now 9"):
    _loader(_source(), seed=9).set_state(state)


def test_two_workers_cover_an_epoch_and_restore():
  source = _source(8)
  iterator = _loader(source, num_workers=2, flip=False, prefetch=0)
  first = _take(iterator, 2)
  assert sorted(np.concatenate([b["image_id"] for b in first])) == list(range(8))
  for b, image_id in enumerate(first[0]["image_id"]):
    ref, _ = transforms.prepare(source[int(image_id)], training=True, flip=False, **SIZES)
    np.testing.assert_array_equal(first[0]["image"][b], ref["image"])
  state = iterator.get_state()
  expected = _take(iterator, 2)
  iterator.set_state(state)
  _assert_same(expected, _take(iterator, 2))


@pytest.mark.parametrize("n, batch_size, shard_count", [(5, 4, 1), (11, 4, 2), (3, 4, 2)])
def test_eval_visits_each_example_once_with_padding(n, batch_size, shard_count):
  source = _source(n, split="test")
  seen, lengths = [], set()
  for index in range(shard_count):
    shard = batching.Shard(index, shard_count)
    batches = eval_loader.eval_batches(source, batch_size=batch_size, shard_options=shard, **SIZES)
    out = list(batches)
    assert len(out) == len(batches)
    lengths.add(len(out))
    for batch in out:
      assert len(batch["valid"]) == batch_size // shard_count
      assert (batch["image_id"][~batch["valid"]] == -1).all()
      assert not batch["gt_valid"][~batch["valid"]].any()
      seen.extend(batch["image_id"][batch["valid"]].tolist())
  assert sorted(seen) == list(range(n))
  assert len(lengths) == 1   # every process runs the same number of batches


def test_eval_examples_match_the_transform_in_order():
  source = _source(3, split="test")
  batch = next(eval_loader.eval_batches(source, batch_size=4, **SIZES))
  assert batch["image_id"].tolist() == [0, 1, 2, -1]
  for b in range(3):
    ref, _ = transforms.prepare(source[b], training=False, **SIZES)
    for k, v in ref.items():
      np.testing.assert_array_equal(batch[k][b], v, err_msg=k)


def test_unreadable_records_replaced_and_counted():
  bad = {1, 4, 7}
  source = _Holes(_source(10), bad=bad)
  iterator = _loader(source, batch_size=2, prefetch=0)
  batches = _take(iterator, 8)   # 5 batches per epoch
  ids = np.concatenate([b["image_id"] for b in batches])
  assert len(ids) == 16 and not bad & set(ids.tolist())
  # Reference: each slot reads its planned record, or the next readable one of its group in
  # the epoch's order; every unreadable record tried is counted.
  plan, want, skipped = iterator.plan, [], 0
  for n in range(8):
    e, t = divmod(n, plan.batches_per_epoch)
    perms, canvas, start = plan.epoch(e)
    perm = perms[int(canvas[t])]
    for slot in range(2):
      pos = int(start[t]) + slot
      while int(perm[pos % len(perm)]) in bad:
        skipped, pos = skipped + 1, pos + 1
      want.append(int(perm[pos % len(perm)]))
  assert ids.tolist() == want
  assert iterator.counts[batching.SKIPPED] == skipped >= 1
  batches = eval_loader.eval_batches(source, batch_size=4, **SIZES)
  valid_ids = [i for b in batches for i in b["image_id"][b["valid"]].tolist()]
  assert valid_ids == [0, 2, 3, 5, 6, 8, 9]
  assert batches.counts[batching.SKIPPED] == 3 and len(batches) == 3


def test_max_gt_overflow_counted():
  source = shapes.ShapesSource(6, image_size=32, max_objects=6, seed=1)
  expected = sum(max(len(source[i]["boxes"]) - 1, 0) for i in range(6))
  assert expected > 0
  iterator = _loader(source, batch_size=3, max_gt=1, flip=False, prefetch=0,
                     **{k: v for k, v in SIZES.items() if k != "max_gt"})
  _take(iterator, 2)
  assert iterator.counts["gt_overflow"] == expected
  batches = eval_loader.eval_batches(source, batch_size=3, **{**SIZES, "max_gt": 1})
  list(batches)
  assert batches.counts["gt_overflow"] == expected


def test_bad_arguments_raise():
  source = _source()
  shard = batching.Shard(0, 2)
  with pytest.raises(ValueError, match="process count"):
    _loader(source, batch_size=3, shard_options=shard)
  with pytest.raises(ValueError, match="process count"):
    eval_loader.eval_batches(source, batch_size=3, shard_options=shard, **SIZES)
  with pytest.raises(ValueError, match="pad_hw"):
    _loader(source, **{**SIZES, "pad_hw": (0, 10)})
  with pytest.raises(ValueError, match="seed"):
    _loader(source, seed=-1)


def test_tiny_voc_tree_through_the_pipeline(voc_root, voc_spec):
  records, _ = voc_spec["2007"]
  source = voc_folder.VOCFolderSource(voc_root, ("2007",), "trainval")
  sizes = dict(min_size=96, max_size=200, pad_hw=(100, 140), max_gt=4)
  batch = next(pipeline.train_loader(source, batch_size=4, seed=0, flip=False, num_workers=0,
                                     prefetch=0, **sizes))
  np.testing.assert_array_equal(batch["image_hw"], [[96, 128]] * 4)
  np.testing.assert_allclose(batch["scale"], 2.0)
  evaluated = {}
  for b in eval_loader.eval_batches(source, batch_size=3, **sizes):
    for i in np.flatnonzero(b["valid"]):
      keep = b["gt_valid"][i]
      evaluated[source[int(b["image_id"][i])]["name"]] = (
          b["gt_boxes"][i][keep] / b["scale"][i], b["gt_difficult"][i][keep])
  for i in np.flatnonzero(batch["valid"]):
    name = source[int(batch["image_id"][i])]["name"]
    objects = [o for o in records[name] if not o[5]]   # training drops difficult ones
    assert batch["gt_valid"][i].sum() == len(objects)
  assert sorted(evaluated) == ["000001", "000002", "000003", "000004"]
  for name, (boxes, difficult) in evaluated.items():
    objects = records[name]
    expected = np.array([[o[1] - 1, o[2] - 1, o[3], o[4]] for o in objects],
                        np.float32).reshape(-1, 4)
    np.testing.assert_allclose(boxes, expected, atol=1e-4)
    assert difficult.tolist() == [bool(o[5]) for o in objects]


_SHARDED_SCRIPT = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from frcnn_jax.runtime import parallel
from frcnn_jax.data import pipeline
from frcnn_jax.data.sources import shapes
from frcnn_jax.ops import images as image_ops
assert jax.device_count() == 8, jax.devices()
mesh = parallel.make_mesh()
source = shapes.ShapesSource(16, image_size=32, noise_std=0.0)
kw = dict(batch_size=8, seed=5, min_size=32, max_size=48, pad_hw=(40, 48), max_gt=6,
          flip=True, num_workers=0, prefetch=2)
for on_device in (False, True):
  sharded = pipeline.train_loader(source, mesh=mesh, resize_on_device=on_device, **kw)
  local = pipeline.train_loader(source, mesh=None, resize_on_device=on_device, **kw)
  for _ in range(2):
    batch, ref = next(sharded), next(local)
    assert ("canvas" in batch) == on_device
    for k, v in batch.items():
      assert isinstance(v, jax.Array) and v.shape == ref[k].shape, k
      assert v.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data")), v.ndim), k
      assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 1, k
      np.testing.assert_array_equal(np.asarray(v), ref[k], err_msg=k)
    images = jax.jit(image_ops.batch_images)(batch)   # made on the devices, sharded
    assert len(images.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(images), image_ops.batch_images(ref))
try:
  pipeline.train_loader(source, mesh=mesh, **{**kw, "batch_size": 4})
except ValueError as e:
  assert "device count" in str(e), e
else:
  raise AssertionError("batch 4 on 8 devices accepted")
print("SHARDED_OK")
"""


def test_batches_sharded_over_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert "SHARDED_OK" in result.stdout, result.stderr[-3000:]


# --- Canvases: several static canvases, one per global batch -----------------------------

MIXED = dict(min_size=48, max_size=64, max_gt=6)
TWO_CANVASES = ((48, 64), (64, 48))


def _mixed(n=14, split="train"):
  from tests import mixed_shapes  # pylint: disable=import-outside-toplevel
  return mixed_shapes.MixedShapes(n, split)


def test_plan_is_identical_on_every_process_and_shares_are_disjoint():
  source = _mixed(14)   # 7 landscape (even ids), 7 portrait (odd ids)
  loaders = [pipeline.train_loader(source, batch_size=4, seed=1, canvases=TWO_CANVASES,
                                   flip=False, prefetch=0,
                                   shard_options=batching.Shard(p, 2), **MIXED)
             for p in range(2)]
  plans = [loader.plan for loader in loaders]
  assert plans[0].fingerprint() == plans[1].fingerprint()
  assert plans[0].group_sizes == [7, 7] and plans[0].batches_per_epoch == 2
  assert plans[0].dropped_per_epoch == 6   # 7 = 4 + 3 per canvas: 3 left out of each
  for e in range(3):
    for a, b in zip(plans[0].epoch(e), plans[1].epoch(e)):
      for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
  epochs = []
  for n in range(6):
    batches = [next(loader) for loader in loaders]
    canvas = TWO_CANVASES[plans[0].batch(n)[0]]
    ids = [b["image_id"].tolist() for b in batches]
    assert not set(ids[0]) & set(ids[1])
    assert ids[0] + ids[1] == plans[0].batch(n)[1].tolist()
    for b in batches:
      assert b["image"].shape == (2, *canvas, 3)       # one canvas per global batch
      assert (b["image_hw"] == canvas).all()           # each image fills its own canvas
      assert set(np.asarray(b["image_id"]) % 2) == {TWO_CANVASES.index(canvas)}
    epochs.append(ids[0] + ids[1])
  for e in range(3):   # each epoch: one batch per canvas, records not repeated
    seen = epochs[2 * e] + epochs[2 * e + 1]
    assert len(set(seen)) == 8
  assert epochs[:2] != epochs[2:4]


def test_canvases_chosen_for_the_data_in_batches():
  from frcnn_jax.data import canvases as cv  # pylint: disable=import-outside-toplevel
  source = _mixed(8)
  chosen = cv.canvases_for_source(source, num_canvases=4, multiple=16, **{
      k: MIXED[k] for k in ("min_size", "max_size")})
  assert chosen == ((48, 64), (64, 48))


@pytest.mark.parametrize("n, batch_size, shard_count", [(9, 4, 2), (5, 2, 1), (3, 4, 2)])
def test_eval_each_record_once_grouped_by_canvas(n, batch_size, shard_count):
  source = _mixed(n, "test")
  seen, canvas_lists = [], []
  for index in range(shard_count):
    batches = eval_loader.eval_batches(
        source, batch_size=batch_size, canvases=TWO_CANVASES, num_workers=0,
        shard_options=batching.Shard(index, shard_count), **MIXED)
    shapes_seen = []
    for batch in batches:
      shapes_seen.append(batch["image"].shape[1:3])
      ids = batch["image_id"][batch["valid"]]
      assert (ids % 2 == TWO_CANVASES.index(batch["image"].shape[1:3])).all()
      seen.extend(ids.tolist())
    canvas_lists.append(shapes_seen)
  assert sorted(seen) == list(range(n))
  assert all(c == canvas_lists[0] for c in canvas_lists)   # same programs on every process
  assert len(canvas_lists[0]) == sum(-(-len(range(k, n, 2)) // batch_size) for k in (0, 1))


_WORKERS_SCRIPT = """
import os, sys, time
from multiprocessing import shared_memory
from frcnn_jax.data import pipeline
from frcnn_jax.data.sources import shapes
def no_shared_memory(*args, **kwargs):
  raise AssertionError("the input pipeline must not use shared memory")
shared_memory.SharedMemory.__init__ = no_shared_memory
def main():
  source = shapes.ShapesSource(16, image_size=32, noise_std=0.0)
  loader = pipeline.train_loader(source, batch_size=2, seed=0, min_size=32, max_size=32,
                                 pad_hw=(32, 32), max_gt=4, num_workers=2, prefetch=1)
  next(loader)
  try:  # the test may interrupt as soon as it reads the PIDS line
    print("PIDS", *loader.worker_pids, flush=True)
    if sys.argv[1] in ("wait", "interrupt"):
      time.sleep(600)
  except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
  loader.close()
  print("CLOSED", flush=True)
if __name__ == "__main__":
  main()
"""


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"
  except FileNotFoundError:
    return False


def test_workers_die_with_a_killed_parent_and_use_no_shared_memory(tmp_path):
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  script = tmp_path / "workers.py"
  script.write_text(_WORKERS_SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  process = subprocess.Popen([sys.executable, str(script), "wait"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = process.stdout.readline()
  assert line.startswith("PIDS"), process.stderr.read()[-3000:]
  pids = [int(p) for p in line.split()[1:]]
  assert len(pids) == 2 and all(_alive(p) for p in pids)
  process.send_signal(signal.SIGKILL)
  process.wait()
  deadline = time.monotonic() + 10
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(_alive(p) for p in pids), "worker processes outlived their parent"
  done = subprocess.run([sys.executable, str(script), "close"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and "CLOSED" in done.stdout, done.stderr[-3000:]
  assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr
  # Ctrl-C reaches the whole process group: the workers stay quiet, the parent shuts them down.
  process = subprocess.Popen([sys.executable, str(script), "interrupt"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
  line = process.stdout.readline()
  assert line.startswith("PIDS"), process.stderr.read()[-3000:]
  os.killpg(process.pid, signal.SIGINT)
  out, err = process.communicate(timeout=60)
  assert "INTERRUPTED" in out and "CLOSED" in out, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err and "leaked" not in err, err
