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

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from frcnn_jax import builders
from frcnn_jax import checkpointing
from frcnn_jax import config_flags
from frcnn_jax import detector
from frcnn_jax import evaluate
from frcnn_jax import host_memory
from frcnn_jax import metrics_writer
from frcnn_jax import parallel

Batch = dict[str, jax.Array]
PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator.

  Attributes:
    params: network parameters.
    opt_state: optimizer state.
    step: int32 scalar, number of train steps taken.
    rng: uint32 [2] base PRNG key; step s uses `fold_in(rng, s)`.
    nonfinite_skips: int32 scalar, updates skipped for a non-finite loss or gradient.
  """
  params: PyTree
  opt_state: PyTree
  step: jax.Array
  rng: jax.Array
  nonfinite_skips: jax.Array


class QuietOrbaxInfo(logging.Filter):
  """Drops orbax's INFO records (about 200 per shapes run); its warnings and errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN or infinite (the message names the step and term)."""


def make_train_step(model: Any, settings: detector.DetectorSettings,
                    tx: optax.GradientTransformation, lr_fn: Callable[[jax.Array], jax.Array],
                    *, grad_accum_steps: int = 1) -> Callable[[TrainState, Batch], tuple]:
  """Returns the (unjitted) train step `(state, batch) -> (state, metrics)`.

  A step whose loss or gradient is not finite leaves params and optimizer state unchanged and
  counts a skip; the caller decides whether that is an error (`train.nonfinite`).

  Metrics (scalars): "total", the loss terms of `detector.loss_fn`, "grad_norm",
  "learning_rate" (of this step's update) and "finite" (bool).
  """

  def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.rng, state.step)
    loss = lambda p: detector.loss_fn(p, batch, key, model=model, settings=settings, train=True)
    (total, terms), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    for name in detector.LOSS_TERMS:
      finite &= jnp.isfinite(terms[name])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1, nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32))
    metrics = {"total": total, **terms, "grad_norm": grad_norm,
               "learning_rate": lr_fn(state.step // grad_accum_steps), "finite": finite}
    return new_state, metrics

  return step_fn


def create_train_state(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh
                       ) -> tuple[TrainState, optax.GradientTransformation, Callable]:
  """Initial state (replicated on `mesh`), the optimizer and the learning-rate schedule."""
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params = builders.init_params_from_config(config, model, init_key)
  tx, lr_fn = builders.optimizer_from_config(config, params, model)
  state = TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                     rng=train_key, nonfinite_skips=jnp.int32(0))
  return parallel.replicate(state, mesh), tx, lr_fn


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class _Preemption:
  """Turns SIGTERM into a flag the loop polls; multi-process runs agree on the step via JAX."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, metrics: dict[str, Any], mode: str) -> None:
  """Raises NonFiniteLossError for a non-finite step when `mode` is "error"."""
  if mode != "error" or bool(metrics["finite"]):
    return
  bad = [name for name in ("total", *detector.LOSS_TERMS) if not math.isfinite(metrics[name])]
  what = f"loss term(s) {', '.join(bad)}" if bad else f"gradient (norm {metrics['grad_norm']})"
  values = ", ".join(f"{name}={float(metrics[name]):.4g}" for name in detector.LOSS_TERMS)
  raise NonFiniteLossError(
      f"non-finite {what} at step {step} ({values}); the update was not applied. Lower "
      "train.learning_rate, enable train.grad_clip_norm, or set train.nonfinite=skip.")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json, warning about keys that differ from an earlier run's."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    changed = _diff(previous, current)
    if changed:
      logging.warning("config differs from the run already in %s: %s", workdir, changed)
  with open(path, "w") as f:
    json.dump(current, f, indent=2)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for key in sorted(set(a) | set(b))
            for d in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
  return [prefix.rstrip(".")] if a != b else []


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, float]:
  keys = [k for k in window[0] if k != "finite"]
  return {k: float(np.mean([m[k] for m in window])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to `config.train.num_steps` (resuming from WORKDIR/checkpoints) and evaluates.

  Every process of a multi-process run calls this with the same arguments.

  Returns:
    {"step": final step, "train": last logged metrics, "eval": final evaluation ({} when
     preempted), "nonfinite_skips": int, "preempted": bool, "params": final parameters}.

  Raises:
    NonFiniteLossError: a non-finite loss with `train.nonfinite == "error"`.
    ValueError / FileNotFoundError: bad config values or a missing dataset (from the builders).
  """
  config_flags.validate_config(config)
  primary = jax.process_index() == 0
  t = config.train
  mesh = parallel.make_mesh()
  parallel.check_batch_size(t.batch_size, mesh)
  train_source = builders.source_from_config(config, "train")
  builders.source_from_config(config, "eval")  # fail now, not after training, if it is missing
  model = builders.model_from_config(config, len(train_source.classes))
  settings = builders.detector_settings_from_config(config)
  state, tx, lr_fn = create_train_state(config, model, mesh)
  data = builders.train_data_from_config(config, train_source, mesh)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            keep=t.keep_checkpoints)
  restored = checkpointer.restore_latest(_abstract(state), data)
  if restored is not None:
    state = restored[0]
    logging.info("resumed from checkpoint step %d in %s", int(state.step), workdir)
  start = int(state.step)
  if primary:
    _write_config(config, workdir)
    metrics_writer.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start)
  writer = metrics_writer.MetricsWriter(workdir, enabled=primary)
  progress = metrics_writer.ProgressLine(t.num_steps, start, enabled=primary)
  step_fn = make_train_step(model, settings, tx, lr_fn, grad_accum_steps=t.grad_accum_steps)
  train_step = jax.jit(step_fn, in_shardings=(parallel.replicated(mesh),
                                              parallel.batch_sharding(mesh)),
                       out_shardings=parallel.replicated(mesh), donate_argnums=0)
  evaluate_now = lambda step: _evaluate(config, model, settings, mesh, state.params, workdir,
                                        step, writer)
  preemption = _Preemption()
  result: dict[str, Any] = {"train": {}, "eval": {}, "preempted": False}
  window: list[dict[str, Any]] = []   # fetched metrics since the last log line
  pending: tuple[int, dict[str, jax.Array]] | None = None   # dispatched, not yet checked
  timed_steps, window_start = 0, time.monotonic()
  try:
    for step in range(start + 1, t.num_steps + 1):
      state, metrics = train_step(state, next(data))
      timed_steps += 1
      if pending is not None:  # check the previous step while this one runs
        window.append(jax.device_get(pending[1]))
        _check_finite(pending[0], window[-1], t.nonfinite)
      pending = (step, metrics)
      if step == start + 1:  # exclude compilation from the speed and the ETA
        jax.block_until_ready(metrics)
        progress.restart_clock(step)
        timed_steps, window_start = 0, time.monotonic()
      last = step == t.num_steps
      if step % t.log_every == 0 or last:
        window.append(jax.device_get(metrics))
        _check_finite(step, window[-1], t.nonfinite)
        pending = None
        elapsed = time.monotonic() - window_start
        scalars = _mean_metrics(window)
        if timed_steps:  # none when the window is only the compiling first step
          scalars["step_time"] = elapsed / timed_steps
          scalars["images_per_sec"] = t.batch_size * timed_steps / max(elapsed, 1e-9)
        scalars["nonfinite_skips"] = float(state.nonfinite_skips)
        writer.write(step, scalars)
        progress.update(step, {k: scalars[k] for k in ("total", *detector.LOSS_TERMS,
                                                        "learning_rate", "images_per_sec")
                               if k in scalars})
        result["train"] = scalars
        window, timed_steps, window_start = [], 0, time.monotonic()
      if step % t.checkpoint_every == 0 or last:
        checkpointer.save(step, state, data)
      if preemption.reached(step):
        if pending is not None:
          _check_finite(pending[0], jax.device_get(pending[1]), t.nonfinite)
        checkpointer.save(step, state, data)
        logging.warning("SIGTERM: saved checkpoint %d in %s, exiting.", step, workdir)
        result["preempted"] = True
        break
      if t.eval_every and step % t.eval_every == 0 and not last:
        evaluate_now(step)
    if not result["preempted"]:
      if pending is not None:
        _check_finite(pending[0], jax.device_get(pending[1]), t.nonfinite)
      checkpointer.save(int(state.step), state, data)
      result["eval"] = evaluate_now(int(state.step))
  finally:
    preemption.restore()
    checkpointer.close()
    writer.close()
  result["step"] = int(state.step)
  result["nonfinite_skips"] = int(state.nonfinite_skips)
  result["params"] = state.params
  return result


