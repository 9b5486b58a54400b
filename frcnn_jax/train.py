r"""Trains Faster R-CNN: one explicit loop, data-parallel over every device of every process.

Usage:

  python -m frcnn_jax.train --config experiments/shapes.py --workdir runs/shapes \
      [--config.train.num_steps=2000 ...]

Multi-host (each process runs the same command; on Cloud TPU pods, SLURM and Open MPI the
cluster is detected automatically, elsewhere give it explicitly):

  python -m frcnn_jax.train ... --coordinator_address=host0:1234 --num_processes=2 \
      --process_id=0

What it does: builds the model, optimizer and input pipeline from the config; restores the
newest intact checkpoint in WORKDIR/checkpoints if there is one (otherwise starts fresh, from
`model.pretrained` weights if given); runs `train.num_steps` jitted steps over a `data` mesh
(parameters replicated, batch sharded, state donated); logs metrics to WORKDIR/metrics.jsonl,
TensorBoard (WORKDIR/tensorboard) and the console; checkpoints every `train.checkpoint_every`
steps, on SIGTERM (then exits cleanly) and at the end; evaluates every `train.eval_every` steps
and at the end into WORKDIR/eval/<split>-<step>.json.

Determinism: the step's PRNG key is `fold_in(seed key, step)` and the data order is a function
of the seed, so the same config, seed and device count give bitwise-identical parameters on
CPU, straight through or resumed from any checkpoint.
"""

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from jax.experimental import multihost_utils

from frcnn_jax.config import build as builders
from frcnn_jax.config import defaults
from frcnn_jax.config import flags as config_flags
from frcnn_jax.detection import detector
from frcnn_jax.evaluation import runner as eval_runner
from frcnn_jax.ops import images as image_ops
from frcnn_jax.runtime import atomic_io
from frcnn_jax.runtime import console as console_lines
from frcnn_jax.runtime import host_memory
from frcnn_jax.runtime import parallel
from frcnn_jax.runtime import workdir_lock
from frcnn_jax.training import checkpointing
from frcnn_jax.training import metrics_writer
from frcnn_jax.training import step as step_lib

