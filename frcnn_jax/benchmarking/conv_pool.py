"""Convolution weight gradients and max-pool gradients: lax's against the trunk's own.

Layers: every distinct trained 3x3 conv of a config's model (its VGG16 trunk's blocks after
the frozen ones and the RPN conv, read from the model's parameter shapes, at the sizes
its pools give the canvas), batch 1, float32: the forward conv and the weight gradient dW,
lax's (`jax.vjp`) against `frcnn_jax.models.conv.weight_grad` ("per_tap"). Pools: the trunk's
2x2 max pools that get a gradient, forward plus input gradient, lax's reduce-window
(`nn.max_pool`, whose gradient is XLA's select-and-scatter) against
`frcnn_jax.models.pool.max_pool_2x2`. Training step: the config's whole step with either
`model.conv_grad`, or with its pools traced either way. Everything is timed in interleaved
rounds (`timing.interleaved_medians`).

Pointwise: every distinct 1x1 convolution the config's training loss runs with
`model.conv_grad=per_tap` (recorded while tracing it, so the res5 head's batches of RoIs and
the FPN's lateral convolutions are included), forward and forward plus both gradients, lax's
convolution against `conv.pointwise` (one matmul).

The layer table, the pools and the pool variant of the step are VGG16's by nature (its conv
blocks, its 2x2 pools, `vgg.max_pool_2x2` patched while tracing): for another backbone they
raise ValueError with `vgg16_only`'s message. The conv_grad variant of the step works for every
backbone.
"""

import contextlib
import functools
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import timing
from frcnn_jax.config import build as builders
from frcnn_jax.detection import detector
from frcnn_jax.models import conv
from frcnn_jax.models import faster_rcnn
from frcnn_jax.models import pool
from frcnn_jax.models.backbones import vgg16 as vgg
from frcnn_jax.runtime import parallel
from frcnn_jax.training import step as train_step

PADDING = ((1, 1), (1, 1))


def model_of(config: ml_collections.ConfigDict) -> faster_rcnn.FasterRCNN:
  """The config's detector without pretrained weights (built, not initialised)."""
  c = config.copy_and_resolve_references()
  c.model.pretrained = ""
  return builders.model_from_config(c, cases.num_classes(c))


def vgg16_only(config: ml_collections.ConfigDict) -> str | None:
  """Why the VGG16-only measurements (the layer table, the pools, the step with lax's pools)
  cannot run for `config`, naming its backbone; None for a VGG16 trunk."""
  if isinstance(model_of(config).trunk, vgg.VGG16):
    return None
  return (f"model.backbone={config.model.backbone}: the per-layer conv table and the pool "
          "comparison read a VGG16 trunk (its conv blocks and 2x2 max pools) and have no "
          f"{config.model.backbone} version; the whole-step comparison of model.conv_grad "
          "(--parts train) works for every backbone")


def _require_vgg16(config: ml_collections.ConfigDict) -> None:
  reason = vgg16_only(config)
  if reason:
    raise ValueError(reason)


def _trunk_blocks(trunk: vgg.VGG16) -> list[tuple[int, int, bool]]:
  """(block, pools before it, trained) of a VGG16 trunk, blocks numbered from 1."""
  num_pools = int(trunk.stride).bit_length() - 1
  return [(block, min(block - 1, num_pools), block > int(trunk.frozen_blocks))
          for block in range(1, len(vgg.BASE_CHANNELS) + 1)]


def layer_shapes(config: ml_collections.ConfigDict, height: int, width: int
                 ) -> list[tuple[str, int, int, int, int]]:
  """(names, H, W, Cin, Cout) of the model's distinct trained 3x3 convs on a canvas, from the
  parameter shapes of `config`'s model (a VGG16 trunk) and the map sizes its pools give;
  layers of the same shape share a row, their names joined by ", ".

  Raises:
    ValueError: the trunk is not VGG16 (`vgg16_only`).
  """
  _require_vgg16(config)
  model = model_of(config)
  trunk = model.trunk
  params = jax.eval_shape(functools.partial(faster_rcnn.init_params, model), jax.random.key(0))
  size = lambda n, pools: vgg.pool_output_size(n, 2**pools, bool(trunk.pool_ceil_mode))
  convs = []
  for block, pools, trained in _trunk_blocks(trunk):
    for name, layer in params["trunk"].items():
      if trained and name.startswith(f"conv{block}_"):
        convs.append((name, size(height, pools), size(width, pools), *layer["kernel"].shape[2:]))
  stride = int(trunk.stride).bit_length() - 1
  convs.append(("rpn", size(height, stride), size(width, stride),
                *params["rpn"]["conv"]["kernel"].shape[2:]))
  grouped: dict[tuple[int, int, int, int], list[str]] = {}
  for name, *shape in convs:
    grouped.setdefault(tuple(shape), []).append(name)
  return [(", ".join(names), *shape) for shape, names in grouped.items()]


