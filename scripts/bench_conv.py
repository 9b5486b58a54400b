r"""Convolution and max-pool gradients: lax's against models/conv.py's and models/pool.py's.

Usage:
  python scripts/bench_conv.py --config experiments/voc.py [--height 608 --width 800] \
      [--parts layers,train,pool,train_pool] [--repeats 5] [--steps 3]

`layers`: for every distinct trained 3x3 conv of the config's model (the trunk's blocks after
`model.frozen_blocks` and the RPN conv, read from the model's parameter shapes, at the sizes its
pools give the canvas), batch 1, float32: the forward conv and the weight gradient dW, each
jitted on fixed inputs, xla and per_tap interleaved (xla, per_tap, xla, ...), so load changes hit
both alike; medians of `--repeats` and the ratio xla / per_tap (> 1: per_tap is faster). The
input gradient is lax's in both modes. The "model dW" column says which dW the model's
"per_tap" mode uses on that layer (`conv.uses_per_tap`).

`pool`: the 2x2 max pools of the config's trunk that get a gradient (after the trained blocks),
at the canvas, batch 1, float32, ceil mode as in the config, ReLU'd inputs: forward plus input
gradient (`jax.vjp`), lax's (`nn.max_pool`, a reduce-window whose gradient is XLA's
select-and-scatter) against `pool.max_pool_2x2` (the trunk's), interleaved, medians of
`--repeats`, ratio lax / pool.

`train`: the config's whole training step (`frcnn_jax.train_step.jit_train_step`: forward, backward,
optimizer update; random weights, a synthetic batch of one image filling the canvas) with
`model.conv_grad=xla` and `=per_tap`, compiled, warmed up, then `--steps` interleaved rounds.
`train_pool`: the same step with the config's `conv_grad`, its trunk pools traced once with
`nn.max_pool` (patched into `vgg.max_pool_2x2` while lowering) and once as built.

Prints tables and the 1-minute load average before and after each part; times are wall seconds
(on a shared machine compare the ratios, not the absolute times).
"""

import contextlib
import functools
import os
import statistics
import sys
import time
from typing import Any
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

from frcnn_jax.config import build as builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.config import flags as config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.models import conv  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.models import faster_rcnn  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.models import pool  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.models import vgg  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.runtime import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.runtime import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.training import step as train_step

PADDING = ((1, 1), (1, 1))
PARTS = ("layers", "train", "pool", "train_pool")


def define_flags() -> None:
  config_flags.define_config_flag()
  flags.DEFINE_integer("height", 608, "canvas height")
  flags.DEFINE_integer("width", 800, "canvas width")
  flags.DEFINE_list("parts", ["layers", "train"], f"any of {', '.join(PARTS)}")
  flags.DEFINE_integer("repeats", 5, "interleaved rounds per layer")
  flags.DEFINE_integer("steps", 3, "interleaved rounds of the training step")


def _trunk_blocks(config) -> list[tuple[int, int, bool]]:
  """(block, pools before it, trained) of the config's trunk, blocks numbered from 1."""
  num_pools = int(config.model.anchor_stride).bit_length() - 1
  return [(block, min(block - 1, num_pools), block > int(config.model.frozen_blocks))
          for block in range(1, len(vgg.BASE_CHANNELS) + 1)]


def layer_shapes(config, height: int, width: int) -> list[tuple[str, int, int, int, int]]:
  """(names, H, W, Cin, Cout) of the model's distinct trained 3x3 convs on a canvas, from the
  parameter shapes of `config`'s model and the map sizes its pools give."""
  c = config.copy_and_resolve_references()
  c.model.pretrained = ""
  model = builders.model_from_config(c, len(c.data.classes))
  params = jax.eval_shape(functools.partial(faster_rcnn.init_params, model), jax.random.key(0))
  ceil_mode = bool(c.model.pool_ceil_mode)
  size = lambda n, pools: vgg.pool_output_size(n, 2**pools, ceil_mode)
  convs = []
  for block, pools, trained in _trunk_blocks(c):
    for name, layer in params["trunk"].items():
      if trained and name.startswith(f"conv{block}_"):
        convs.append((name, size(height, pools), size(width, pools), *layer["kernel"].shape[2:]))
  stride = int(c.model.anchor_stride).bit_length() - 1
  convs.append(("rpn", size(height, stride), size(width, stride),
                *params["rpn"]["conv"]["kernel"].shape[2:]))
  grouped: dict[tuple[int, int, int, int], list[str]] = {}
  for name, *shape in convs:
    grouped.setdefault(tuple(shape), []).append(name)
  return [(", ".join(names), *shape) for shape, names in grouped.items()]


