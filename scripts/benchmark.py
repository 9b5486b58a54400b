"""Times the detector with random weights: a training step and inference, per image.

Usage:
  python scripts/benchmark.py --config experiments/X.py [--height 600 --width 800] [--batch 1]
      [--steps 5] [--config.model.dtype=bfloat16 ...]

The config is loaded as train.py does (`frcnn_jax.config_flags`: a config file plus
`--config.key=value` overrides). The training step is forward + backward + the config's
optimizer update (`builders.optimizer_from_config`: frozen blocks masked) under one jit; inference is `detector.predict` (image in, detections out). Each
is compiled first (compile time reported), run once to warm up, then `--steps` times; the
median wall time divided by the batch size is reported. The last line of the output is one
JSON object: {"train_step_s", "infer_s", "compile_s", "train_compile_s", "infer_compile_s",
"peak_memory_mib", "device", "height", "width", "batch", ...}.
"""

import functools
import json
import os
import resource
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from frcnn_jax import builders
from frcnn_jax import config_flags
from frcnn_jax import detector
from frcnn_jax.models import faster_rcnn

_CONFIG = config_flags.define_config_flag()
_HEIGHT = flags.DEFINE_integer("height", None, "Canvas height (default: data.pad_hw[0]).")
_WIDTH = flags.DEFINE_integer("width", None, "Canvas width (default: data.pad_hw[1]).")
_BATCH = flags.DEFINE_integer("batch", 1, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed repetitions (after one warm-up run).")
_NUM_GT = flags.DEFINE_integer("num_gt", 5, "Valid ground-truth boxes per image.")


def synthetic_batch(batch: int, height: int, width: int, max_gt: int, num_gt: int,
                    num_classes: int, seed: int = 0) -> dict:
  """A Batch of random images filling the canvas, each with `num_gt` random boxes."""
  rng = np.random.default_rng(seed)
  x1 = rng.uniform(0, width * 0.6, (batch, max_gt))
  y1 = rng.uniform(0, height * 0.6, (batch, max_gt))
  w = rng.uniform(32, width * 0.4, (batch, max_gt))
  h = rng.uniform(32, height * 0.4, (batch, max_gt))
  valid = np.arange(max_gt)[None, :] < min(num_gt, max_gt)
  valid = np.broadcast_to(valid, (batch, max_gt)).copy()
  return {
      "image": rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
      "image_hw": np.tile(np.asarray([[height, width]], np.int32), (batch, 1)),
      "scale": np.ones(batch, np.float32),
      "gt_boxes": np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32),
      "gt_labels": np.where(valid, rng.integers(1, num_classes + 1, (batch, max_gt)), 0
                            ).astype(np.int32),
      "gt_valid": valid,
      "gt_difficult": np.zeros((batch, max_gt), bool),
      "image_id": np.arange(batch, dtype=np.int32),
      "orig_hw": np.tile(np.asarray([[height, width]], np.int32), (batch, 1)),
      "valid": np.ones(batch, bool),
  }


def _time(fn, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _peak_memory_mib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (e.g. experiments/voc07.py)")
  height = _HEIGHT.value or config.data.pad_hw[0]
  width = _WIDTH.value or config.data.pad_hw[1]
  num_classes = len(config.data.classes)
  model = builders.model_from_config(config, num_classes)
  settings = builders.detector_settings_from_config(config)
  params = faster_rcnn.init_params(model, jax.random.key(config.seed))
  optimizer, _ = builders.optimizer_from_config(config, params, model)
  opt_state = optimizer.init(params)
  batch = jax.device_put(synthetic_batch(_BATCH.value, height, width, config.data.max_gt,
                                         _NUM_GT.value, num_classes))

  def train_step(params, opt_state, batch, key):
    grads, terms = jax.grad(detector.loss_fn, has_aux=True)(params, batch, key, model=model,
                                                            settings=settings)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, terms

  key = jax.random.key(0)
  start = time.perf_counter()
  train = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, batch,
                                                          key).compile()
  train_compile = time.perf_counter() - start
  start = time.perf_counter()
  predict = functools.partial(detector.predict, model=model, settings=settings)
  infer = jax.jit(predict).lower(params, batch).compile()
  infer_compile = time.perf_counter() - start

  state = {"params": params, "opt_state": opt_state}

  def run_train():
    state["params"], state["opt_state"], terms = train(state["params"], state["opt_state"],
                                                       batch, key)
    return terms

  run_train()
  train_times = _time(run_train, _STEPS.value)
  jax.block_until_ready(infer(state["params"], batch))
  infer_times = _time(lambda: infer(state["params"], batch), _STEPS.value)

  result = {
      "train_step_s": statistics.median(train_times) / _BATCH.value,
      "infer_s": statistics.median(infer_times) / _BATCH.value,
      "compile_s": train_compile + infer_compile,
      "train_compile_s": train_compile,
      "infer_compile_s": infer_compile,
      "peak_memory_mib": _peak_memory_mib(),
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
      "num_devices": jax.device_count(),
      "height": height, "width": width, "batch": _BATCH.value, "steps": _STEPS.value,
      "dtype": config.model.dtype, "roi_op": config.model.roi_op,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  print(f"train step: {result['train_step_s']:.3f} s/image (runs: "
        f"{', '.join(f'{t:.3f}' for t in train_times)}), compile {train_compile:.1f} s")
  print(f"inference:  {result['infer_s']:.3f} s/image (runs: "
        f"{', '.join(f'{t:.3f}' for t in infer_times)}), compile {infer_compile:.1f} s")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags.parse_flags)
