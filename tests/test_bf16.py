"""bfloat16 compute (`model.dtype = "bfloat16"`): float32 where it matters, and close to float32.

Issue 14: accelerator configs compute in bfloat16 with parameters, optimizer state, losses and
box decoding in float32, and one bf16 step's losses and gradients stay close to float32's.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.config import build as builders
from frcnn_jax.detection import detector
from frcnn_jax.models import faster_rcnn
from frcnn_jax.runtime import parallel
from frcnn_jax.training import step as train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 6
SIZE = 64


def _config(dtype: str):
  spec = importlib.util.spec_from_file_location(
      "shapes_config", os.path.join(ROOT, "experiments", "shapes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.dtype = dtype
  c.model.vgg16.width = 0.125
  c.model.fc.dim = 32
  c.rpn.pre_nms_top_n_train = 128
  c.rpn.post_nms_top_n_train = 32
  c.rpn.pre_nms_top_n_test = 128
  c.rpn.post_nms_top_n_test = 16
  c.rpn.batch_size_per_image = 64
  c.roi.batch_size_per_image = 16
  c.test.detections_per_image = 10
  return c


def _batch(batch_size: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
  """Random images with 4 random boxes each (the same arrays for both dtypes)."""
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, SIZE * 0.6, (batch_size, 8, 2))
  wh = rng.uniform(12, SIZE * 0.4, (batch_size, 8, 2))
  valid = np.broadcast_to(np.arange(8) < 4, (batch_size, 8)).copy()
  return {
      "image": rng.integers(0, 256, (batch_size, SIZE, SIZE, 3), dtype=np.uint8),
      "image_hw": np.full((batch_size, 2), SIZE, np.int32),
      "scale": np.ones(batch_size, np.float32),
      "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
      "gt_labels": np.where(valid, rng.integers(1, NUM_CLASSES + 1, (batch_size, 8)), 0
                            ).astype(np.int32),
      "gt_valid": valid,
  }


def _model(dtype: str):
  c = _config(dtype)
  return c, builders.model_from_config(c, NUM_CLASSES), builders.detector_settings_from_config(c)


def _loss_and_grads(dtype: str, params):
  _, model, settings = _model(dtype)
  fn = jax.jit(jax.value_and_grad(
      lambda p: detector.loss_fn(p, _batch(), jax.random.key(3), model=model, settings=settings),
      has_aux=True))
  (total, terms), grads = fn(params)
  return total, terms, grads


@pytest.fixture(scope="module")
def both():
  """float32 and bfloat16 losses and gradients from the same float32 parameters."""
  _, model, _ = _model("float32")
  params = faster_rcnn.init_params(model, jax.random.key(0))
  return _loss_and_grads("float32", params), _loss_and_grads("bfloat16", params)


def test_bf16_step_losses_are_close_to_float32(both):
  (total32, terms32, _), (total16, terms16, _) = both
  # Measured (2 images, this tiny model, XLA:CPU): relative differences 5e-6 .. 2e-4 per term;
  # the tolerance leaves room for other XLA versions and backends.
  assert total16.dtype == jnp.float32
  for name in detector.LOSS_TERMS:
    assert terms16[name].dtype == jnp.float32
    np.testing.assert_allclose(terms16[name], terms32[name], rtol=2e-3, err_msg=name)
  np.testing.assert_allclose(total16, total32, rtol=2e-3)
  # The same anchors and RoIs were sampled (decoding and sampling run in float32).
  assert float(terms16["rpn_positives"]) == float(terms32["rpn_positives"])
  assert float(terms16["det_foreground"]) == float(terms32["det_foreground"])


def test_bf16_gradients_are_close_to_float32_and_float32_typed(both):
  (_, _, grads32), (_, _, grads16) = both
  leaves32, leaves16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
  assert all(g.dtype == jnp.float32 for g in leaves16)
  diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(leaves32, leaves16))
  norm = sum(float(jnp.sum(a ** 2)) for a in leaves32)
  relative = (diff / norm) ** 0.5
  # Measured: 0.017-0.020 over all parameters (bf16 keeps 8 significant bits); a float32
  # program would give 0, which the lower bound rejects.
  assert 1e-4 < relative < 0.05
  cosines = {}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads32), leaves16):
    cosines[jax.tree_util.keystr(path)] = float(
        jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
  # Measured: 0.974 for conv1_1's kernel (the longest bf16 backward path), >= 0.994 elsewhere.
  assert min(cosines.values()) > 0.95, cosines
  assert np.mean(list(cosines.values())) > 0.99, cosines


def test_bf16_model_computes_convolutions_in_bf16_but_returns_float32():
  _, model, _ = _model("bfloat16")
  params = faster_rcnn.init_params(model, jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  batch = _batch()
  run = lambda p: model.apply({"params": p}, batch["image"], batch["image_hw"],
                              jnp.asarray([[[0.0, 0.0, 64.0, 64.0]]] * 2), train=False)
  lowered = jax.jit(run).lower(params)
  hlo = lowered.as_text()
  assert "bf16" in hlo and "convolution" in hlo
  outputs = lowered.compile()(params)
  assert [o.dtype for o in outputs] == [jnp.float32] * 4   # rpn logits/deltas, cls, box deltas


def test_bf16_train_state_and_step_keep_float32_params_and_optimizer_state():
  c, model, settings = _model("bfloat16")
  mesh = parallel.make_mesh()
  state, tx, lr_fn = train_step.create_train_state(c, model, mesh)
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  step = jax.jit(train_step.make_train_step(model, settings, tx, lr_fn))
  batch = parallel.host_batch_to_global({**_batch(1), "valid": np.ones(1, bool)}, mesh)
  new_state, metrics = step(state, batch)
  assert bool(metrics["finite"])
  assert {x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_bf16_predictions_decode_boxes_in_float32():
  _, model, settings = _model("bfloat16")
  params = faster_rcnn.init_params(model, jax.random.key(0))
  lowered = jax.jit(lambda p: detector.predict(p, _batch(1), model=model, settings=settings)
                    ).lower(params)
  out = lowered.compile()(params)
  assert out["boxes"].dtype == jnp.float32 and out["scores"].dtype == jnp.float32
  hlo = lowered.as_text()
  # Box decoding (exp of the deltas) stays in float32: no bf16 exponential anywhere.
  assert "exponential" in hlo
  assert not any("exponential" in line and "bf16" in line.split("exponential")[0].split("=")[-1]
                 for line in hlo.splitlines())


@pytest.mark.parametrize("argument, batch, accum", [("", 8, 1), (":16", 16, 1), (":4x2", 4, 2)])
def test_voc_accel_recipe_is_voc_in_bf16_with_the_per_image_learning_rate(argument, batch, accum):
  from frcnn_jax.config import flags as config_flags  # pylint: disable=g-import-not-at-top
  accel = config_flags.load_config(os.path.join(ROOT, "experiments", "voc_accel.py") + argument)
  voc = config_flags.load_config(os.path.join(ROOT, "experiments", "voc.py") + (argument or ":8"))
  assert accel.model.dtype == "bfloat16" and voc.model.dtype == "float32"
  assert (accel.train.batch_size, accel.train.grad_accum_steps) == (batch, accum)
  # py-faster-rcnn: 1e-3 per update of 2 images.
  assert accel.train.learning_rate == pytest.approx(1e-3 / 2 * batch * accum)
  accel.model.dtype = voc.model.dtype
  assert accel.to_dict() == voc.to_dict()   # nothing else differs
