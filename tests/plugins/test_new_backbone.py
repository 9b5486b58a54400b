"""A new backbone is one file: this one, through public names only, then train and evaluate."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from frcnn_jax import train
from frcnn_jax.config import flags as config_flags
from frcnn_jax.config.fields import setting
from frcnn_jax.models.registry import BACKBONES
from tests.plugins import common


class PlainConv(nn.Module):
  """Two 3x3 convs with a 2x2 pool after each: stride 4, `channels` wide, nothing frozen."""
  channels: int = setting(8, "width of both convolutions", minimum=1)
  frozen: bool = setting(False, "no gradient into the convolutions", role="training")
  conv_grad: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  input_norms = ("torchvision",)
  all_frozen = {"frozen": True}
  pretrained_hint = "plain_conv has no pretrained weights"

  @property
  def stride(self) -> int:
    return 4

  @property
  def out_channels(self) -> int:
    return self.channels

  def output_hw(self, height: int, width: int) -> tuple[int, int]:
    return height // 4, width // 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in (1, 2):
      x = nn.relu(nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype,
                          name=f"conv{i}")(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    return jax.lax.stop_gradient(x) if self.frozen else x

  def trainable(self, params: Any) -> Any:
    return jax.tree.map(lambda _: not self.frozen, params)

  def load_pretrained(self, params: Any, path: str, input_norm: str) -> Any:
    raise ValueError(f"{path}: plain_conv has no pretrained weights")


@pytest.fixture
def registered():
  BACKBONES.register("plain_conv")(PlainConv)
  yield
  BACKBONES.unregister("plain_conv")


@pytest.mark.slow
def test_a_registered_backbone_trains_and_evaluates(registered, tmp_path):
  del registered
  config = config_flags.load_config(common.SHAPES, {
      **common.TINY, "model.backbone": "plain_conv", "model.plain_conv.channels": 8})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  common.check_trained(result, config)
  params = result["params"]
  assert set(params["trunk"]) == {"conv1", "conv2"}
  assert params["rpn"]["conv"]["kernel"].shape[2] == 8   # the RPN follows the backbone


def test_an_unregistered_backbone_is_named(tmp_path):
  with pytest.raises(ValueError, match="model.backbone"):
    config_flags.load_config(common.SHAPES, {**common.TINY, "model.backbone": "plain_conv"})
