"""A new RoI head is one file: this one, through public names only, then train and evaluate."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from frcnn_jax import train
from frcnn_jax.config import flags as config_flags
from frcnn_jax.config.fields import setting
from frcnn_jax.models.registry import ROI_HEADS
from frcnn_jax.models.roi_heads.pooling import RoIPooler
from tests.plugins import common


class MeanPoolHead(nn.Module):
  """RoI features averaged over the bins, one hidden layer, then the class and box layers."""
  hidden: int = setting(16, "width of the hidden layer", minimum=1)
  num_classes: int = 1
  pooler: RoIPooler = RoIPooler()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, rois: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    del train
    x = jax.vmap(self.pooler)(features, rois).mean(axis=(2, 3))   # [B, R, C]
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    logits = nn.Dense(self.num_classes + 1, name="cls")(x)
    deltas = nn.Dense(4 * (self.num_classes + 1), name="box",
                      kernel_init=nn.initializers.normal(0.001))(x)
    return logits, deltas.reshape(*rois.shape[:2], self.num_classes + 1, 4)


@pytest.fixture
def registered():
  ROI_HEADS.register("mean_pool")(MeanPoolHead)
  yield
  ROI_HEADS.unregister("mean_pool")


@pytest.mark.slow
def test_a_registered_roi_head_trains_and_evaluates(registered, tmp_path):
  del registered
  config = config_flags.load_config(common.SHAPES, {
      **common.TINY, "model.roi_head": "mean_pool", "model.mean_pool.hidden": 12})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  common.check_trained(result, config)
  head = result["params"]["head"]
  assert set(head) == {"hidden", "cls", "box"}
  assert head["hidden"]["kernel"].shape[1] == 12 and head["cls"]["kernel"].shape[1] == 7
