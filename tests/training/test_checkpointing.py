"""Tests of frcnn_jax/training/checkpointing.py: round trip, retention, corrupt-checkpoint fallback."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.training import checkpointing


class _Counter:
  """A stateful iterator with a dict state (like the training loader's)."""

  def __init__(self):
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


class _BytesCounter(_Counter):
  """A stateful iterator with a bytes state."""

  def get_state(self):
    return str(self.position).encode()

  def set_state(self, state):
    self.position = int(state.decode())


def _state(value):
  return {"w": jnp.arange(64, dtype=jnp.float32) * value, "step": jnp.int32(value),
          "rng": jax.random.PRNGKey(value)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _save_steps(directory, steps, iterator, keep=3):
  checkpointer = checkpointing.Checkpointer(directory, keep=keep)
  for step in steps:
    iterator.position = 10 * step
    assert checkpointer.save(step, _state(step), iterator, meta={"note": "x"})
  checkpointer.close()


@pytest.mark.parametrize("iterator_cls", [_Counter, _BytesCounter])
def test_round_trip_restores_state_iterator_and_meta(tmp_path, iterator_cls):
  _save_steps(tmp_path / "ck", (1, 2), iterator_cls())
  iterator = iterator_cls()
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3)
  state, meta = checkpointer.restore_latest(_abstract(_state(0)), iterator)
  jax.tree.map(np.testing.assert_array_equal, state, _state(2))
  assert iterator.position == 20
  assert meta["step"] == 2 and meta["note"] == "x"
  assert not checkpointer.save(2, _state(2))  # an existing step is not rewritten
  checkpointer.close()


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _save_steps(os.path.join("runs", "x", "checkpoints"), (5,), _Counter())
  assert (tmp_path / "runs" / "x" / "checkpoints" / "5").is_dir()
  checkpointer = checkpointing.Checkpointer("runs/x/checkpoints", keep=3)
  assert checkpointer.directory.is_absolute()
  state, meta = checkpointer.restore_latest(_abstract(_state(0)), _Counter())
  jax.tree.map(np.testing.assert_array_equal, state, _state(5))
  assert meta["step"] == 5
  checkpointer.close()


def test_keeps_only_the_newest(tmp_path):
  _save_steps(tmp_path / "ck", (1, 2, 3, 4), _Counter(), keep=2)
  assert checkpointing.Checkpointer(tmp_path / "ck", keep=2).all_steps() == [3, 4]


def test_empty_directory_restores_nothing(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=1)
  assert checkpointer.restore_latest(_abstract(_state(0))) is None


def test_truncated_latest_falls_back_to_previous(tmp_path, caplog):
  _save_steps(tmp_path / "ck", (1, 2), _Counter())
  files = [os.path.join(root, f) for root, _, names in os.walk(tmp_path / "ck" / "2" / "state")
           for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  iterator = _Counter()
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3)
  state, meta = checkpointer.restore_latest(_abstract(_state(0)), iterator)
  assert meta["step"] == 1 and iterator.position == 10
  jax.tree.map(np.testing.assert_array_equal, state, _state(1))
  assert "step 2" in caplog.text and "cannot be restored" in caplog.text
  assert checkpointer.all_steps() == [1]
  assert os.listdir(tmp_path / "ck.corrupt")
  assert checkpointer.save(2, _state(5))  # the step can be written again
  checkpointer.close()


def test_missing_iterator_state_falls_back(tmp_path):
  _save_steps(tmp_path / "ck", (1, 2), _Counter())
  for name in os.listdir(tmp_path / "ck" / "2" / "data"):
    if name.endswith(".json"):
      os.remove(tmp_path / "ck" / "2" / "data" / name)
  state, _ = checkpointing.Checkpointer(tmp_path / "ck", keep=3).restore_latest(
      _abstract(_state(0)), _Counter())
  assert int(state["step"]) == 1


def test_rejects_bad_keep(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints"):
    checkpointing.Checkpointer(tmp_path, keep=0)


def _files(directory):
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, names in os.walk(directory) for f in names)


def _big_state(value):
  return {"w": jnp.arange(20000, dtype=jnp.float32) * value, "step": jnp.int32(value)}


def test_flipped_bytes_in_array_data_are_detected_and_fall_back(tmp_path, caplog):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3)
  for step in (1, 2):
    assert checkpointer.save(step, _big_state(step), _Counter())
  checkpointer.close()
  data_files = [os.path.join(tmp_path / "ck" / "2" / "state", f)
                for f in _files(tmp_path / "ck" / "2" / "state") if f"{os.sep}d{os.sep}" in f]
  largest = max(data_files, key=os.path.getsize)
  middle = os.path.getsize(largest) // 2
  with open(largest, "r+b") as f:
    f.seek(middle)
    flipped = bytes(b ^ 0xFF for b in f.read(16))
    f.seek(middle)
    f.write(flipped)
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3)
  state, meta = checkpointer.restore_latest(_abstract(_big_state(0)), _Counter())
  assert meta["step"] == 1
  jax.tree.map(np.testing.assert_array_equal, state, _big_state(1))
  assert "step 2" in caplog.text and "checksum" in caplog.text
  assert checkpointer.all_steps() == [1] and os.listdir(tmp_path / "ck.corrupt")
  checkpointer.close()