def pooled_shapes(config, height: int, width: int) -> list[tuple[str, int, int, int]]:
  """(name, H, W, C) of the inputs of the config's trunk pools that get a gradient."""
  ceil_mode = bool(config.model.pool_ceil_mode)
  num_pools = int(config.model.anchor_stride).bit_length() - 1
  channels = lambda block: vgg.scaled_channels(vgg.BASE_CHANNELS[block - 1],
                                               float(config.model.width))
  return [(f"pool{block}", *(vgg.pool_output_size(n, 2**pools, ceil_mode)
                             for n in (height, width)), channels(block))
          for block, pools, trained in _trunk_blocks(config) if trained and block <= num_pools]


def lax_max_pool_2x2(x: jax.Array, ceil_mode: bool = False) -> jax.Array:
  """`vgg.max_pool_2x2` as lax's reduce-window ([B, H, W, C] -> [B, h, w, C])."""
  pad = [(0, n % 2 if ceil_mode else 0) for n in x.shape[1:3]]
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding=pad)


@contextlib.contextmanager
def trunk_pool(pool_fn: Callable[[jax.Array, bool], jax.Array]):
  """Makes the trunk trace `pool_fn` as `vgg.max_pool_2x2` within the context."""
  built = vgg.max_pool_2x2
  vgg.max_pool_2x2 = pool_fn
  try:
    yield
  finally:
    vgg.max_pool_2x2 = built


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
  """Median wall seconds of each fn (`benchmark.interleaved_runs`, each result waited for)."""
  runs = benchmark.interleaved_runs(
      [(name, lambda fn=fn: jax.block_until_ready(fn())) for name, fn in fns.items()], rounds)
  return {name: statistics.median(wall) for name, (wall, _) in runs.items()}


def _xla_dw(x, kernel, dy):
  return jax.vjp(lambda k: conv.forward(x, k, PADDING), kernel)[1](dy)[0]


