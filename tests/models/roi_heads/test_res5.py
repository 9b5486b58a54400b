"""Tests for the res5 RoI head and a width-reduced R50-C4 trained end to end."""

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax import train
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models.roi_heads import res5
from frcnn_jax.models.roi_heads.pooling import RoIPooler
from tests.plugins import common


def test_res5_head_outputs_and_frozen_batch_norm_mask():
  head = res5.Res5Head(width=1 / 32, num_classes=3, pooler=RoIPooler("roi_align", 14))
  features = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 5, 32)), jnp.float32)
  rois = jnp.tile(jnp.asarray([[0.0, 0.0, 40.0, 50.0], [8.0, 4.0, 30.0, 20.0],
                               [1.0, 2.0, 3.0, 4.0]]), (2, 1, 1))
  variables = head.init(jax.random.key(0), features, rois)
  (logits, deltas), state = head.apply(variables, features, rois, capture_intermediates=True)
  assert logits.shape == (2, 3, 4) and deltas.shape == (2, 3, 4, 4)
  assert logits.dtype == jnp.float32 and deltas.dtype == jnp.float32
  # 14 x 14 RoI features -> 7 x 7 after the stride-2 first block, 2048 * width channels.
  assert state["intermediates"]["layer4.2"]["__call__"][0].shape == (6, 7, 7, 64)
  params = variables["params"]
  assert params["cls"]["kernel"].shape == (64, 4) and params["box"]["kernel"].shape == (64, 16)
  mask = head.trainable(params)
  assert mask["cls"]["kernel"] and mask["layer4.0"]["conv2"]["kernel"]
  assert not mask["layer4.0"]["bn2"]["weight"] and not mask["layer4.1"]["bn1"]["running_var"]
  assert not mask["layer4.0"]["downsample.1"]["bias"]


def test_r50_c4_with_res5_head_trains_and_evaluates(tmp_path):
  config = config_flags.load_config(common.SHAPES, {
      **common.TINY, "model.backbone": "resnet_c4", "model.roi_head": "res5",
      "model.roi_op": "roi_align", "model.roi_size": 14, "model.input_norm": "torchvision",
      "model.resnet_c4.width": 1 / 32, "model.resnet_c4.blocks": (1, 1, 1),
      "model.res5.width": 1 / 32, "model.res5.blocks": 1})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  common.check_trained(result, config)
  params = result["params"]
  assert set(params["head"]) == {"layer4.0", "cls", "box"}
  assert params["trunk"]["layer3.0"]["conv3"]["kernel"].shape[-1] == 32
  # Frozen batch norm (weight 1, var 1 at init) neither learnt nor decayed, in trunk and head.
  np.testing.assert_array_equal(params["head"]["layer4.0"]["bn1"]["weight"], 1.0)
  np.testing.assert_array_equal(params["trunk"]["layer2.0"]["bn3"]["running_var"], 1.0)
