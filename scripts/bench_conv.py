r"""Convolution and max-pool gradients: lax's against models/conv.py's and models/pool.py's.

Usage:
  python scripts/bench_conv.py --config experiments/voc.py [--height 608 --width 800] \
      [--parts layers,pointwise,train,pool,train_pool] [--repeats 5] [--steps 3]

`layers`: for every distinct trained 3x3 conv of the config's model (the trunk's blocks after
the frozen ones and the RPN conv, read from the model's parameter shapes, at the sizes its
pools give the canvas), batch 1, float32: the forward conv and the weight gradient dW, each
jitted on fixed inputs, xla and per_tap interleaved (xla, per_tap, xla, ...), so load changes hit
both alike; medians of `--repeats` and the ratio xla / per_tap (> 1: per_tap is faster). The
input gradient is lax's in both modes. The "model dW" column says which dW the model's
"per_tap" mode uses on that layer (`conv.uses_per_tap`).

`pointwise`: every distinct 1x1 convolution of the config's training step (any backbone:
recorded while tracing its loss with `model.conv_grad=per_tap`; the batch of the res5 head's
maps is its RoIs), float32: forward, and forward plus input and kernel gradients, with lax's
convolution against `conv.pointwise`'s single matmul, interleaved, medians of `--repeats`,
ratio lax / matmul (> 1: the matmul is faster).

`pool`: the 2x2 max pools of the config's trunk that get a gradient (after the trained blocks),
at the canvas, batch 1, float32, ceil mode as in the config, ReLU'd inputs: forward plus input
gradient (`jax.vjp`), lax's (`nn.max_pool`, a reduce-window whose gradient is XLA's
select-and-scatter) against `pool.max_pool_2x2` (the trunk's), interleaved, medians of
`--repeats`, ratio lax / pool.

`train`: the config's whole training step (`frcnn_jax.training.step.jit_train_step`: forward,
backward, optimizer update; random weights, a synthetic batch of one image filling the canvas)
with `model.conv_grad=xla` and `=per_tap`, compiled, warmed up, then `--steps` interleaved rounds.
`train_pool`: the same step with the config's `conv_grad`, its trunk pools traced once with
`nn.max_pool` (patched into `vgg.max_pool_2x2` while lowering) and once as built.

`layers`, `pool` and `train_pool` are VGG16's by nature (its conv blocks and 2x2 pools): with
another backbone (`model.backbone`) they are skipped with a message naming it, and the command
stops with that message when nothing else is asked; `train` works for every backbone.

The measurements are `frcnn_jax.benchmarking.conv_pool`. Prints tables and the 1-minute load
average before and after each part; times are wall seconds (on a shared machine compare the
ratios, not the absolute times).
"""

import os

import jax
from absl import app
from absl import flags

from frcnn_jax.benchmarking import conv_pool
from frcnn_jax.config import flags as config_flags
from frcnn_jax.runtime import host_memory

PARTS = ("layers", "pointwise", "train", "pool", "train_pool")
VGG16_PARTS = ("layers", "pool", "train_pool")


def define_flags() -> None:
  config_flags.define_config_flag()
  flags.DEFINE_integer("height", 608, "canvas height")
  flags.DEFINE_integer("width", 800, "canvas width")
  flags.DEFINE_list("parts", ["layers", "train"], f"any of {', '.join(PARTS)}")
  flags.DEFINE_integer("repeats", 5, "interleaved rounds per layer")
  flags.DEFINE_integer("steps", 3, "interleaved rounds of the training step")


def print_layers(config, height: int, width: int, repeats: int) -> None:
  """Prints forward and weight-gradient times per layer, xla against per_tap."""
  print(f"\nlayers at {height}x{width}, batch 1, float32, medians of {repeats} interleaved "
        f"rounds, ms (ratio = xla / per_tap); load {os.getloadavg()[0]:.2f}")
  print(f"{'layer':28} {'HxW':>8} {'Cin>Cout':>9} | {'fwd':>6} | {'dW xla':>7} {'per_tap':>7} "
        f"{'ratio':>5} | model dW")
  for r in conv_pool.layer_times(config, height, width, repeats):
    ms = {n: 1e3 * r[n] for n in ("fwd", "dW xla", "dW per_tap")}
    print(f"{r['name']:28} {r['h']:>3}x{r['w']:<4} {r['cin']:>4}>{r['cout']:<4} | "
          f"{ms['fwd']:6.0f} | {ms['dW xla']:7.0f} {ms['dW per_tap']:7.0f} "
          f"{ms['dW xla'] / ms['dW per_tap']:5.2f} | {r['model_dw']}", flush=True)
  print(f"load after: {os.getloadavg()[0]:.2f}")