def pooled_shapes(config: ml_collections.ConfigDict, height: int, width: int
                  ) -> list[tuple[str, int, int, int]]:
  """(name, H, W, C) of the inputs of the config's trunk pools that get a gradient.

  Raises:
    ValueError: the trunk is not VGG16 (`vgg16_only`).
  """
  _require_vgg16(config)
  trunk = model_of(config).trunk
  num_pools = int(trunk.stride).bit_length() - 1
  channels = lambda block: vgg.scaled_channels(vgg.BASE_CHANNELS[block - 1], float(trunk.width))
  return [(f"pool{block}", *(vgg.pool_output_size(n, 2**pools, bool(trunk.pool_ceil_mode))
                             for n in (height, width)), channels(block))
          for block, pools, trained in _trunk_blocks(trunk) if trained and block <= num_pools]


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


def pointwise_shapes(config: ml_collections.ConfigDict, height: int, width: int
                     ) -> list[dict[str, Any]]:
  """The distinct 1x1 convolutions of the config's training loss on a one-image canvas.

  Traces `detector.loss_fn` abstractly (`jax.eval_shape`) with `model.conv_grad=per_tap`,
  recording every `conv.pointwise` call.

  Returns:
    [{"x": (B, H, W, Cin), "cout", "strides", "count"}] in tracing order, count the number of
    layers of that shape (frozen ones included: their forward runs).
  """
  c = config.copy_and_resolve_references()
  c.model.pretrained = ""
  c.model.conv_grad = "per_tap"
  num_classes = cases.num_classes(c)
  model = builders.model_from_config(c, num_classes)
  settings = builders.detector_settings_from_config(c)
  host = cases.synthetic_batch(1, height, width, c.data.max_gt, 5, num_classes)
  key = jax.random.key(0)
  params = jax.eval_shape(functools.partial(faster_rcnn.init_params, model), key)
  seen: dict[tuple[Any, ...], int] = {}
  built = conv.pointwise

  def recording(x, kernel, precision=None, strides=(1, 1)):
    shape = (tuple(x.shape), int(kernel.shape[-1]), tuple(strides))
    seen[shape] = seen.get(shape, 0) + 1
    return built(x, kernel, precision, strides)
  conv.pointwise = recording
  try:
    jax.eval_shape(lambda p, b: detector.loss_fn(p, b, key, model=model, settings=settings),
                   params, {k: jnp.asarray(v) for k, v in host.items()})
  finally:
    conv.pointwise = built
  return [{"x": x, "cout": cout, "strides": strides, "count": n}
          for (x, cout, strides), n in seen.items()]