def _evaluate(config: ml_collections.ConfigDict, model: Any,
              settings: detector.DetectorSettings, mesh: jax.sharding.Mesh, params: PyTree,
              workdir: str, step: int, writer: metrics_writer.MetricsWriter) -> dict[str, Any]:
  """Evaluates on the eval split: WORKDIR/eval/<split>-<step>.json, mAP to the metrics."""
  start = time.monotonic()
  result = evaluate.run_evaluation(config, params, step=step, workdir=workdir, mesh=mesh,
                                   model=model, settings=settings)
  seconds = time.monotonic() - start
  writer.write(step, {"map": result["map"], "seconds": seconds}, "eval")
  if jax.process_index() == 0:
    print(f"eval step {step}: {result['metric']} mAP {result['map']:.4f} "
          f"({result['num_images']} images, {seconds:.0f}s)", flush=True)
  return {"map": result["map"], "ap": result["ap"], "step": step, "path": result["path"]}


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: importing defines none)."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval.")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for "
                      "jax.distributed.initialize (multi-process runs outside auto-detected "
                      "clusters).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  if f.config.train.reuse_host_memory:
    host_memory.keep_freed_memory()
  absl_logging.get_absl_handler().addFilter(QuietOrbaxInfo())
  parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  try:
    result = train_and_evaluate(f.config, f.workdir)
  except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(f"error: {e}")
  if result["preempted"]:
    print(f"preempted at step {result['step']}; checkpoint saved", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
