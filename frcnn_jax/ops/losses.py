"""Faster R-CNN losses for one image: smooth L1, the RPN loss and the detection-head loss.

Normalisation follows py-faster-rcnn (Caffe's SmoothL1Loss divides by the blob's batch size):
  * RPN: log loss averaged over the sampled anchors (label >= 0); the box term is the sum of
    smooth L1 (sigma 3) over the positives' 4 coordinates divided by the number of sampled
    anchors as well (py-faster-rcnn's outside weights 1 / num_examples), times lambda.
  * Head: softmax cross-entropy averaged over the valid sampled RoIs; the box term is the sum
    of smooth L1 (sigma 1) over the foreground RoIs' true-class coordinates divided by the
    number of valid sampled RoIs, times lambda.
Every normaliser is max(count, 1), so an image with nothing sampled gives 0 loss, not NaN.
Both loss functions return the classification and box terms separately.
"""

import jax
import jax.numpy as jnp


def smooth_l1(x: jax.Array, sigma: float = 1.0) -> jax.Array:
  """py-faster-rcnn's smooth L1, elementwise.

  0.5 * (sigma * x)^2 if |x| < 1 / sigma^2, else |x| - 0.5 / sigma^2 (continuous at the knee
  |x| = 1 / sigma^2, where both sides give 0.5 / sigma^2).

  Args:
    x: [...] differences.
    sigma: knee parameter (3 for the RPN, 1 for the head).

  Returns:
    [...] losses.
  """
  s2 = sigma * sigma
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0 / s2, 0.5 * s2 * x * x, ax - 0.5 / s2)


def _normaliser(mask: jax.Array) -> jax.Array:
  return jnp.maximum(mask.sum(), 1).astype(jnp.float32)


def rpn_loss(
    objectness_logits: jax.Array,
    deltas: jax.Array,
    labels: jax.Array,
    box_targets: jax.Array,
    *,
    sigma: float = 3.0,
    box_loss_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """RPN objectness log loss and box regression loss (one image).

  Args:
    objectness_logits: [A, 2] two-way softmax logits (column 0 background, column 1 object,
      the paper's 2k form) or [A] sigmoid logits of "object" (the k form).
    deltas: [A, 4] predicted box deltas.
    labels: [A] int, 1 positive, 0 negative, -1 not sampled (from `targets.rpn_targets`).
    box_targets: [A, 4] encoded targets (used where labels == 1).
    sigma: smooth L1 knee parameter.
    box_loss_weight: lambda, the weight of the box term.

  Returns:
    cls_loss: scalar, mean log loss over sampled anchors.
    box_loss: scalar, lambda * sum of smooth L1 over positives / number of sampled anchors.
  """
  a = labels.shape[0]
  if labels.ndim != 1 or deltas.shape != (a, 4) or box_targets.shape != (a, 4):
    raise ValueError(f"rpn_loss: labels [A], deltas [A, 4] and box_targets [A, 4] disagree: "
                     f"{labels.shape}, {deltas.shape}, {box_targets.shape}.")
  logits = objectness_logits.astype(jnp.float32)
  positive = labels == 1
  if logits.shape == (a, 2):
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.where(positive, log_p[:, 1], log_p[:, 0])
  elif logits.shape == (a,):
    nll = jnp.where(positive, jax.nn.softplus(-logits), jax.nn.softplus(logits))
  else:
    raise ValueError(f"objectness_logits must have shape [A, 2] or [A] with A = {a}, got "
                     f"{objectness_logits.shape}.")
  sampled = labels >= 0
  n = _normaliser(sampled)
  cls_loss = jnp.where(sampled, nll, 0.0).sum() / n
  reg = smooth_l1(deltas.astype(jnp.float32) - box_targets, sigma).sum(-1)
  box_loss = box_loss_weight * jnp.where(positive, reg, 0.0).sum() / n
  return cls_loss, box_loss


def detection_loss(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    labels: jax.Array,
    box_targets: jax.Array,
    box_weights: jax.Array,
    valid: jax.Array,
    *,
    sigma: float = 1.0,
    box_loss_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Detection-head softmax loss and class-specific box loss (one image).

  Args:
    class_logits: [S, C + 1] logits, class 0 is background.
    box_deltas: [S, C + 1, 4] or [S, 4 (C + 1)] class-specific deltas (class-major).
    labels: [S] int, 0..C, -1 for unused slots (from `targets.sample_proposals`).
    box_targets: [S, 4] encoded targets of the true class.
    box_weights: [S] weights of the box term (1 for foreground).
    valid: [S] bool, the used sampled RoIs.
    sigma: smooth L1 knee parameter.
    box_loss_weight: lambda, the weight of the box term.

  Returns:
    cls_loss: scalar, mean cross-entropy over valid RoIs.
    box_loss: scalar, lambda * sum over foreground ([u >= 1]) of the true class's smooth L1
      / number of valid RoIs.
  """
  if class_logits.ndim != 2:
    raise ValueError(f"class_logits must have shape [S, C + 1], got {class_logits.shape}.")
  s, k = class_logits.shape
  if box_deltas.shape not in ((s, k, 4), (s, 4 * k)):
    raise ValueError(f"box_deltas must have shape [{s}, {k}, 4] or [{s}, {4 * k}], got "
                     f"{box_deltas.shape}.")
  for name, x, shape in (("labels", labels, (s,)), ("box_targets", box_targets, (s, 4)),
                         ("box_weights", box_weights, (s,)), ("valid", valid, (s,))):
    if x.shape != shape:
      raise ValueError(f"{name} must have shape {list(shape)}, got {x.shape}.")
  deltas = box_deltas.reshape(s, k, 4).astype(jnp.float32)
  cls = jnp.clip(labels, 0, k - 1)
  valid = valid & (labels >= 0)
  n = _normaliser(valid)

  log_p = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, cls[:, None], axis=1)[:, 0]
  cls_loss = jnp.where(valid, nll, 0.0).sum() / n

  true_deltas = jnp.take_along_axis(deltas, cls[:, None, None], axis=1)[:, 0]
  reg = smooth_l1(true_deltas - box_targets, sigma).sum(-1)
  weight = jnp.where(valid & (labels >= 1), box_weights, 0.0)
  box_loss = box_loss_weight * (weight * reg).sum() / n
  return cls_loss, box_loss
