"""The optimizer: Caffe-style SGD with momentum, as py-faster-rcnn trains Faster R-CNN.

(AdamW is available too, for small models trained from scratch such as the shapes setting.)

Built from plain arguments (`frcnn_jax/config/build.py` maps the config onto them):

* learning-rate schedule: optional linear warmup, then piecewise-constant decay or cosine;
* weight decay added to the gradient (L2), of biases too unless `bias_weight_decay=False`
  (py-faster-rcnn decays them: its prototxts give biases `lr_mult: 2` and Caffe's default
  `decay_mult: 1`);
* biases learn `bias_lr_mult` times faster (py-faster-rcnn uses 2);
* frozen parameters (e.g. conv1/conv2 of VGG16) get a zero update and no optimizer state;
* optional global-norm gradient clipping (over the trainable parameters only);
* optional gradient accumulation over `grad_accum_steps` micro-batches (`optax.MultiSteps`):
  the mean of their gradients makes one update, as Caffe's `iter_size`, and `learning_rate`
  is then a function of the update count (config step counts are divided by k in builders).

Caffe's update is `v = momentum * v + lr * (g + wd * w); w -= v`: the learning rate enters
before the momentum, so a learning-rate drop takes effect at once instead of being smeared over
the momentum's memory. `make_optimizer` reproduces exactly this order.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

FROZEN, BIAS, WEIGHT = "frozen", "bias", "weight"


def make_schedule(
    base_lr: float,
    *,
    schedule: str = "piecewise",
    num_steps: int,
    warmup_steps: int = 0,
    warmup_factor: float = 1.0 / 3.0,
    boundaries: Sequence[int] = (),
    decay: float = 0.1,
) -> Callable[[jax.Array], jax.Array]:
  """Returns the learning rate as a function of the update count.

  The decay is optax's: `optax.piecewise_constant_schedule` (the rate is multiplied by `decay`
  once the count reaches a boundary, `count >= boundary`, Caffe's "step" rule) or
  `optax.cosine_decay_schedule` started at `warmup_steps` (`optax.join_schedules`). The
  warmup multiplies it by `warmup_factor + (1 - warmup_factor) * count / warmup_steps` while
  `count < warmup_steps`: py-faster-rcnn-style linear warmup, kept as this one expression
  because `optax.linear_schedule` rounds differently (its rates differ in the last bit).

  Args:
    base_lr: learning rate after warmup and before any decay.
    schedule: "piecewise" (multiply by `decay` at each of `boundaries`) or "cosine" (from
      `base_lr` at `warmup_steps` down to 0 at `num_steps`).
    num_steps: total number of updates (the cosine's end).
    warmup_steps: updates of linear warmup from `warmup_factor * base_lr` to `base_lr`.
    warmup_factor: fraction of `base_lr` at update 0 when warming up.
    boundaries: update counts at which the piecewise schedule decays (ascending; a count
      given twice decays twice).
    decay: factor applied at each piecewise boundary.

  Returns:
    A function from an int update count (scalar) to the float32 learning rate.

  Raises:
    ValueError: an unknown schedule, boundaries not ascending, num_steps < 1 or
      warmup_steps < 0.
  """
  if schedule not in ("piecewise", "cosine"):
    raise ValueError(f"schedule must be 'piecewise' or 'cosine', got {schedule!r}.")
  if list(boundaries) != sorted(boundaries):
    raise ValueError(f"lr boundaries must be ascending, got {tuple(boundaries)}.")
  if num_steps <= 0 or warmup_steps < 0:
    raise ValueError(f"need num_steps > 0 and warmup_steps >= 0, got {num_steps}, {warmup_steps}.")
  if schedule == "piecewise":
    scales: dict[int, float] = {}
    for boundary in boundaries:   # a repeated boundary: the decays multiplied (in float32)
      scales[int(boundary)] = float(np.float32(scales.get(int(boundary), 1.0))
                                    * np.float32(decay))
    decayed = optax.piecewise_constant_schedule(base_lr, scales or None)
  else:
    decayed = optax.join_schedules(
        [optax.constant_schedule(base_lr),
         optax.cosine_decay_schedule(base_lr, max(num_steps - warmup_steps, 1))],
        [warmup_steps])

  def lr_fn(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.int32)
    lr = jnp.asarray(decayed(count), jnp.float32)
    if warmup_steps > 0:
      ramp = warmup_factor + (1.0 - warmup_factor) * count / warmup_steps
      lr = lr * jnp.where(count < warmup_steps, ramp, 1.0)
    return jnp.asarray(lr, jnp.float32)

  return lr_fn


def param_labels(params: PyTree, trainable: PyTree | None = None) -> PyTree:
  """Labels each parameter "frozen", "bias" or "weight".

  Args:
    params: parameter pytree (nested dicts as produced by flax).
    trainable: bool pytree with the structure of `params` (or a prefix of it); False marks
      frozen leaves. None: everything trains.

  Returns:
    A pytree of label strings with the structure of `params`.
  """
  if trainable is None:
    trainable = jax.tree.map(lambda _: True, params)
  trainable = _broadcast_prefix(trainable, params)

  def label(path, _, train):
    if not train:
      return FROZEN
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return BIAS if name == "bias" else WEIGHT

  return jax.tree_util.tree_map_with_path(label, params, trainable)


def _broadcast_prefix(prefix: PyTree, full: PyTree) -> PyTree:
  """Broadcasts a bool prefix tree onto the structure of `full`."""
  return jax.tree_util.tree_map(lambda p, f: jax.tree.map(lambda _: bool(p), f), prefix, full)


def make_optimizer(
    params: PyTree,
    learning_rate: Callable[[jax.Array], jax.Array],
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    bias_lr_mult: float = 1.0,
    bias_weight_decay: bool = True,
    trainable: PyTree | None = None,
    grad_clip_norm: float = 0.0,
    grad_accum_steps: int = 1,
) -> optax.GradientTransformation:
  """Returns the SGD-with-momentum optimizer described in the module docstring.

  Args:
    params: the parameter pytree the optimizer will update (only its structure is used).
    learning_rate: schedule from update count to learning rate (see `make_schedule`).
    optimizer: "sgd" (Caffe SGD with momentum, the paper) or "adamw" (Adam with decoupled
      weight decay, `momentum` as its beta1; for training small models from scratch).
    momentum: momentum coefficient (0 disables the momentum buffer's effect).
    weight_decay: L2 coefficient added to the gradient of decayed parameters (sgd), or the
      decoupled decay rate multiplied by the learning rate (adamw).
    bias_lr_mult: learning-rate multiplier of parameters named "bias".
    bias_weight_decay: whether biases are decayed too.
    trainable: bool pytree (or prefix) marking trainable leaves; None trains everything.
    grad_clip_norm: clip the global gradient norm (trainable leaves) to this; 0 disables.
    grad_accum_steps: average gradients over this many calls before one update; the schedule
      then counts updates, not calls.

  Returns:
    An optax GradientTransformation (an `optax.MultiSteps` one when accumulating).
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}.")
  if grad_clip_norm < 0 or weight_decay < 0 or not 0 <= momentum < 1:
    raise ValueError("need grad_clip_norm >= 0, weight_decay >= 0 and 0 <= momentum < 1.")
  labels = param_labels(params, trainable)
  frozen = jax.tree.map(lambda l: l == FROZEN, labels)

  if optimizer not in ("sgd", "adamw"):
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}.")

  def group(decayed: bool, lr_mult: float) -> optax.GradientTransformation:
    decay = [optax.add_decayed_weights(weight_decay)] if decayed and weight_decay > 0 else []
    lr = optax.scale_by_learning_rate(lambda c: lr_mult * learning_rate(c))
    if optimizer == "adamw":
      return optax.chain(optax.scale_by_adam(b1=momentum), *decay, lr)
    return optax.chain(*decay, lr, optax.trace(decay=momentum))

  steps = [optax.masked(optax.set_to_zero(), frozen)]
  if grad_clip_norm > 0:
    steps.append(optax.clip_by_global_norm(grad_clip_norm))
  steps.append(optax.multi_transform(
      {WEIGHT: group(True, 1.0),
       BIAS: group(bias_weight_decay, bias_lr_mult),
       FROZEN: optax.set_to_zero()},
      labels))
  tx = optax.chain(*steps)
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps).gradient_transformation()
  return tx