Batch = dict[str, jax.Array]
PyTree = Any


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class _Preemption:
  """SIGTERM and SIGINT (Ctrl-C) become a stop request the run honours at a safe point.

  `main` creates it first thing, before JAX starts, so a signal during start-up is a clean
  exit too. Single process: the handler sets a flag that start-up (`now`) and the loop
  (`reached`) poll. Several processes: at start-up the processes agree on their flags (`now`
  is collective); in the loop JAX's preemption service, which takes SIGTERM over once the
  distributed runtime starts, stops every process at the same step, and SIGINT is passed on
  to it as a SIGTERM. A second Ctrl-C interrupts at once (KeyboardInterrupt).

  Attributes:
    signal_name: "SIGTERM" or "SIGINT" once one arrived ("" before).
    multi: the run spans several processes (set once the runtime is up).
  """

  def __init__(self):
    self.signal_name = ""
    self.multi = False
    self._previous = {sig: signal.signal(sig, self._handle)
                      for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal_name == "SIGINT":
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

  def now(self) -> bool:
    """Whether a stop was requested, agreed by all processes (call at the same points)."""
    requested = bool(self.signal_name)
    if self.multi:
      requested = bool(np.max(multihost_utils.process_allgather(np.int32(requested))))
    return requested

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (every process of a multi-process run calls it each step)."""
    if self.multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return bool(self.signal_name)

  def restore(self) -> None:
    """Puts the previous handlers back."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


@dataclasses.dataclass
class _Open:
  """What a run has open; `close` shuts it down in a safe order (pending saves first)."""
  log: metrics_writer.ConsoleLog | None = None
  checkpointer: checkpointing.Checkpointer | None = None
  data: Any = None
  writer: metrics_writer.MetricsWriter | None = None

  def close(self) -> None:
    """Closes each part, even when another fails: pending saves first, the log last."""
    parts = [self.log, self.data, self.writer, self.checkpointer]
    self.log = self.data = self.writer = self.checkpointer = None
    with contextlib.ExitStack() as stack:  # calls them last-registered first
      for part in parts:
        close = getattr(part, "close", None)  # the data loader's stops its workers
        if close is not None:
          stack.callback(close)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json atomically, warning about keys that differ from an earlier
  run's; an unreadable earlier file is a warning too."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f)
    except (OSError, ValueError) as e:
      logging.warning("%s is unreadable (%s); replacing it with this run's config.", path, e)
    else:
      changed = checkpointing.config_differences(defaults.used_record(previous),
                                                 defaults.used_record(current))
      if changed:
        logging.warning("config differs from the run already in %s: %s", workdir,
                        "; ".join(changed))
  atomic_io.write_text(path, json.dumps(current, indent=2) + "\n")


def _input_counts(data: Any) -> dict[str, float]:
  """The input pipeline's counters (records skipped, boxes dropped, ...), summed over processes."""
  counts = dict(getattr(data, "counts", None) or {})
  names = sorted(counts)
  values = np.asarray([counts[name] for name in names], np.int32)
  if names and jax.process_count() > 1:
    values = np.asarray(multihost_utils.process_allgather(values)).sum(0)
  return {name: float(value) for name, value in zip(names, values)}


def _final_eval_record(workdir: str, step: int) -> dict[str, Any] | None:
  """The evaluation record of `step` in WORKDIR/metrics.jsonl, or None (process 0 reads)."""
  record = None
  if jax.process_index() == 0:
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            candidate = json.loads(line)
          except json.JSONDecodeError:
            continue
          if candidate.get("step") == step and "eval/map" in candidate:
            record = candidate
  found = record is not None
  if jax.process_count() > 1:
    found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
  return (record or {}) if found else None


def _lock_workdir(workdir: str) -> workdir_lock.WorkdirLock | None:
  """Process 0 locks the workdir; every process raises if that failed."""
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  message = ""
  if lock is not None:
    try:
      lock.acquire()
    except workdir_lock.WorkdirLockedError as e:
      message = str(e)
  failed = bool(message)
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
  if failed:
    raise workdir_lock.WorkdirLockedError(
        message or f"{workdir} is in use by another training run (see process 0's message).")
  return lock


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, float]:
  keys = [k for k in window[0] if k != "finite"]
  return {k: float(np.mean([m[k] for m in window])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart_data_iterator: bool = False, evaluate_again: bool = False,
                       stop: _Preemption | None = None) -> dict[str, Any]:
  """Trains to `config.train.num_steps` (resuming from WORKDIR/checkpoints) and evaluates.

  Every process of a multi-process run calls this with the same arguments. Process 0 holds
  the workdir's lock (WORKDIR/train.lock) for the whole call. A finished run (its last
  checkpoint at `train.num_steps` and its final evaluation in metrics.jsonl) is reported
  complete and left as it is.

  Args:
    config: the run's config.
    workdir: the run directory.
    restart_data_iterator: resume parameters and optimizer state from a checkpoint whose data
      position does not fit (another process count, or a position the input pipeline refuses:
      another dataset, canvas set, batch size or seed) and start the data iterator afresh.
    evaluate_again: evaluate a finished run again (its earlier eval record is replaced).
    stop: the SIGTERM / SIGINT handler (`main` installs it first thing); None installs one
      for this call.

  Returns:
    {"step": final step, "train": last logged metrics, "eval": final evaluation ({} when
     stopped), "nonfinite_skips": int, "preempted": bool (stopped by a signal), "complete":
     bool (the run was already finished), "params": final parameters}.

  Raises:
    step_lib.NonFiniteLossError: a non-finite loss with `train.nonfinite == "error"`.
    ValueError / FileNotFoundError: bad config values or a missing dataset (from the builders).
    checkpointing.CheckpointMismatchError: the checkpoint does not fit this config (a
      ValueError; nothing was moved).
    workdir_lock.WorkdirLockedError: another run holds the workdir.
  """
  builders.check(config, workdir)
  own_stop = stop is None
  stop = stop or _Preemption()
  stop.multi = jax.process_count() > 1
  lock = _lock_workdir(workdir)
  opened = _Open()
  try:
    return _train(config, workdir, stop, opened, restart_data_iterator=restart_data_iterator,
                  evaluate_again=evaluate_again)
  except Exception as e:
    if opened.log is not None:
      opened.log.note(f"error: {type(e).__name__}: {e}")
    raise
  finally:
    try:
      opened.close()
    finally:
      if lock is not None:
        lock.release()
      if own_stop:
        stop.restore()


def _result(state: step_lib.TrainState, **fields: Any) -> dict[str, Any]:
  return {"train": {}, "eval": {}, "preempted": False, "complete": False, **fields,
          "step": int(state.step), "nonfinite_skips": int(state.nonfinite_skips),
          "params": state.params}


def _train(config: ml_collections.ConfigDict, workdir: str, stop: _Preemption, opened: _Open,
           *, restart_data_iterator: bool, evaluate_again: bool) -> dict[str, Any]:
  """`train_and_evaluate` inside the workdir lock; what it opens goes into `opened`."""
  primary = jax.process_index() == 0
  t = config.train
  console = opened.log = metrics_writer.ConsoleLog(
      os.path.join(workdir, "console.log") if primary else None)

  def stopped_at_start(state: step_lib.TrainState) -> dict[str, Any]:
    if primary:
      print(f"{stop.signal_name or 'stop request'} during start-up: stopped before training, "
            f"at step {int(state.step)}; nothing new to save.", file=console, flush=True)
    return _result(state, preempted=True)

  builders.compilation_cache_from_config(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(t.batch_size, mesh)
  train_source = builders.source_from_config(config, "train")
  builders.source_from_config(config, "eval")  # fail now, not after training, if it is missing
  model = builders.model_from_config(config, len(train_source.classes))
  settings = builders.detector_settings_from_config(config)
  state, tx, lr_fn = step_lib.create_train_state(config, model, mesh)
  if stop.now():
    return stopped_at_start(state)
  checkpointer = opened.checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
      config=defaults.used_record(json.loads(config.to_json_best_effort())))
  final_eval = None if evaluate_again else _final_eval_record(workdir, t.num_steps)
  if final_eval is not None and checkpointer.all_steps()[-1:] == [t.num_steps]:
    restored = checkpointer.restore_latest(_abstract(state))  # no iterator: any topology
    if restored is not None and int(restored[0].step) == t.num_steps:
      state = restored[0]
      if primary:
        value = final_eval.get("eval/map")
        print(f"the run in {workdir} is complete: step {t.num_steps} of {t.num_steps}, eval "
              f"mAP {'n/a' if value is None else f'{value:.4f}'}. Nothing to do "
              "(--evaluate_again evaluates it again).", file=console, flush=True)
      return _result(state, complete=True,
                     eval={"map": final_eval.get("eval/map"), "step": t.num_steps})
  data = builders.train_data_from_config(config, train_source, mesh)
  opened.data = data
  restored = checkpointer.restore_latest(_abstract(state), data,
                                         restart_data_iterator=restart_data_iterator)
  if restored is not None:
    state = restored[0]
    logging.info("resumed from checkpoint step %d in %s%s", int(state.step), workdir,
                 " (data iterator restarted)" if restart_data_iterator else "")
  start = int(state.step)
  if stop.now():
    return stopped_at_start(state)
  if primary:
    _write_config(config, workdir)
    metrics_writer.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start,
                                  drop_eval=evaluate_again)
  writer = opened.writer = metrics_writer.MetricsWriter(workdir, enabled=primary)
  progress = console_lines.ProgressLine(t.num_steps, start, enabled=primary, stream=console)
  run_step = step_lib.jit_train_step(model, settings, tx, lr_fn, mesh,
                              grad_accum_steps=t.grad_accum_steps)
  evaluate_now = lambda step: _evaluate(config, model, settings, mesh, state.params, workdir,
                                        step, writer, console)
  result: dict[str, Any] = {"train": {}, "eval": {}, "preempted": False}
  window: list[dict[str, Any]] = []   # fetched metrics since the last log line
  pending: tuple[int, dict[str, jax.Array]] | None = None   # dispatched, not yet checked
  timed_steps, window_start = 0, time.monotonic()
  compiled: set[tuple[int, int]] = set()   # canvases whose train step has run
  try:
    for step in range(start + 1, t.num_steps + 1):
      batch = next(data)
      canvas = image_ops.canvas_hw(batch)   # one compiled program per canvas
      state, metrics = run_step(state, batch)
      timed_steps += 1
      if pending is not None:  # check the previous step while this one runs
        window.append(jax.device_get(pending[1]))
        step_lib.check_finite(pending[0], window[-1], t.nonfinite)
      pending = (step, metrics)
      if canvas not in compiled:  # exclude compilation from the speed and the ETA
        compiled.add(canvas)
        jax.block_until_ready(metrics)
        progress.restart_clock(step)
        timed_steps, window_start = 0, time.monotonic()
      last = step == t.num_steps
      if step % t.log_every == 0 or last:
        window.append(jax.device_get(metrics))
        step_lib.check_finite(step, window[-1], t.nonfinite)
        pending = None
        elapsed = time.monotonic() - window_start
        scalars = _mean_metrics(window)
        if timed_steps:  # none when the window is only the compiling first step
          scalars["step_time"] = elapsed / timed_steps
          scalars["images_per_sec"] = t.batch_size * timed_steps / max(elapsed, 1e-9)
        scalars["nonfinite_skips"] = float(state.nonfinite_skips)
        counts = _input_counts(data)
        scalars.update(counts)
        writer.write(step, scalars)
        progress.update(step, {**{k: scalars[k] for k in ("total", *detector.LOSS_TERMS,
                                                           "learning_rate", "images_per_sec")
                                  if k in scalars},
                               **{k: v for k, v in counts.items() if v}})
        result["train"] = scalars
        window, timed_steps, window_start = [], 0, time.monotonic()
      if step % t.checkpoint_every == 0 or last:
        checkpointer.save(step, state, data)
      if stop.reached(step):
        if pending is not None:
          step_lib.check_finite(pending[0], jax.device_get(pending[1]), t.nonfinite)
        checkpointer.save(step, state, data)
        if primary:
          # No signal_name: the signal went to another process, or to JAX's preemption service.
          cause = stop.signal_name or "SIGTERM or Ctrl-C to a process of the run"
          print(f"{cause}: preempted at step {step}; checkpoint saved in "
                f"{checkpointer.directory}, run the same command to resume.", file=console,
                flush=True)
        result["preempted"] = True
        break
      if t.eval_every and step % t.eval_every == 0 and not last:
        evaluate_now(step)
    if not result["preempted"]:
      if pending is not None:
        step_lib.check_finite(pending[0], jax.device_get(pending[1]), t.nonfinite)
      checkpointer.save(int(state.step), state, data)
      result["eval"] = evaluate_now(int(state.step))
  finally:
    opened.close()  # waits for the last save
  return _result(state, **result)


