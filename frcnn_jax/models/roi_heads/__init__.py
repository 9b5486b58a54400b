"""RoI heads, one file each, registered by `model.roi_head` in `models.registry.ROI_HEADS`."""

from frcnn_jax.models.roi_heads import fc  # noqa: F401  pylint: disable=unused-import
from frcnn_jax.models.roi_heads import res5  # noqa: F401  pylint: disable=unused-import
