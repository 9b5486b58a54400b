"""Tests for frcnn_jax/models/rpn.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.models import rpn


@pytest.mark.parametrize("objectness, num_logits", [("softmax", 2), ("sigmoid", 1)])
def test_shapes_and_anchor_grid_order(objectness, num_logits):
  k, (b, h, w) = 3, (2, 3, 5)
  head = rpn.RPNHead(num_anchors=k, channels=8, objectness=objectness)
  features = jax.random.normal(jax.random.key(0), (b, h, w, 6))
  shapes = jax.eval_shape(head.init, jax.random.key(1), features)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  (logits, deltas), state = jax.jit(functools.partial(
      head.apply, capture_intermediates=True, mutable=["intermediates"]))(variables, features)
  assert logits.shape == (b, h * w * k, num_logits) and logits.dtype == jnp.float32
  assert deltas.shape == (b, h * w * k, 4) and deltas.dtype == jnp.float32
  raw_logits = np.asarray(state["intermediates"]["objectness"]["__call__"][0])
  raw_deltas = np.asarray(state["intermediates"]["deltas"]["__call__"][0])
  for i, j, a in [(0, 0, 0), (1, 3, 2), (2, 4, 1)]:
    index = (i * w + j) * k + a
    np.testing.assert_allclose(logits[1, index],
                               raw_logits[1, i, j, a * num_logits:(a + 1) * num_logits])
    np.testing.assert_allclose(deltas[1, index], raw_deltas[1, i, j, 4 * a:4 * a + 4])


def test_initialisation():
  head = rpn.RPNHead(num_anchors=9, channels=64)
  params = jax.jit(head.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))["params"]
  for name in ("conv", "objectness", "deltas"):
    assert float(jnp.abs(params[name]["bias"]).max()) == 0.0
    assert abs(float(params[name]["kernel"].std()) - 0.01) < 0.002


def test_objectness_scores():
  logits2 = jnp.asarray([[0.0, 0.0], [0.0, 2.0]])
  np.testing.assert_allclose(rpn.objectness_scores(logits2), [0.5, 1 / (1 + np.exp(-2))],
                             rtol=1e-6)
  np.testing.assert_allclose(rpn.objectness_scores(jnp.asarray([[0.0], [-1.0]])),
                             [0.5, 1 / (1 + np.e)], rtol=1e-6)


def test_objectness_logits_rank_like_the_probability_without_saturating():
  rng = np.random.default_rng(0)
  for width in (2, 1):
    logits = jnp.asarray(rng.normal(size=(500, width)) * 4, jnp.float32)
    d = rpn.objectness_logits(logits)
    np.testing.assert_allclose(jax.nn.sigmoid(d), rpn.objectness_scores(logits), rtol=1e-5,
                               atol=1e-7)
    p = np.asarray(rpn.objectness_scores(logits), np.float64)
    d = np.asarray(d, np.float64)
    apart = np.abs(p[:, None] - p[None, :]) > 1e-6
    by_logit, by_prob = np.sign(d[:, None] - d[None, :]), np.sign(p[:, None] - p[None, :])
    assert np.all(by_logit[apart] == by_prob[apart])
  big = jnp.asarray([[0.0, 17.0], [0.0, 20.0], [1.0, 30.0]])
  assert np.all(np.asarray(rpn.objectness_scores(big)) == 1.0)    # float32 saturates ...
  np.testing.assert_array_equal(rpn.objectness_logits(big), [17.0, 20.0, 29.0])   # ... not this


def test_unknown_objectness_is_an_error():
  with pytest.raises(ValueError, match="objectness"):
    rpn.RPNHead(objectness="tanh").init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))