def _evaluate(config: ml_collections.ConfigDict, model: Any,
              settings: detector.DetectorSettings, mesh: jax.sharding.Mesh, params: PyTree,
              workdir: str, step: int, writer: metrics_writer.MetricsWriter,
              console: metrics_writer.ConsoleLog) -> dict[str, Any]:
  """Evaluates on the eval split: WORKDIR/eval/<split>-<step>.json, mAP to the metrics."""
  start = time.monotonic()
  result = eval_runner.run_evaluation(config, params, step=step, workdir=workdir, mesh=mesh,
                                   model=model, settings=settings)
  seconds = time.monotonic() - start
  writer.write(step, {"map": result["map"], "seconds": seconds}, "eval")
  if jax.process_index() == 0:
    print(f"eval step {step}: {result['metric']} mAP {result['map']:.4f} "
          f"({console_lines.count(result['num_images'], 'image')}, {seconds:.0f}s)", file=console,
          flush=True)
  return {"map": result["map"], "ap": result["ap"], "step": step, "path": result["path"]}


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: importing defines none)."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval.")
  config_flags.define_distributed_flags()
  flags.DEFINE_bool("restart_data_iterator", False, "Resume parameters and optimizer state from "
                    "a checkpoint whose data position does not fit (another process count, "
                    "dataset, batch size or seed), and start the data iterator afresh.")
  flags.DEFINE_bool("evaluate_again", False, "Evaluate a finished run again (otherwise it is "
                    "reported complete and left as it is).")


def main(argv: Sequence[str]) -> None:
  stop = _Preemption()  # first: from here on SIGTERM and Ctrl-C are a clean exit
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  if host_memory.wanted(f.config.train.reuse_host_memory):   # auto: XLA:CPU only
    host_memory.keep_freed_memory()
  parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  try:
    train_and_evaluate(f.config, f.workdir, restart_data_iterator=f.restart_data_iterator,
                       evaluate_again=f.evaluate_again, stop=stop)
  except (step_lib.NonFiniteLossError, ValueError, FileNotFoundError,
          workdir_lock.WorkdirLockedError) as e:
    sys.exit(f"error: {e}")
  finally:
    stop.restore()


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
