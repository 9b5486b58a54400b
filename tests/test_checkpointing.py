"""Tests of frcnn_jax/checkpointing.py: round trip, retention, corrupt-checkpoint fallback."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import checkpointing


class _Counter:
  """A stateful iterator with a dict state (like grain's DatasetIterator)."""

  def __init__(self):
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


class _BytesCounter(_Counter):
  """A stateful iterator with a bytes state (like grain's DataLoaderIterator)."""

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
