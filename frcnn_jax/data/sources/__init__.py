"""Dataset sources, one file each, registered by `data.name` in `base.SOURCES`.

A new dataset is one file here that registers its settings class (see `base.SOURCES`) and
one import line below.
"""

from frcnn_jax.data.sources import coco_json  # noqa: F401  pylint: disable=unused-import
from frcnn_jax.data.sources import shapes  # noqa: F401  pylint: disable=unused-import
from frcnn_jax.data.sources import voc_folder  # noqa: F401  pylint: disable=unused-import
from frcnn_jax.data.sources import voc_tfds  # noqa: F401  pylint: disable=unused-import