def test_other_shapes_stop_before_anything_is_moved_naming_the_keys(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3,
                                            config={"model": {"fc_dim": 64}, "seed": 0})
  for step in (1, 2):
    checkpointer.save(step, _state(step), _Counter())
  checkpointer.close()
  before = _files(tmp_path)
  smaller = {**_state(0), "w": jnp.zeros(32, jnp.float32)}
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3,
                                            config={"model": {"fc_dim": 32}, "seed": 0})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"(?s)step 2.*\['w'\]: saved float32\[64\], this run float32\[32\]"
                           r".*model\.fc_dim: 64 -> 32.*Nothing was moved"):
    checkpointer.restore_latest(_abstract(smaller), _Counter())
  checkpointer.close()
  assert _files(tmp_path) == before


def test_topology_change_needs_restart_data_iterator(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3,
                                            topology={"data.num_workers": 0})
  iterator = _Counter()
  iterator.position = 7
  checkpointer.save(3, _state(3), iterator)
  checkpointer.close()
  before = _files(tmp_path)
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3,
                                            topology={"data.num_workers": 2})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"(?s)data\.num_workers: saved 0, this run 2.*--restart_data_iterator"):
    checkpointer.restore_latest(_abstract(_state(0)), _Counter())
  assert _files(tmp_path) == before
  state, _ = checkpointer.restore_latest(_abstract(_state(0)))  # no iterator, no topology
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  iterator = _Counter()
  state, meta = checkpointer.restore_latest(_abstract(_state(0)), iterator,
                                            restart_data_iterator=True)
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  assert iterator.position == 0 and meta["topology"]["data.num_workers"] == 0
  checkpointer.close()


class _Refusing(_Counter):
  """An iterator that refuses a saved state (like a loader built with another plan)."""

  def set_state(self, state):
    raise ValueError("worker count changed")


def test_iterator_refusing_the_state_is_a_mismatch_not_corruption(tmp_path):
  _save_steps(tmp_path / "ck", (1, 2), _Counter())
  before = _files(tmp_path)
  checkpointer = checkpointing.Checkpointer(tmp_path / "ck", keep=3)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"(?s)refuses.*worker count changed.*--restart_data_iterator"):
    checkpointer.restore_latest(_abstract(_state(0)), _Refusing())
  assert _files(tmp_path) == before
  checkpointer.close()


def test_iterator_state_of_another_process_count_is_a_mismatch(tmp_path):
  _save_steps(tmp_path / "ck", (1,), _Counter())
  data = tmp_path / "ck" / "1" / "data"
  for name in os.listdir(data):
    if name.endswith(".json"):
      os.rename(data / name, data / "process_0-of-2.json")
  with pytest.raises(checkpointing.CheckpointMismatchError, match="another number of processes"):
    checkpointing.Checkpointer(tmp_path / "ck", keep=3).restore_latest(
        _abstract(_state(0)), _Counter())
  assert os.path.isdir(tmp_path / "ck" / "1")


def test_checksums_and_config_differences():
  a = {"x": np.arange(5, dtype=np.float32), "k": jax.random.key(1)}
  sums = checkpointing.checksums(a)
  assert set(sums) == {"['x']", "['k']"}
  b = dict(a, x=a["x"].copy())
  b["x"][3] = np.nextafter(b["x"][3], 9)  # one bit
  assert checkpointing.checksums(b)["['x']"] != sums["['x']"]
  assert checkpointing.config_differences(
      {"model": {"fc_dim": 4096, "width": 1.0}, "seed": 0},
      {"model": {"fc_dim": 128, "width": 1.0}, "seed": 0}) == ["model.fc_dim: 4096 -> 128"]
