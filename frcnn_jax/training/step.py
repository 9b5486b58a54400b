"""One training step as a jitted function of (state, batch), and the state it carries."""

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from frcnn_jax.config import build as builders
from frcnn_jax.detection import detector
from frcnn_jax.runtime import parallel

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
    with jax.named_scope("optimizer"):   # a stage of frcnn_jax/benchmarking/hlo.py
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      new_state = state.replace(
          params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
          step=state.step + 1,
          nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32))
    metrics = {"total": total, **terms, "grad_norm": grad_norm,
               "learning_rate": lr_fn(state.step // grad_accum_steps), "finite": finite}
    return new_state, metrics

  return step_fn


def jit_train_step(model: Any, settings: detector.DetectorSettings,
                   tx: optax.GradientTransformation, lr_fn: Callable[[jax.Array], jax.Array],
                   mesh: jax.sharding.Mesh, *, grad_accum_steps: int = 1) -> Callable:
  """`make_train_step` jitted over `mesh`: state replicated and donated, batch sharded on the
  `data` axis. One program is compiled per batch shape (per canvas)."""
  return jax.jit(make_train_step(model, settings, tx, lr_fn, grad_accum_steps=grad_accum_steps),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh), donate_argnums=0)


def create_train_state(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh
                       ) -> tuple[TrainState, optax.GradientTransformation, Callable]:
  """Initial state (replicated on `mesh`), the optimizer and the learning-rate schedule."""
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params = builders.init_params_from_config(config, model, init_key)
  tx, lr_fn = builders.optimizer_from_config(config, params, model)
  state = TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                     rng=train_key, nonfinite_skips=jnp.int32(0))
  return parallel.replicate(state, mesh), tx, lr_fn


def check_finite(step: int, metrics: dict[str, Any], mode: str) -> None:
  """Raises NonFiniteLossError for a non-finite step when `mode` is "error"."""
  if mode != "error" or bool(metrics["finite"]):
    return
  bad = [name for name in ("total", *detector.LOSS_TERMS) if not math.isfinite(metrics[name])]
  what = f"loss term(s) {', '.join(bad)}" if bad else f"gradient (norm {metrics['grad_norm']})"
  values = ", ".join(f"{name}={float(metrics[name]):.4g}" for name in detector.LOSS_TERMS)
  raise NonFiniteLossError(
      f"non-finite {what} at step {step} ({values}); the update was not applied. Lower "
      "train.learning_rate, enable train.grad_clip_norm, or set train.nonfinite=skip.")
