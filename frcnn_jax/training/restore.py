"""Reads the parameters alone out of a training checkpoint, for the read-only commands."""

import contextlib
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from frcnn_jax.runtime import parallel
from frcnn_jax.training import checkpointing


def restore_params(workdir: str | os.PathLike, mesh: jax.sharding.Mesh,
                   step: int | None = None) -> tuple[Any, int]:
  """Restores only the parameters of a training checkpoint, replicated on `mesh`.

  Reads `WORKDIR/checkpoints/<step>/state` (the train state's "params" entry; the optimizer
  state is not read), whatever the device count it was saved from.

  Args:
    workdir: the training run's directory.
    mesh: where to place the parameters (replicated).
    step: the checkpoint step; None for the newest.

  Returns:
    (params, step).

  Raises:
    FileNotFoundError: no checkpoint (or not that step) under `workdir`.
    ValueError: the checkpoint's state has no "params" entry, or its files are damaged: they
      cannot be read, or the parameters differ from the CRC-32s saved with them (nothing is
      moved; another `step` may be intact).
  """
  directory = checkpointing.absolute(workdir) / "checkpoints"
  if not directory.exists():
    raise FileNotFoundError(f"no checkpoints in {directory}: train first "
                            "(python -m frcnn_jax.train --config ... --workdir ...)")
  manager = ocp.CheckpointManager(
      directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                "meta": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; available: {steps}")
  where = directory / str(step)
  others = f"nothing was moved; the other checkpoints: {[s for s in steps if s != step]}"

  def unreadable(error: Exception) -> ValueError:
    return ValueError(f"checkpoint {where} cannot be read ({checkpointing.reason(error)}); "
                      f"{others}.")

  with contextlib.closing(manager):
    try:
      tree = manager.item_metadata(step)["state"].tree
    except Exception as e:  # pylint: disable=broad-except  # the step is listed: damaged files
      raise unreadable(e) from e
    if "params" not in tree:
      raise ValueError(f"checkpoint {where} has no 'params' entry (found {sorted(tree)})")
    sharding = parallel.replicated(mesh)
    abstract = {"params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree["params"])}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True),
          meta=ocp.args.JsonRestore()))
      params = jax.block_until_ready(restored["state"]["params"])
    except Exception as e:  # pylint: disable=broad-except
      raise unreadable(e) from e
  damaged = checkpointing.damage(params, restored["meta"].get("checksums", {}), ".params")
  if damaged:
    raise ValueError(f"checkpoint {where} is damaged: {damaged}; {others}.")
  return params, int(step)
