"""Tests of frcnn_jax/training/optim.py against a plain-NumPy Caffe SGD reference."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from frcnn_jax.training import optim
from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params():
  return {"trunk": {"conv1_1": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])},
                    "conv3_1": {"kernel": jnp.array([[0.3, 0.7]]), "bias": jnp.array([-1.0])}},
          "head": {"cls": {"kernel": jnp.array([2.0, 1.0, -1.0]), "bias": jnp.array([0.0, 0.1])}}}


def _trainable():
  return {"trunk": {"conv1_1": False, "conv3_1": True}, "head": True}


def _grads(step):
  rng = np.random.default_rng(step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params())


def _reference(num_steps, lr_fn, *, momentum, wd, bias_mult, bias_decay, clip=0.0):
  """Caffe SGD, leaf by leaf: v = m v + lr_leaf (g + wd_leaf w); w -= v."""
  params = jax.tree.map(np.asarray, _params())
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  labels = jax.tree.leaves(optim.param_labels(_params(), _trainable()))
  w = [np.array(v, np.float64) for _, v in flat]
  v = [np.zeros_like(x) for x in w]
  for step in range(num_steps):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(_grads(step))]
    g = [np.zeros_like(x) if lab == "frozen" else x for x, lab in zip(g, labels)]
    if clip:
      norm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
      g = [x * min(1.0, clip / norm) for x in g]
    lr = float(lr_fn(step))
    for i, lab in enumerate(labels):
      if lab == "frozen":
        continue
      decay = wd if (lab == "weight" or bias_decay) else 0.0
      mult = bias_mult if lab == "bias" else 1.0
      v[i] = momentum * v[i] + lr * mult * (g[i] + decay * w[i])
      w[i] = w[i] - v[i]
  return jax.tree_util.tree_unflatten(treedef, w)


def _run(tx, num_steps):
  params = _params()
  state = tx.init(params)
  for step in range(num_steps):
    updates, state = tx.update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_piecewise_schedule_with_warmup():
  lr = optim.make_schedule(0.1, schedule="piecewise", num_steps=100, warmup_steps=4,
                           warmup_factor=0.2, boundaries=(10, 20), decay=0.5)
  got = [float(lr(s)) for s in (0, 2, 4, 9, 10, 19, 20, 99)]
  want = [0.02, 0.06, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cosine_schedule_endpoints():
  lr = optim.make_schedule(1.0, schedule="cosine", num_steps=110, warmup_steps=10,
                           warmup_factor=0.0)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 60, 110, 200)],
                             [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


def _caffe_rates(count, base_lr, num_steps, warmup_steps, boundaries, decay=0.1,
                 warmup_factor=1.0 / 3.0):
  """The piecewise schedule with linear warmup as plain NumPy float32 arithmetic:
  base_lr * decay ** (boundaries passed), times the warmup ramp before `warmup_steps`."""
  del num_steps
  f32 = np.float32
  count = np.asarray(count, np.int64)
  passed = (count[:, None] >= np.asarray(boundaries, np.int64)[None]).sum(1)
  lr = f32(base_lr) * np.power(f32(decay), passed.astype(np.int32))
  if warmup_steps:
    ramp = f32(warmup_factor) + f32(1.0 - warmup_factor) * count.astype(f32) / f32(warmup_steps)
    lr = lr * np.where(count < warmup_steps, ramp, f32(1.0))
  return lr.astype(f32)


def _jax_rates(base_lr, num_steps, warmup_steps, boundaries, decay=0.1,
               warmup_factor=1.0 / 3.0):
  """The same formula written in jax.numpy, compiled as training compiles the schedule."""
  bounds = jnp.asarray(list(boundaries) or [num_steps + 1], jnp.int32)

  def lr_fn(count):
    passed = jnp.sum(count >= bounds) if boundaries else 0
    lr = base_lr * jnp.power(jnp.float32(decay), passed)
    if warmup_steps > 0:
      ramp = warmup_factor + (1.0 - warmup_factor) * count / warmup_steps
      lr = lr * jnp.where(count < warmup_steps, ramp, 1.0)
    return jnp.asarray(lr, jnp.float32)

  return np.asarray(jax.jit(jax.vmap(lr_fn))(jnp.arange(num_steps + 1, dtype=jnp.int32)))


# experiments/voc.py: 70000 updates, x0.1 at 50000, base 1e-3; its `:8` variant: 4e-3 with 62
# warmup updates; and a 500-update warmup.
VOC_RECIPES = [(1e-3, 70000, 0, (50000,)), (4e-3, 70000, 62, (50000,)),
               (1e-3, 70000, 500, (50000,))]


@pytest.mark.parametrize("base_lr,num_steps,warmup_steps,boundaries", VOC_RECIPES)
def test_piecewise_schedule_is_bitwise_the_caffe_step_rule(base_lr, num_steps, warmup_steps,
                                                           boundaries):
  lr_fn = optim.make_schedule(base_lr, num_steps=num_steps, warmup_steps=warmup_steps,
                              boundaries=boundaries, decay=0.1)
  counts = np.arange(num_steps + 1)
  got = np.asarray(jax.jit(jax.vmap(lr_fn))(jnp.asarray(counts, jnp.int32)))
  want = _caffe_rates(counts, base_lr, num_steps, warmup_steps, boundaries)
  assert got.dtype == np.float32
  if not warmup_steps:
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
  else:
    # XLA folds (1 - f) * count / w into count * ((1 - f) / w) and fuses the add (an FMA), so
    # NumPy's step-by-step rounding may differ in the last bits during warmup; the same
    # formula compiled is the bitwise reference there.
    np.testing.assert_array_equal(got[warmup_steps:].view(np.int32),
                                  want[warmup_steps:].view(np.int32))
    _assert_bitwise_the_compiled_formula(base_lr, num_steps, warmup_steps, boundaries)


def _assert_bitwise_the_compiled_formula(base_lr, num_steps, warmup_steps, boundaries):
  """optax's schedule, compiled as training compiles it (XLA's default optimisation, in a
  child: the suite compiles cheaply, tests/conftest.py), equals `_jax_rates` bit for bit and
  NumPy's step-by-step rounding within 2 ulps."""
  code = (
      "import jax, jax.numpy as jnp, numpy as np\n"
      "from frcnn_jax.training import optim\n"
      "import os\n"
      "from tests.training.test_optim import _caffe_rates, _jax_rates\n"
      f"os.environ['XLA_FLAGS'] = {conftest.DEFAULT_XLA_FLAGS!r}\n"
      f"args = ({base_lr!r}, {num_steps!r}, {warmup_steps!r}, {tuple(boundaries)!r})\n"
      "lr_fn = optim.make_schedule(args[0], num_steps=args[1], warmup_steps=args[2],\n"
      "                            boundaries=args[3], decay=0.1)\n"
      "got = np.asarray(jax.jit(jax.vmap(lr_fn))(jnp.arange(args[1] + 1, dtype=jnp.int32)))\n"
      "np.testing.assert_array_equal(got.view(np.int32), _jax_rates(*args).view(np.int32))\n"
      "want = _caffe_rates(np.arange(args[1] + 1), *args)\n"
      "assert np.abs(got.view(np.int32) - want.view(np.int32)).max() <= 2\n"
      "print('bitwise equal')\n")
  env = dict(conftest.DEFAULT_COMPILE_ENV, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  # (importing the test module imports tests/conftest.py again, which adds the cheap flags:
  # the child puts the default ones back before JAX starts its backend)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120, check=False)
  assert out.returncode == 0 and "bitwise equal" in out.stdout, out.stderr[-2000:]


def test_repeated_boundary_decays_twice():
  lr = optim.make_schedule(1.0, num_steps=10, boundaries=(4, 4), decay=0.5)
  assert [float(lr(s)) for s in (3, 4, 9)] == [1.0, 0.25, 0.25]


@pytest.mark.parametrize("kwargs", [dict(schedule="step"), dict(boundaries=(5, 2)),
                                    dict(num_steps=0)])
def test_schedule_rejects_bad_arguments(kwargs):
  args = dict(schedule="piecewise", num_steps=10) | kwargs
  with pytest.raises(ValueError):
    optim.make_schedule(0.1, **args)


def test_param_labels():
  labels = optim.param_labels(_params(), _trainable())
  assert labels["trunk"]["conv1_1"] == {"kernel": "frozen", "bias": "frozen"}
  assert labels["trunk"]["conv3_1"] == {"kernel": "weight", "bias": "bias"}
  assert labels["head"]["cls"] == {"kernel": "weight", "bias": "bias"}


@pytest.mark.parametrize("bias_decay,clip", [(False, 0.0), (True, 0.5)])
def test_matches_caffe_sgd_reference(bias_decay, clip):
  lr_fn = optim.make_schedule(0.1, num_steps=6, boundaries=(3,), decay=0.1)
  tx = optim.make_optimizer(_params(), lr_fn, momentum=0.9, weight_decay=0.01, bias_lr_mult=2.0,
                            bias_weight_decay=bias_decay, trainable=_trainable(),
                            grad_clip_norm=clip)
  got = _run(tx, 6)
  want = _reference(6, lr_fn, momentum=0.9, wd=0.01, bias_mult=2.0, bias_decay=bias_decay,
                    clip=clip)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  np.testing.assert_array_equal(got["trunk"]["conv1_1"]["kernel"],
                                _params()["trunk"]["conv1_1"]["kernel"])


def test_frozen_parameters_have_no_momentum_state():
  tx = optim.make_optimizer(_params(), lambda c: 0.1, momentum=0.9, trainable=_trainable())
  state_size = sum(x.size for x in jax.tree.leaves(tx.init(_params())) if x.ndim)
  trainable_size = sum(x.size for x in jax.tree.leaves(_params())) - 3
  assert state_size == trainable_size


def test_gradient_accumulation_equals_mean_gradient_update():
  lr_fn = optim.make_schedule(0.1, num_steps=4)
  accumulated = optim.make_optimizer(_params(), lr_fn, momentum=0.9, grad_accum_steps=2)
  plain = optim.make_optimizer(_params(), lr_fn, momentum=0.9)
  params, state = _params(), accumulated.init(_params())
  for step in range(2):
    updates, state = accumulated.update(_grads(step), state, params)
    if step == 0:
      assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
  mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, _grads(0), _grads(1))
  updates, _ = plain.update(mean_grad, plain.init(_params()), _params())
  want = optax.apply_updates(_params(), updates)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), params, want)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="grad_accum_steps"):
    optim.make_optimizer(_params(), lambda c: 0.1, grad_accum_steps=0)
  with pytest.raises(ValueError, match="optimizer"):
    optim.make_optimizer(_params(), lambda c: 0.1, optimizer="lion")
  with pytest.raises(ValueError, match="momentum"):
    optim.make_optimizer(_params(), lambda c: 0.1, momentum=1.0)


def test_adamw_matches_optax_adamw():
  lr_fn = optim.make_schedule(1e-2, num_steps=5)
  tx = optim.make_optimizer(_params(), lr_fn, optimizer="adamw", momentum=0.9,
                            weight_decay=0.1, bias_lr_mult=1.0, bias_weight_decay=True)
  want = _run(optax.adamw(lr_fn, b1=0.9, weight_decay=0.1), 5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), _run(tx, 5), want)
