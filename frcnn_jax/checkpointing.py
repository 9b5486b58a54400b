"""Checkpoints: an orbax CheckpointManager over `WORKDIR/checkpoints`.

Each checkpoint is a step directory holding three items:

* `state`: the train state pytree (parameters, optimizer state, step, RNG key, counters);
* `data`: the input iterator's state, one JSON file per process (each process reads its own
  shard of the data, so each has its own iterator position);
* `meta`: a small JSON dict (step, wall time, anything the caller adds).

Saves are asynchronous (the device-to-host copy happens before `save` returns, the writing in
the background) and atomic (orbax writes to a temporary directory and renames it when complete,
so a process killed mid-save leaves no half-written step). `restore_latest` walks the steps
from the newest down: a step that fails to restore (truncated or corrupt files) is moved to
`WORKDIR/checkpoints.corrupt/` with a warning and the previous one is tried.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any


class StatefulIterator(Protocol):
  """An iterator whose position can be saved (grain's DataLoader / Dataset iterators)."""

  def get_state(self) -> dict[str, Any] | bytes: ...

  def set_state(self, state: dict[str, Any] | bytes) -> None: ...


def _state_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class IteratorHandler(ocp.CheckpointHandler):
  """Saves and restores an iterator's state as JSON, one file per process."""

  def save(self, directory: epath.Path, args: "IteratorSave") -> None:
    state = args.item.get_state()
    if isinstance(state, bytes):
      record = {"bytes": state.decode()}
    else:
      record = {"json": state}
    _state_file(directory).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: "IteratorRestore") -> StatefulIterator:
    path = _state_file(directory)
    if not path.exists():
      raise FileNotFoundError(f"no data iterator state at {path}.")
    record = json.loads(path.read_text())
    state = record["bytes"].encode() if "bytes" in record else record["json"]
    args.item.set_state(state)
    return args.item

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: StatefulIterator


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: StatefulIterator


def absolute(path: str | os.PathLike[str]) -> epath.Path:
  """`path` made absolute against the working directory (gs:// and other URLs are kept).

  Orbax's asynchronous save refuses relative paths, and `--workdir runs/x` is one.
  """
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


class Checkpointer:
  """Saves the train state (+ data iterator) every so often and restores the newest good one.

  Args:
    directory: where step directories go (`WORKDIR/checkpoints`); relative to the working
      directory if not absolute.
    keep: how many of the newest checkpoints to keep.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str | os.PathLike[str], *, keep: int, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}.")
    self.directory = absolute(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def all_steps(self) -> list[int]:
    """Returns the finished checkpoint steps, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, data_iterator: StatefulIterator | None = None,
           meta: dict[str, Any] | None = None) -> bool:
    """Starts saving `state` (and the iterator position) as checkpoint `step`.

    Returns:
      False when `step` is already saved (nothing written), True otherwise.
    """
    if step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave({"step": step, "time": time.time(), **(meta or {})})}
    if data_iterator is not None:
      items["data"] = IteratorSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(
      self, abstract_state: PyTree, data_iterator: StatefulIterator | None = None
  ) -> tuple[PyTree, dict[str, Any]] | None:
    """Restores the newest checkpoint that reads back intact.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) like the saved state.
      data_iterator: iterator whose position is set to the saved one (when given).

    Returns:
      (state, meta) of the newest good checkpoint, or None when there is none.
    """
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
      if data_iterator is not None:
        items["data"] = IteratorRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        jax.block_until_ready(state)
      except Exception as e:  # pylint: disable=broad-except  # any failure means unusable
        reason = (str(e).splitlines() or [""])[0][:200]
        logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); "
                        "moving it aside and trying the previous one.",
                        step, self.directory, type(e).__name__, reason)
        self._quarantine(step)
        continue
      return state, dict(restored["meta"])
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a broken step directory out of the manager's view."""
    if jax.process_index() == 0:
      target = epath.Path(f"{self.directory}.corrupt") / f"{step}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(os.fspath(self.directory / str(step)), os.fspath(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until background saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