def bench_layers(config, height: int, width: int, repeats: int) -> None:
  """Prints forward and weight-gradient times per layer, xla against per_tap."""
  print(f"\nlayers at {height}x{width}, batch 1, float32, medians of {repeats} interleaved "
        f"rounds, ms (ratio = xla / per_tap); load {os.getloadavg()[0]:.2f}")
  print(f"{'layer':28} {'HxW':>8} {'Cin>Cout':>9} | {'fwd':>6} | {'dW xla':>7} {'per_tap':>7} "
        f"{'ratio':>5} | model dW")
  rng = np.random.default_rng(0)
  for name, h, w, cin, cout in layer_shapes(config, height, width):
    x = jnp.asarray(rng.normal(size=(1, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * 0.02, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(1, h, w, cout)), jnp.float32)
    jitted = {
        "fwd": jax.jit(lambda x, k, dy: conv.forward(x, k, PADDING)),
        "dW xla": jax.jit(_xla_dw),
        "dW per_tap": jax.jit(lambda x, k, dy: conv.weight_grad(x, dy, (3, 3), PADDING)),
    }
    t = interleaved({n: functools.partial(f, x, kernel, dy) for n, f in jitted.items()},
                    repeats)
    ms = {n: 1e3 * v for n, v in t.items()}
    model_dw = "per_tap" if conv.uses_per_tap((h, w)) else "xla"
    print(f"{name:28} {h:>3}x{w:<4} {cin:>4}>{cout:<4} | {ms['fwd']:6.0f} | "
          f"{ms['dW xla']:7.0f} {ms['dW per_tap']:7.0f} {ms['dW xla'] / ms['dW per_tap']:5.2f} | "
          f"{model_dw}", flush=True)
  print(f"load after: {os.getloadavg()[0]:.2f}")


def bench_pool(config, height: int, width: int, repeats: int) -> None:
  """Prints forward + input gradient times of the trained pools, lax against pool."""
  ceil_mode = bool(config.model.pool_ceil_mode)
  print(f"\npools at {height}x{width}, batch 1, float32, ceil_mode={ceil_mode}, forward + input "
        f"gradient, medians of {repeats} interleaved rounds, ms (ratio = lax / pool); "
        f"load {os.getloadavg()[0]:.2f}")
  print(f"{'pool':6} {'HxW':>8} {'C':>4} | {'lax':>7} {'pool':>7} {'ratio':>5}")
  fns = {"lax": lax_max_pool_2x2, "pool": pool.max_pool_2x2}
  rng = np.random.default_rng(0)
  for name, h, w, c in pooled_shapes(config, height, width):
    x = jnp.asarray(np.maximum(rng.normal(size=(1, h, w, c)), 0), jnp.float32)
    out_shape = (1, *(vgg.pool_output_size(n, 2, ceil_mode) for n in (h, w)), c)
    dy = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    jitted = {n: jax.jit(lambda x, dy, f=f: jax.vjp(lambda x: f(x, ceil_mode), x)[1](dy)[0])
              for n, f in fns.items()}
    t = interleaved({n: functools.partial(f, x, dy) for n, f in jitted.items()}, repeats)
    ms = {n: 1e3 * v for n, v in t.items()}
    print(f"{name:6} {h:>3}x{w:<4} {c:>4} | {ms['lax']:7.1f} {ms['pool']:7.1f} "
          f"{ms['lax'] / ms['pool']:5.2f}", flush=True)
  print(f"load after: {os.getloadavg()[0]:.2f}")


def bench_train(config, height: int, width: int, steps: int, compare: str) -> None:
  """Prints the whole training step's median seconds for the variants being compared.

  Args:
    config: the experiment config.
    height: canvas height.
    width: canvas width.
    steps: interleaved rounds.
    compare: "conv_grad" (model.conv_grad=xla against per_tap) or "pool" (the trunk's pools
      as `lax_max_pool_2x2` against `pool.max_pool_2x2`, with the config's conv_grad).
  """
  mesh = parallel.make_mesh()
  c = config.copy_and_resolve_references()
  c.model.pretrained = ""
  num_classes = len(c.data.classes)
  host = benchmark.synthetic_batch(1, height, width, c.data.max_gt, 5, num_classes)
  batch = parallel.host_batch_to_global(host, mesh)
  if compare == "conv_grad":
    variants = {mode: (mode, vgg.max_pool_2x2) for mode in conv.CONV_GRADS}
  else:
    variants = {"lax": (c.model.conv_grad, lax_max_pool_2x2),
                "pool": (c.model.conv_grad, vgg.max_pool_2x2)}
  runs, compile_s = {}, {}
  for name, (conv_grad, pool_fn) in variants.items():
    c.model.conv_grad = conv_grad
    model = builders.model_from_config(c, num_classes)
    settings = builders.detector_settings_from_config(c)
    state, tx, lr_fn = train_step.create_train_state(c, model, mesh)
    jitted = train_step.jit_train_step(model, settings, tx, lr_fn, mesh,
                                  grad_accum_steps=c.train.grad_accum_steps)
    start = time.perf_counter()
    jax.clear_caches()   # the step's inner jits would reuse the other variant's trace
    with trunk_pool(pool_fn):
      compiled = jitted.lower(state, batch).compile()
    compile_s[name] = time.perf_counter() - start
    holder = {"state": state}

    def step(compiled=compiled, holder=holder):
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics
    runs[name] = step
  load_before = os.getloadavg()[0]
  t = interleaved(runs, steps)
  print(f"\ntraining step at {height}x{width}, batch 1, {c.model.dtype}, medians of {steps} "
        f"interleaved steps after a warm-up; load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
  label = "model.conv_grad" if compare == "conv_grad" else f"pool ({c.model.conv_grad})"
  print(f"{label:16} {'step s':>8} {'compile s':>10}")
  for name in variants:
    print(f"{name:16} {t[name]:8.3f} {compile_s[name]:10.1f}")
  first, second = variants
  print(f"ratio {first} / {second}: {t[first] / t[second]:.3f}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  for name in ("height", "width", "repeats", "steps"):
    if f[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {f[name].value}")
  unknown = set(f.parts) - set(PARTS)
  if unknown:
    raise app.UsageError(f"--parts must be among {', '.join(PARTS)}; got {sorted(unknown)}")
  if host_memory.wanted(f.config.train.reuse_host_memory):
    host_memory.keep_freed_memory()   # as in train.py
  print(f"JAX {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
  if "layers" in f.parts:
    bench_layers(f.config, f.height, f.width, f.repeats)
  if "pool" in f.parts:
    bench_pool(f.config, f.height, f.width, f.repeats)
  if "train" in f.parts:
    bench_train(f.config, f.height, f.width, f.steps, "conv_grad")
  if "train_pool" in f.parts:
    bench_train(f.config, f.height, f.width, f.steps, "pool")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