def print_pointwise(config, height: int, width: int, repeats: int) -> None:
  """Prints forward and forward + gradient times per 1x1 convolution, lax against matmul."""
  print(f"\n1x1 convolutions of the training step at {height}x{width}, float32, medians of "
        f"{repeats} interleaved rounds, ms (ratio = lax / matmul); load "
        f"{os.getloadavg()[0]:.2f}")
  print(f"{'BxHxW':>14} {'Cin>Cout':>10} {'stride':>6} {'n':>2} | {'fwd lax':>8} {'matmul':>7} "
        f"{'ratio':>5} | {'all lax':>8} {'matmul':>7} {'ratio':>5}")
  for r in conv_pool.pointwise_times(config, height, width, repeats):
    b, h, w, cin = r["x"]
    ms = {n: 1e3 * r[n] for n in ("fwd lax", "fwd matmul", "all lax", "all matmul")}
    bhw, channels = f"{b}x{h}x{w}", f"{cin}>{r['cout']}"
    print(f"{bhw:>14} {channels:>10} "
          f"{'x'.join(map(str, r['strides'])):>6} {r['count']:>2} | {ms['fwd lax']:8.1f} "
          f"{ms['fwd matmul']:7.1f} {ms['fwd lax'] / ms['fwd matmul']:5.2f} | "
          f"{ms['all lax']:8.1f} {ms['all matmul']:7.1f} {ms['all lax'] / ms['all matmul']:5.2f}",
          flush=True)
  print(f"load after: {os.getloadavg()[0]:.2f}")


def print_pools(config, height: int, width: int, repeats: int) -> None:
  """Prints forward + input gradient times of the trained pools, lax against pool."""
  ceil_mode = bool(conv_pool.model_of(config).trunk.pool_ceil_mode)
  print(f"\npools at {height}x{width}, batch 1, float32, ceil_mode={ceil_mode}, forward + input "
        f"gradient, medians of {repeats} interleaved rounds, ms (ratio = lax / pool); "
        f"load {os.getloadavg()[0]:.2f}")
  print(f"{'pool':6} {'HxW':>8} {'C':>4} | {'lax':>7} {'pool':>7} {'ratio':>5}")
  for r in conv_pool.pool_times(config, height, width, repeats):
    print(f"{r['name']:6} {r['h']:>3}x{r['w']:<4} {r['c']:>4} | {1e3 * r['lax']:7.1f} "
          f"{1e3 * r['pool']:7.1f} {r['lax'] / r['pool']:5.2f}", flush=True)
  print(f"load after: {os.getloadavg()[0]:.2f}")


def print_train(config, height: int, width: int, steps: int, compare: str) -> None:
  """Prints the whole training step's median seconds for the variants compared
  (`conv_pool.train_step_times`)."""
  load_before = os.getloadavg()[0]
  times, compile_s = conv_pool.train_step_times(config, height, width, steps, compare)
  print(f"\ntraining step at {height}x{width}, batch 1, {config.model.dtype}, medians of {steps} "
        f"interleaved steps after a warm-up; load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
  label = "model.conv_grad" if compare == "conv_grad" else f"pool ({config.model.conv_grad})"
  print(f"{label:16} {'step s':>8} {'compile s':>10}")
  for name in times:
    print(f"{name:16} {times[name]:8.3f} {compile_s[name]:10.1f}")
  first, second = times
  print(f"ratio {first} / {second}: {times[first] / times[second]:.3f}")


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
  parts = list(f.parts)
  vgg16_parts = [p for p in parts if p in VGG16_PARTS]
  reason = conv_pool.vgg16_only(f.config) if vgg16_parts else None
  if reason:
    parts = [p for p in parts if p not in VGG16_PARTS]
    if not parts:
      raise app.UsageError(f"--parts {','.join(vgg16_parts)}: {reason}")
    print(f"skipped --parts {','.join(vgg16_parts)}: {reason}", flush=True)
  if host_memory.wanted(f.config.train.reuse_host_memory):
    host_memory.keep_freed_memory()   # as in training
  print(f"JAX {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
  if "layers" in parts:
    print_layers(f.config, f.height, f.width, f.repeats)
  if "pointwise" in parts:
    print_pointwise(f.config, f.height, f.width, f.repeats)
  if "pool" in parts:
    print_pools(f.config, f.height, f.width, f.repeats)
  if "train" in parts:
    print_train(f.config, f.height, f.width, f.steps, "conv_grad")
  if "train_pool" in parts:
    print_train(f.config, f.height, f.width, f.steps, "pool")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
