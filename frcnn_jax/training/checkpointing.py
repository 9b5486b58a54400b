"""Checkpoints: an orbax CheckpointManager over `WORKDIR/checkpoints`.

Each checkpoint is a step directory holding three items:

* `state`: the train state pytree (parameters, optimizer state, step, RNG key, counters);
* `data`: the input iterator's state, one JSON file per process (each process reads its own
  shard of the data, so each has its own iterator position);
* `meta`: a small JSON dict: step, wall time, the state's layout (path -> dtype and shape),
  a CRC-32 of every array, the run's data topology and config (see `Checkpointer`), and
  anything the caller adds.

Saves are asynchronous (the device-to-host copy happens before `save` returns, the writing in
the background) and atomic (orbax writes to a temporary directory and renames it when complete,
so a process killed mid-save leaves no half-written step).

`restore_latest` walks the steps from the newest down and tells two failures apart:

* the checkpoint is damaged (a file unreadable, truncated or missing, or an array whose
  content no longer matches the CRC-32 written at save): the step is moved to
  `WORKDIR/checkpoints.corrupt/` with a warning and the previous one is tried;
* the checkpoint is intact but does not fit this run (other state shapes, another process
  count or other `topology` values, or an iterator whose `set_state` refuses the saved
  position): `CheckpointMismatchError` naming the differences and the config keys that
  changed, before anything is moved. With `restart_data_iterator=True` only the shapes must
  fit: parameters and optimizer state are restored, the data iterator starts afresh.

In a multi-process run every process restores, then all agree (the worst verdict wins), so they
take the same decision and none waits for another that has given up.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
import zlib
from typing import Any
from typing import Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any

# Verdicts on one checkpoint step, ordered by severity (processes agree on the maximum).
_GOOD, _CORRUPT, _MISMATCH = 0, 1, 2
_MAX_LISTED = 4  # differences named in an error message


class CheckpointMismatchError(ValueError):
  """An intact checkpoint does not fit this run; the message names the differences."""


class StatefulIterator(Protocol):
  """An iterator whose position can be saved (the training loader's `TrainIterator`)."""

  def get_state(self) -> dict[str, Any] | bytes: ...

  def set_state(self, state: dict[str, Any] | bytes) -> None: ...


def _state_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class IteratorHandler(ocp.CheckpointHandler):
  """Saves an iterator's state as JSON, one file per process; restores the saved state.

  Restoring returns the saved state (None when only other process counts' files exist) and
  leaves setting it to the caller, so that an iterator refusing it is not mistaken for a
  damaged file.
  """

  def save(self, directory: epath.Path, args: "IteratorSave") -> None:
    state = args.item.get_state()
    if isinstance(state, bytes):
      record = {"bytes": state.decode()}
    else:
      record = {"json": state}
    _state_file(directory).write_text(json.dumps(record))

  def restore(self, directory: epath.Path,
              args: "IteratorRestore | None" = None) -> dict[str, Any] | bytes | None:
    del args
    path = _state_file(directory)
    if not path.exists():
      if any(directory.glob("process_*-of-*.json")):
        return None
      raise FileNotFoundError(f"no data iterator state at {path}.")
    record = json.loads(path.read_text())
    return record["bytes"].encode() if "bytes" in record else record["json"]

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
  """Restores the saved iterator state (returned, not set)."""


def absolute(path: str | os.PathLike[str]) -> epath.Path:
  """`path` made absolute against the working directory (gs:// and other URLs are kept).

  Orbax's asynchronous save refuses relative paths, and `--workdir runs/x` is one.
  """
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def _leaves(tree: PyTree) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layout(tree: PyTree) -> dict[str, str]:
  """`{leaf path: "dtype[shape]"}` of a pytree of arrays or `jax.ShapeDtypeStruct`s."""
  return {path: f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}" for path, leaf in _leaves(tree)}


def _host_copy(leaf: Any) -> np.ndarray | None:
  """This process's full copy of `leaf` as numpy (None for a sharded array)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not (leaf.is_fully_replicated or leaf.is_fully_addressable):
      return None
    leaf = leaf.addressable_data(0)
  return np.asarray(leaf)


def checksums(tree: PyTree) -> dict[str, str]:
  """`{leaf path: CRC-32 of its bytes}` for every array this process holds whole."""
  sums = {}
  for path, leaf in _leaves(tree):
    array = _host_copy(leaf)
    if array is not None:
      sums[path] = f"{zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)):08x}"
  return sums


def damage(tree: PyTree, saved: dict[str, str], prefix: str = "") -> str:
  """Which leaves of `tree` differ from the checksums saved with them; "" when none do.

  Args:
    tree: restored arrays.
    saved: `checksums` of the saved tree, as written in the checkpoint's meta.
    prefix: the path of `tree` within the saved tree (".params" for a `TrainState`'s
      parameters restored alone).

  Returns:
    "" when every checked leaf is intact, else a sentence naming the damaged ones. Leaves
    without a saved checksum (checkpoints written before checksums existed) are not checked.
  """
  changed = [prefix + path for path, crc in checksums(tree).items()
             if saved.get(prefix + path, crc) != crc]
  return f"contents differ from their checksum at save: {_listed(changed)}" if changed else ""


_ABSENT = object()


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
  """Keys whose values differ between two JSON-like config dicts, as "a.b: old -> new".

  Keys with a value on both sides come first, then keys only one side has ("absent").
  """
  both, one_side = [], []
  _collect(saved, current, prefix, both, one_side)
  return both + one_side


def _collect(saved: Any, current: Any, prefix: str, both: list[str], one_side: list[str]) -> None:
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in sorted(set(saved) | set(current)):
      _collect(saved.get(key, _ABSENT), current.get(key, _ABSENT), f"{prefix}{key}.", both,
               one_side)
  elif saved != current:
    show = lambda v: "absent" if v is _ABSENT else _shortened(json.dumps(v))
    into = one_side if _ABSENT in (saved, current) else both
    into.append(f"{prefix.rstrip('.')}: {show(saved)} -> {show(current)}")


def _shortened(text: str, limit: int = 60) -> str:
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _listed(items: list[str]) -> str:
  more = len(items) - _MAX_LISTED
  return "; ".join(items[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def reason(error: BaseException) -> str:
  """`error` in one line: its type and the first line of its message (200 characters)."""
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _agree(verdict: int) -> int:
  """The worst verdict over all processes (every process must call this)."""
  if jax.process_count() == 1:
    return verdict
  return int(np.max(multihost_utils.process_allgather(np.int32(verdict))))


class Checkpointer:
  """Saves the train state (+ data iterator) every so often and restores the newest good one.

  Args:
    directory: where step directories go (`WORKDIR/checkpoints`); relative to the working
      directory if not absolute.
    keep: how many of the newest checkpoints to keep.
    async_save: write in a background thread.
    topology: what the data iterator's saved position depends on beyond what its `set_state`
      checks itself; saved with each checkpoint, with the process count added (each process
      saves its own position), and compared on restore.
    config: the run's config as a JSON dict; saved, and named key by key when a checkpoint does
      not fit.
  """

  def __init__(self, directory: str | os.PathLike[str], *, keep: int, async_save: bool = True,
               topology: dict[str, Any] | None = None, config: dict[str, Any] | None = None):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}.")
    self.directory = absolute(directory)
    # As saved and read back (tuples become lists), so that an unchanged topology compares equal.
    self.topology = json.loads(json.dumps({"process_count": jax.process_count(),
                                           **(topology or {})}))
    self.config = config
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

    The CRC-32 of every array is computed here, before returning (the caller may donate the
    state's buffers right after).

    Returns:
      False when `step` is already saved (nothing written), True otherwise.
    """
    if step in self._manager.all_steps():
      return False
    record = {"step": step, "time": time.time(), "layout": layout(state),
              "checksums": checksums(state), "topology": self.topology, **(meta or {})}
    if self.config is not None:
      record["config"] = self.config
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(record)}
    if data_iterator is not None:
      items["data"] = IteratorSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(
      self, abstract_state: PyTree, data_iterator: StatefulIterator | None = None, *,
      restart_data_iterator: bool = False) -> tuple[PyTree, dict[str, Any]] | None:
    """Restores the newest checkpoint that reads back intact.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) like the saved state.
      data_iterator: iterator whose position is set to the saved one (when given).
      restart_data_iterator: leave the iterator's position alone, allowing a checkpoint saved
        with another topology or refused by the iterator.

    Returns:
      (state, meta) of the newest good checkpoint, or None when there is none.

    Raises:
      CheckpointMismatchError: the newest intact checkpoint does not fit this run (nothing
        was moved).
    """
    for step in reversed(self.all_steps()):
      verdict, detail, restored = self._try_restore(step, abstract_state, data_iterator,
                                                    restart_data_iterator)
      agreed = _agree(verdict)
      if agreed == _MISMATCH:
        raise CheckpointMismatchError(
            detail if verdict == _MISMATCH else
            f"checkpoint step {step} in {self.directory} does not fit this run on another "
            "process (see process 0's message); nothing was moved.")
      if agreed == _CORRUPT:
        logging.warning("checkpoint step %d in %s cannot be restored (%s); moving it to %s "
                        "and trying the previous one.", step, self.directory,
                        detail or "damaged on another process", f"{self.directory}.corrupt")
        self._quarantine(step)
        continue
      return restored
    return None

  def _try_restore(self, step: int, abstract_state: PyTree,
                   data_iterator: StatefulIterator | None, restart: bool
                   ) -> tuple[int, str, tuple[PyTree, dict[str, Any]] | None]:
    """(verdict, why, (state, meta) when good) for one step; the iterator is set when good."""
    try:
      meta = dict(self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # pylint: disable=broad-except  # unreadable metadata: damaged
      return _CORRUPT, reason(e), None
    misfit = self._misfit(step, meta, abstract_state,
                          check_topology=data_iterator is not None and not restart)
    if misfit:
      return _MISMATCH, misfit, None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None and not restart:
      items["data"] = IteratorRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      state = restored["state"]
      jax.block_until_ready(state)
    except Exception as e:  # pylint: disable=broad-except  # the layout fits: damaged files
      return _CORRUPT, reason(e), None
    damaged = damage(state, meta.get("checksums", {}))
    if damaged:
      return _CORRUPT, damaged, None
    if "data" in items:
      saved = restored["data"]
      try:
        if saved is None:
          raise ValueError("the iterator state was saved by another number of processes")
        data_iterator.set_state(saved)
      except Exception as e:  # pylint: disable=broad-except  # the iterator refuses it
        return _MISMATCH, self._mismatch_message(
            step, [f"the data iterator refuses the saved position ({reason(e)})"],
            meta, topology_only=True), None
    return _GOOD, "", (state, meta)

  def _misfit(self, step: int, meta: dict[str, Any], abstract_state: PyTree, *,
              check_topology: bool) -> str:
    """Why checkpoint `step` (its `meta`) does not fit this run, or "" when it does."""
    problems = []
    saved_layout = meta.get("layout")
    if saved_layout is not None:
      want = layout(abstract_state)
      params_first = lambda path: (not path.startswith(".params"), path)
      for path in sorted(set(saved_layout) | set(want), key=params_first):
        if saved_layout.get(path) != want.get(path):
          problems.append(f"{path}: saved {saved_layout.get(path, 'absent')}, "
                          f"this run {want.get(path, 'absent')}")
    if problems:
      return self._mismatch_message(step, [f"the shapes of the state differ "
                                           f"({_listed(problems)})"], meta, topology_only=False)
    saved_topology = meta.get("topology")
    if saved_topology is not None and check_topology:
      changed = [f"{key}: saved {json.dumps(saved_topology[key])}, this run {json.dumps(value)}"
                 for key, value in sorted(self.topology.items())  # what this run depends on
                 if key in saved_topology and saved_topology[key] != value]
      if changed:
        return self._mismatch_message(step, [f"the data topology differs ({_listed(changed)})"],
                                      meta, topology_only=True)
    return ""

  def _mismatch_message(self, step: int, problems: list[str], meta: dict[str, Any], *,
                        topology_only: bool) -> str:
    lines = [f"checkpoint step {step} in {self.directory} does not fit this run: "
             + "; ".join(problems) + "."]
    if self.config is not None and "config" in meta:
      differences = config_differences(meta["config"], self.config)
      if differences:
        lines.append(f"Config keys that differ from the checkpoint's run: {_listed(differences)}.")
    if topology_only:
      lines.append("Nothing was moved. To keep the parameters and optimizer state and start "
                   "the data iterator afresh, run again with --restart_data_iterator.")
    else:
      lines.append("Nothing was moved. Undo the change, or train in a new --workdir.")
    return "\n".join(lines)

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