def pointwise_times(config: ml_collections.ConfigDict, height: int, width: int, repeats: int
                    ) -> Iterator[dict[str, Any]]:
  """Per `pointwise_shapes` row, as it is measured: the row plus median seconds of
  `repeats` interleaved rounds, "fwd lax", "fwd matmul" (the forward alone), "all lax", "all
  matmul" (forward plus input and kernel gradients, `jax.vjp`), float32 random inputs."""
  rng = np.random.default_rng(0)
  for row in pointwise_shapes(config, height, width):
    b, h, w, cin = row["x"]
    sh, sw = row["strides"]
    x = jnp.asarray(rng.normal(size=row["x"]), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(1, 1, cin, row["cout"])) * 0.02, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(b, -(-h // sh), -(-w // sw), row["cout"])), jnp.float32)
    fns = {"lax": lambda x, k: conv.forward(x, k, ((0, 0), (0, 0)), strides=(sh, sw)),
           "matmul": lambda x, k: conv.pointwise(x, k, strides=(sh, sw))}
    jitted = {}
    for name, fn in fns.items():
      jitted[f"fwd {name}"] = jax.jit(lambda x, k, dy, fn=fn: fn(x, k))
      jitted[f"all {name}"] = jax.jit(
          lambda x, k, dy, fn=fn: (lambda y, vjp: (y, vjp(dy)))(*jax.vjp(fn, x, k)))
    times = timing.interleaved_medians(
        {n: functools.partial(f, x, kernel, dy) for n, f in jitted.items()}, repeats)
    yield {**row, **times}


def _xla_dw(x, kernel, dy):
  return jax.vjp(lambda k: conv.forward(x, k, PADDING), kernel)[1](dy)[0]


def layer_times(config: ml_collections.ConfigDict, height: int, width: int, repeats: int
                ) -> Iterator[dict[str, Any]]:
  """Per `layer_shapes` row, as it is measured: {"name", "h", "w", "cin", "cout", "fwd",
  "dW xla", "dW per_tap" (median seconds of `repeats` interleaved rounds), "model_dw" (the dW
  the model's "per_tap" mode uses there: "per_tap" or "xla", `conv.uses_per_tap`)}."""
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
    times = timing.interleaved_medians(
        {n: functools.partial(f, x, kernel, dy) for n, f in jitted.items()}, repeats)
    yield {"name": name, "h": h, "w": w, "cin": cin, "cout": cout, **times,
           "model_dw": "per_tap" if conv.uses_per_tap((h, w)) else "xla"}


def pool_times(config: ml_collections.ConfigDict, height: int, width: int, repeats: int
               ) -> Iterator[dict[str, Any]]:
  """Per `pooled_shapes` row, as it is measured: {"name", "h", "w", "c", "lax", "pool"}: median
  seconds of forward plus input gradient on ReLU'd inputs (ceil mode as in the config).

  Raises:
    ValueError: the trunk is not VGG16 (`vgg16_only`).
  """
  _require_vgg16(config)
  ceil_mode = bool(model_of(config).trunk.pool_ceil_mode)
  fns = {"lax": lax_max_pool_2x2, "pool": pool.max_pool_2x2}
  rng = np.random.default_rng(0)
  for name, h, w, c in pooled_shapes(config, height, width):
    x = jnp.asarray(np.maximum(rng.normal(size=(1, h, w, c)), 0), jnp.float32)
    out_shape = (1, *(vgg.pool_output_size(n, 2, ceil_mode) for n in (h, w)), c)
    dy = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    jitted = {n: jax.jit(lambda x, dy, f=f: jax.vjp(lambda x: f(x, ceil_mode), x)[1](dy)[0])
              for n, f in fns.items()}
    times = timing.interleaved_medians(
        {n: functools.partial(f, x, dy) for n, f in jitted.items()}, repeats)
    yield {"name": name, "h": h, "w": w, "c": c, **times}


def train_step_times(config: ml_collections.ConfigDict, height: int, width: int, steps: int,
                     compare: str) -> tuple[dict[str, float], dict[str, float]]:
  """The whole training step's median seconds for two variants, timed interleaved.

  One image filling the canvas, random weights; each variant compiled, warmed up, then
  `steps` interleaved rounds.

  Args:
    config: the experiment config.
    height: canvas height.
    width: canvas width.
    steps: interleaved rounds.
    compare: "conv_grad" (model.conv_grad "xla" against "per_tap") or "pool" (the trunk's
      pools as `lax_max_pool_2x2` ("lax") against `pool.max_pool_2x2` ("pool"), with the
      config's conv_grad).

  Returns:
    ({variant: median step seconds}, {variant: compile seconds}), variants in that order.

  Raises:
    ValueError: compare="pool" and the trunk is not VGG16 (`vgg16_only`).
  """
  if compare != "conv_grad":
    _require_vgg16(config)
  mesh = parallel.make_mesh()
  c = config.copy_and_resolve_references()
  c.model.pretrained = ""
  num_classes = cases.num_classes(c)
  host = cases.synthetic_batch(1, height, width, c.data.max_gt, 5, num_classes)
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
  return timing.interleaved_medians(runs, steps), compile_s
