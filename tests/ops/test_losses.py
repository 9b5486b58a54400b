"""Tests for frcnn_jax.ops.losses against plain-NumPy loop references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import losses

_rpn_loss = jax.jit(losses.rpn_loss)
_detection_loss = jax.jit(losses.detection_loss)


def np_smooth_l1(x: float, sigma: float) -> float:
  s2 = sigma * sigma
  return 0.5 * s2 * x * x if abs(x) < 1.0 / s2 else abs(x) - 0.5 / s2


def np_log_softmax(z: np.ndarray) -> np.ndarray:
  z = z.astype(np.float64)
  m = z.max()
  return z - m - math.log(np.exp(z - m).sum())


def np_rpn_loss(logits, deltas, labels, targets, sigma, lam):
  n_sampled = sum(1 for l in labels if l >= 0)
  cls = box = 0.0
  for a, label in enumerate(labels):
    if label < 0:
      continue
    if logits.ndim == 2:
      cls -= np_log_softmax(logits[a])[label]
    else:
      p = 1.0 / (1.0 + math.exp(-float(logits[a])))
      cls -= math.log(p if label == 1 else 1.0 - p)
    if label == 1:
      box += sum(np_smooth_l1(float(deltas[a, j] - targets[a, j]), sigma) for j in range(4))
  n = max(n_sampled, 1)
  return cls / n, lam * box / n


def np_detection_loss(logits, deltas, labels, targets, weights, valid, sigma, lam):
  s, k = logits.shape
  deltas = deltas.reshape(s, k, 4)
  n = 0
  cls = box = 0.0
  for i in range(s):
    if not valid[i] or labels[i] < 0:
      continue
    n += 1
    cls -= np_log_softmax(logits[i])[labels[i]]
    if labels[i] >= 1:
      box += weights[i] * sum(
          np_smooth_l1(float(deltas[i, labels[i], j] - targets[i, j]), sigma) for j in range(4))
  n = max(n, 1)
  return cls / n, lam * box / n


@pytest.mark.parametrize("sigma,x,expected", [
    (1.0, 0.0, 0.0),
    (1.0, 0.5, 0.125),          # quadratic side
    (1.0, -0.5, 0.125),
    (1.0, 1.0, 0.5),            # the knee: both sides give 0.5
    (1.0, 2.0, 1.5),            # linear side
    (1.0, -3.0, 2.5),
    (3.0, 0.1, 0.045),          # 0.5 * 9 * 0.01
    (3.0, 1.0 / 9.0, 1.0 / 18.0),  # the knee 1 / sigma^2
    (3.0, 1.0, 1.0 - 1.0 / 18.0),
    (3.0, -2.0, 2.0 - 1.0 / 18.0),
])
def test_smooth_l1_golden(sigma, x, expected):
  got = float(losses.smooth_l1(jnp.float32(x), sigma))
  assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_smooth_l1_random_continuous_and_gradient(sigma):
  x = np.random.default_rng(0).normal(scale=1.0, size=500).astype(np.float32)
  got = np.asarray(losses.smooth_l1(jnp.asarray(x), sigma))
  np.testing.assert_allclose(got, [np_smooth_l1(float(v), sigma) for v in x], rtol=1e-5,
                             atol=1e-7)
  grad = np.asarray(jax.jit(jax.vmap(jax.grad(lambda v: losses.smooth_l1(v, sigma))))(x))
  expected = np.where(np.abs(x) < 1 / sigma**2, sigma**2 * x, np.sign(x))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  knee = 1.0 / sigma**2
  eps = 1e-4
  left = float(losses.smooth_l1(jnp.float32(knee - eps), sigma))
  right = float(losses.smooth_l1(jnp.float32(knee + eps), sigma))
  assert abs(right - left) < 3e-4  # continuous at the knee


def _random_rpn(rng, a, form):
  logits = rng.normal(size=(a, 2) if form == "softmax" else (a,)).astype(np.float32)
  deltas = rng.normal(size=(a, 4)).astype(np.float32)
  labels = rng.choice([-1, 0, 1], size=a, p=[0.5, 0.3, 0.2]).astype(np.int32)
  targets = rng.normal(size=(a, 4)).astype(np.float32) * (labels == 1)[:, None]
  return logits, deltas, labels, targets


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
def test_rpn_loss_matches_reference(form):
  rng = np.random.default_rng(1)
  fn = jax.jit(lambda *args: losses.rpn_loss(*args, sigma=3.0, box_loss_weight=2.0))
  for _ in range(100):
    a = 37
    logits, deltas, labels, targets = _random_rpn(rng, a, form)
    if rng.random() < 0.1:
      labels[:] = -1
    cls, box = fn(logits, deltas, labels, targets)
    ref_cls, ref_box = np_rpn_loss(logits, deltas, labels, targets, 3.0, 2.0)
    np.testing.assert_allclose(float(cls), ref_cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(box), ref_box, rtol=1e-5, atol=1e-6)


def test_rpn_loss_golden_and_forms_agree():
  # Zero logits: log 2 per sampled anchor. One positive with delta error 1 in x: sigma 3 gives
  # 1 - 1/18; two sampled anchors so the box term is (1 - 1/18) / 2.
  logits = jnp.zeros((4, 2))
  deltas = jnp.zeros((4, 4)).at[0, 0].set(1.0).at[1, 0].set(5.0)
  labels = jnp.array([1, 0, -1, -1])
  cls, box = _rpn_loss(logits, deltas, labels, jnp.zeros((4, 4)))
  assert float(cls) == pytest.approx(math.log(2.0), rel=1e-6)
  assert float(box) == pytest.approx((1 - 1 / 18) / 2, rel=1e-6)
  # Two-way softmax with logits (0, z) equals the sigmoid of z.
  z = jnp.array([-3.0, 0.5, 2.0, 7.0])
  two = _rpn_loss(jnp.stack([jnp.zeros(4), z], 1), deltas, labels, jnp.zeros((4, 4)))
  one = _rpn_loss(z, deltas, labels, jnp.zeros((4, 4)))
  np.testing.assert_allclose(np.array(two), np.array(one), rtol=1e-6)


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
def test_rpn_loss_nothing_sampled_is_zero_without_nan(form):
  logits, deltas, _, targets = _random_rpn(np.random.default_rng(2), 10, form)
  labels = -np.ones(10, np.int32)
  fn = lambda l, d: sum(losses.rpn_loss(l, d, labels, targets))
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(logits, deltas)
  assert float(value) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def test_rpn_loss_extreme_logits_are_finite():
  logits = jnp.array([[-200.0, 200.0], [200.0, -200.0]])
  labels = jnp.array([0, 1])
  value, grad = jax.jit(jax.value_and_grad(
      lambda l: losses.rpn_loss(l, jnp.zeros((2, 4)), labels, jnp.zeros((2, 4)))[0]))(logits)
  assert float(value) == pytest.approx(400.0, rel=1e-5)
  assert np.all(np.isfinite(np.asarray(grad)))


def _random_det(rng, s, k, flat):
  logits = rng.normal(size=(s, k)).astype(np.float32) * 3
  deltas = rng.normal(size=(s, k * 4) if flat else (s, k, 4)).astype(np.float32)
  valid = rng.random(s) < 0.8
  labels = np.where(valid, rng.integers(0, k, size=s), -1).astype(np.int32)
  targets = rng.normal(size=(s, 4)).astype(np.float32) * (labels >= 1)[:, None]
  weights = (labels >= 1).astype(np.float32)
  return logits, deltas, labels, targets, weights, valid


@pytest.mark.parametrize("flat", [False, True])
def test_detection_loss_matches_reference(flat):
  rng = np.random.default_rng(3)
  fn = jax.jit(lambda *args: losses.detection_loss(*args, sigma=1.0, box_loss_weight=1.5))
  for _ in range(100):
    args = _random_det(rng, 16, 5, flat)
    if rng.random() < 0.1:
      args[5][:] = False
    cls, box = fn(*args)
    ref_cls, ref_box = np_detection_loss(*args, 1.0, 1.5)
    np.testing.assert_allclose(float(cls), ref_cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(box), ref_box, rtol=1e-5, atol=1e-6)


def test_detection_loss_uses_only_true_class_and_foreground():
  # RoI 0 is class 2 with a wrong class-2 delta; RoI 1 is background with wild deltas.
  logits = jnp.zeros((3, 3))
  deltas = jnp.zeros((3, 3, 4)).at[0, 2, 0].set(0.5).at[0, 1].set(9.0).at[1].set(9.0)
  labels = jnp.array([2, 0, -1])
  valid = jnp.array([True, True, False])
  weights = jnp.array([1.0, 0.0, 0.0])
  cls, box = _detection_loss(logits, deltas, labels, jnp.zeros((3, 4)), weights, valid)
  assert float(cls) == pytest.approx(math.log(3.0), rel=1e-6)
  assert float(box) == pytest.approx(0.125 / 2, rel=1e-6)


def test_detection_loss_gradient_of_cross_entropy():
  rng = np.random.default_rng(4)
  logits, deltas, labels, targets, weights, valid = _random_det(rng, 8, 4, False)
  grad = jax.jit(jax.grad(lambda l: losses.detection_loss(
      l, deltas, labels, targets, weights, valid)[0]))(logits)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(4)[np.maximum(labels, 0)]
  expected = (p - onehot) * valid[:, None] / max(valid.sum(), 1)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-6)


def test_detection_loss_nothing_valid_is_zero_without_nan():
  logits, deltas, _, targets, weights, _ = _random_det(np.random.default_rng(5), 6, 3, True)
  labels = -np.ones(6, np.int32)
  valid = np.zeros(6, bool)
  fn = lambda l, d: sum(losses.detection_loss(l, d, labels, targets, weights, valid))
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(logits, deltas)
  assert float(value) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def test_losses_vmap_equals_loop_and_trace_once():
  rng = np.random.default_rng(6)
  batch = [_random_rpn(rng, 20, "softmax") for _ in range(3)]
  stacked = [np.stack(x) for x in zip(*batch)]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def batched(*args):
    return jax.vmap(losses.rpn_loss)(*args)

  cls, box = batched(*stacked)
  cls2, _ = batched(*[x + 0 for x in stacked])
  for i, args in enumerate(batch):
    ref = _rpn_loss(*args)
    np.testing.assert_allclose([cls[i], box[i]], np.array(ref), rtol=1e-6)
  np.testing.assert_allclose(cls, cls2)

  det = [_random_det(rng, 8, 3, False) for _ in range(3)]
  det_stacked = [np.stack(x) for x in zip(*det)]
  out = jax.jit(jax.vmap(losses.detection_loss))(*det_stacked)
  for i, args in enumerate(det):
    np.testing.assert_allclose([out[0][i], out[1][i]], np.array(_detection_loss(*args)),
                               rtol=1e-6)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="objectness_logits"):
    losses.rpn_loss(jnp.zeros((4, 3)), jnp.zeros((4, 4)), jnp.zeros(4, int), jnp.zeros((4, 4)))
  with pytest.raises(ValueError, match="box_deltas"):
    losses.detection_loss(jnp.zeros((2, 3)), jnp.zeros((2, 8)), jnp.zeros(2, int),
                          jnp.zeros((2, 4)), jnp.zeros(2), jnp.ones(2, bool))
