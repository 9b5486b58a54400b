"""A tiny trained-looking run shared by the evaluate / detect / export tests.

A width-reduced one-conv-per-block trunk on 64x64 synthetic shapes with random parameters,
saved as a training checkpoint (a `train_step.TrainState` through `checkpointing.Checkpointer`) in a
temporary workdir. Import the fixture into a test module with
`from tests.evaluation.tiny_run import tiny_run  # pylint: disable=unused-import`.
"""

import dataclasses
import functools
import pathlib
import textwrap
from typing import Any

import jax
import numpy as np
import pytest

from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models import faster_rcnn
from frcnn_jax.training import checkpointing
from frcnn_jax.training import step as train_step

CONFIG_TEXT = textwrap.dedent('''\
    """Tiny test config: 64x64 shapes, width-reduced trunk."""
    from frcnn_jax.config import defaults


    def get_config():
      c = defaults.get_config()
      c.data.name = "shapes"
      c.data.shapes.num_test = 6
      c.data.shapes.image_size = 64
      c.data.min_size = 64
      c.data.max_size = 64
      c.data.pad_hw = (64, 64)
      c.data.max_gt = 8
      c.data.num_workers = 0
      c.model.vgg16.width = 1 / 16
      c.model.vgg16.convs_per_block = (1, 1, 1, 1, 1)
      c.model.vgg16.frozen_blocks = 0
      c.model.fc.dim = 32
      c.anchors.sizes = (16, 32, 64)
      c.rpn.pre_nms_top_n_test = 200
      c.rpn.post_nms_top_n_test = 20
      c.rpn.min_size = 0.0
      c.test.detections_per_image = 10
      c.test.score_threshold = 0.0
      c.eval.batch_size = 2
      return c
    ''')
STEP = 5


@dataclasses.dataclass
class TinyRun:
  config_path: pathlib.Path
  config: Any
  source: Any
  model: Any
  settings: Any
  params: Any
  workdir: pathlib.Path


def _random_params(model) -> Any:
  """He-initialised parameters without compiling `model.init` (eval_shape only)."""
  abstract = jax.eval_shape(functools.partial(faster_rcnn.init_params, model), jax.random.key(0))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['bias']"):
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(fill, abstract)
  # Sharpen the classifier so detections spread over classes and scores like a trained model's.
  params["head"]["cls"]["kernel"] *= 20.0
  # Keep box deltas small, as a trained model's are: He-scaled deltas send most boxes far past
  # the image, where clipping leaves them with no area and `test.min_size` drops them.
  params["head"]["box"]["kernel"] *= 0.01
  params["rpn"]["deltas"]["kernel"] *= 0.01
  return params


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
  root = tmp_path_factory.mktemp("tiny_run")
  config_path = root / "tiny_config.py"
  config_path.write_text(CONFIG_TEXT)
  config = config_flags.load_config(str(config_path))
  source = builders.source_from_config(config, "eval")
  model = builders.model_from_config(config, len(source.classes))
  params = _random_params(model)
  state = train_step.TrainState(params=params, opt_state={}, step=np.int32(STEP),
                           rng=np.zeros(2, np.uint32), nonfinite_skips=np.int32(0))
  workdir = root / "workdir"
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", keep=2, async_save=False)
  checkpointer.save(STEP, state)
  checkpointer.close()
  return TinyRun(config_path, config, source, model, builders.detector_settings_from_config(config),
                 params, workdir)
