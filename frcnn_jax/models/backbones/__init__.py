"""Backbones, one file each, registered by `model.backbone` in `models.registry.BACKBONES`."""

from frcnn_jax.models.backbones import resnet  # noqa: F401  pylint: disable=unused-import
from frcnn_jax.models.backbones import resnet_fpn  # noqa: F401  pylint: disable=unused-import
from frcnn_jax.models.backbones import vgg16  # noqa: F401  pylint: disable=unused-import
from frcnn_jax.models.backbones import zf  # noqa: F401  pylint: disable=unused-import
