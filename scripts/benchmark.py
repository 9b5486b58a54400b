r"""Speed of the detector with random weights: images/s, compile time, memory, FLOPs and MFU.

Usage:
  python scripts/benchmark.py --config experiments/X.py [--height 600 --width 800] [--batch 1]
      [--steps 5] [--config.model.dtype=bfloat16 ...]
  python scripts/benchmark.py --config experiments/voc.py --sizes 600x800,600x1000 \
      --batch 1,2,4 --dtype float32,bfloat16 [--peer]
  python scripts/benchmark.py --config experiments/voc.py --sweep \
      [--sweep_sizes 300x500,450x750,600x1000] [--sweep_proposals 100,300,1000]
  python scripts/benchmark.py --config experiments/voc.py --mix voc07 [--mix_canvases 1,2,3,4] \
      [--mix_single 1000x1000] [--steps 3] [--peer [--peer_sizes 4]]

The config is loaded as train.py loads it (a config file plus `--config.key=value` overrides);
`model.pretrained` is ignored (random weights) and `train.reuse_host_memory` applies as in
training (frcnn_jax/runtime/host_memory.py). Every combination of `--dtype`, `--sizes` and
`--batch` (images per device; the global batch spans every device, sharded as in training) is
one row. `--sweep` instead shows how the cost grows with pixels (training and inference at each
of `--sweep_sizes`) and with the number of proposals (inference at the first sweep size for each
`rpn.post_nms_top_n_test` in `--sweep_proposals`).

Per row: the training step is `frcnn_jax.train_step.make_train_step` (forward, backward, the config's
optimizer update, frozen blocks masked) jitted over the data mesh with the state donated, as in
training; inference is `detector.predict` (image in, detections out). Each is lowered and
compiled (compile time), run once to warm up, then `--steps` times with block_until_ready; the
median is reported as seconds per image and images/s. FLOPs come from XLA's cost analysis of
the compiled program (of one device's program; `frcnn_jax.flops`), MFU = achieved FLOP/s / the
device's own matmul peak measured in the same run (a large product in each dtype, the best of a
measurement before and after the rows). On CPU, where other processes may take cores away,
the same ratio is also given per process-CPU-second ("CPU-time MFU": FLOPs per CPU-second over
the matmul's FLOPs per CPU-second) with the cores the row actually used. Memory: the compiled
program's buffers (`memory_analysis`: arguments + outputs + temporaries - aliased), and the
peak so far in this process: `device.memory_stats()["peak_bytes_in_use"]` where the device
reports it (GPU, TPU), else the process's peak RSS (CPU); the JSON says which.

`--peer` times torchvision's Faster R-CNN built the same way (`scripts/peer_torchvision.py`) on
the same device, sizes, dtypes and batch in this run and prints both and their ratio; without
torch/torchvision it says so and continues. On GPU it runs before our rows, with JAX's memory
preallocation off, so that both fit.

`--mix` (dataset-shaped mode, issue 11): the old single canvas (`--mix_single`, default
`data.pad_hw`) against K chosen canvases for each K of `--mix_canvases`, over a mix of image
sizes: `voc07` (the sizes of the 4952 VOC2007 test images, benchmarks/voc2007_test_sizes.txt:
42% 500x375 landscape, 15% 500x333, 8% 375x500 portrait, ...), `train` / `eval` (every record
of the config's dataset split, sizes from `annotation(i)` without decoding, e.g.
`--config.data.name=voc_folder --config.data.data_dir=DIR`), or a list of original sizes
`HxW:count,...`. Each size is resized by `data.min_size` / `data.max_size`
(`canvases.resized_hw`); the K canvases are `canvases.choose_canvases` (multiples of
`--mix_multiple`) and each image goes to the smallest canvas that holds it. Per layout: the
useful pixel fraction (image pixels / canvas pixels), the share of images per canvas, and the
per-image training and inference seconds over the mix = sum over canvases of (share) x
(seconds per image on that canvas), each canvas timed once (one image per device per step,
on a synthetic image of the canvas's most frequent content size, zero padding beyond).
Content MFU counts only useful FLOPs: XLA's count for a program whose canvas is exactly the
image (no padding), at the `--flop_sizes` most frequent content sizes plus the smallest and
the largest (and any that equal a canvas), the other sizes on the least-squares line in the
pixel count through those; FLOPs x content fraction would undercount (the RoI head's FLOPs
do not shrink with the padding). The train step, the predict program and, with `--peer`,
torchvision at its own size for each of the `--peer_sizes` most frequent sizes (batch 1, no
canvas: `peer_torchvision.size_runners`) are all warmed up, then timed in `--steps`
interleaved rounds (every program once per round), so that load changes on the shared CPU hit
both alike. torchvision's seconds for the untimed sizes lie on the line in the pixel count
through the timed ones; the "timed sizes" speed-up compares both on the timed sizes' images
only. The last line is one JSON object ("layouts", "canvases", "peer", "targets", ...).

Output: a progress line per row, then a table; the last line is one JSON object whose top-level
keys are the first row's (issue 3's contract: "train_step_s", "infer_s" (seconds per image:
the step's median wall time over the global batch), "compile_s", "device", "height", "width",
...; "train_step_time_s" / "infer_step_time_s" are whole steps) plus "rows" (every row),
"matmul_peak", "machine" and "peer".
"""

import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags

from frcnn_jax import flops
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.data import canvases
from frcnn_jax.data import images
from frcnn_jax.detection import detector
from frcnn_jax.models import vgg
from frcnn_jax.runtime import host_memory
from frcnn_jax.runtime import parallel
from frcnn_jax.training import step as train_step

PARTS = ("train", "infer")


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: importing defines none)."""
  config_flags.define_config_flag()
  flags.DEFINE_integer("height", None, "Canvas height (default: data.pad_hw[0]).")
  flags.DEFINE_integer("width", None, "Canvas width (default: data.pad_hw[1]).")
  flags.DEFINE_list("sizes", None, "Canvas sizes HxW, e.g. 600x800,600x1000 (instead of "
                    "--height/--width).")
  flags.DEFINE_list("batch", ["1"], "Images per device per step, e.g. 1,2,4.")
  flags.DEFINE_list("dtype", None, "Compute dtypes, e.g. float32,bfloat16 (default: "
                    "model.dtype).")
  flags.DEFINE_integer("steps", 5, "Timed repetitions (after one warm-up run).")
  flags.DEFINE_integer("num_gt", 5, "Valid ground-truth boxes per image.")
  flags.DEFINE_list("parts", list(PARTS), "What to time: train, infer or both.")
  flags.DEFINE_bool("sweep", False, "Sweep image sizes and proposal counts instead of the "
                    "--sizes x --batch x --dtype grid.")
  flags.DEFINE_list("sweep_sizes", ["300x500", "450x750", "600x1000"], "Sizes of the --sweep.")
  flags.DEFINE_list("sweep_proposals", ["100", "300", "1000"],
                    "rpn.post_nms_top_n_test values of the --sweep.")
  flags.DEFINE_bool("peer", False, "Also time torchvision's Faster R-CNN "
                    "(scripts/peer_torchvision.py) and print the ratios.")
  flags.DEFINE_integer("peak_size", 0, "Matrix side of the matmul-peak measurement (0: 2048 on "
                       "CPU, 8192 on accelerators).")
  flags.DEFINE_string("mix", None, "Dataset-shaped mode over a size mix: voc07 (VOC2007 test "
                      "sizes), train / eval (the config's dataset split, from annotation(i)) or "
                      "original sizes HxW:count,...")
  flags.DEFINE_list("mix_canvases", ["1", "2", "3", "4"], "--mix: the K values (canvases "
                    "chosen by frcnn_jax.data.canvases.choose_canvases).")
  flags.DEFINE_string("mix_single", None, "--mix: the single fixed canvas HxW compared "
                      "(default: data.pad_hw).")
  flags.DEFINE_integer("mix_multiple", 32, "--mix: canvas sides are multiples of this.")
  flags.DEFINE_integer("peer_sizes", 4, "--mix --peer: torchvision is timed at this many of "
                       "the most frequent resized sizes.")
  flags.DEFINE_integer("flop_sizes", 1, "--mix: XLA counts the useful FLOPs at this many of the "
                       "most frequent content sizes, plus the smallest and the largest.")


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured row.

  Attributes:
    dtype: compute dtype ("float32" or "bfloat16").
    height: canvas height.
    width: canvas width.
    batch: images per device per step.
    proposals: rpn.post_nms_top_n_test (inference RoIs per image).
    parts: what is timed ("train", "infer").
    group: "grid", "sweep_size" or "sweep_proposals".
  """
  dtype: str
  height: int
  width: int
  batch: int
  proposals: int
  parts: tuple[str, ...]
  group: str = "grid"


def parse_size(text: str) -> tuple[int, int]:
  """Parses "600x800" into (600, 800); ValueError unless it is HxW with H, W >= 16."""
  parts = text.lower().split("x")
  try:
    height, width = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"size {text!r} must be HEIGHTxWIDTH, e.g. 600x800") from None
  if min(height, width) < 16:
    raise ValueError(f"size {text!r}: height and width must be >= 16 (the trunk stride)")
  return height, width


def parse_positive_ints(name: str, values: list[str]) -> list[int]:
  """Parses ["1", "2"] into [1, 2]; ValueError naming the flag unless all are positive."""
  try:
    ints = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{name} must be positive integers, got {','.join(values)}") from None
  if not ints or min(ints) < 1:
    raise ValueError(f"--{name} must be positive integers, got {','.join(values)}")
  return ints


def make_cases(config: ml_collections.ConfigDict, *, dtypes: list[str] | None = None,
               sizes: list[str] | None = None, height: int | None = None,
               width: int | None = None, batch: tuple[str, ...] = ("1",),
               parts: tuple[str, ...] = PARTS, sweep: bool = False,
               sweep_sizes: tuple[str, ...] = (), sweep_proposals: tuple[str, ...] = ()
               ) -> list[Case]:
  """The rows asked for (the flags' values); the first row is the default measurement.

  Grid: every dtype x size x batch. Sweep: training and inference at each of `sweep_sizes`,
  then inference at the first sweep size for each proposal count in `sweep_proposals`; the
  first dtype and batch.

  Raises:
    ValueError: naming the flag of a bad value.
  """
  dtypes = dtypes or [config.model.dtype]
  for dtype in dtypes:
    if dtype not in config_flags.CHOICES["model.dtype"]:
      raise ValueError(f"--dtype {dtype!r} must be one of {config_flags.CHOICES['model.dtype']}")
  timed = tuple(p for p in PARTS if p in parts)
  if not timed or set(parts) - set(PARTS):
    raise ValueError(f"--parts must name train and/or infer, got {','.join(parts)}")
  batches = parse_positive_ints("batch", list(batch))
  proposals = int(config.rpn.post_nms_top_n_test)
  if sweep:
    hws = [parse_size(s) for s in sweep_sizes]
    if not hws:
      raise ValueError("--sweep_sizes must name at least one size")
    cases = [Case(dtypes[0], h, w, batches[0], proposals, timed, "sweep_size") for h, w in hws]
    h, w = hws[0]
    cases += [Case(dtypes[0], h, w, batches[0], n, ("infer",), "sweep_proposals")
              for n in parse_positive_ints("sweep_proposals", list(sweep_proposals))]
    return cases
  if sizes and (height or width):
    raise ValueError("give either --sizes or --height/--width, not both")
  if sizes:
    hws = [parse_size(s) for s in sizes]
  else:
    hws = [(height or config.data.pad_hw[0], width or config.data.pad_hw[1])]
  return [Case(dtype, h, w, b, proposals, timed) for dtype in dtypes for h, w in hws
          for b in batches]


def case_config(config: ml_collections.ConfigDict, case: Case) -> ml_collections.ConfigDict:
  """A copy of `config` with the row's dtype and proposal count, and no pretrained weights."""
  c = config.copy_and_resolve_references()
  c.model.dtype = case.dtype
  c.model.pretrained = ""
  c.rpn.post_nms_top_n_test = case.proposals
  return c


SOURCE_LONG_SIDE = 500   # VOC's images: the decoded size the device resizes from


def synthetic_batch(batch: int, height: int, width: int, max_gt: int, num_gt: int,
                    num_classes: int, seed: int = 0,
                    content_hw: tuple[int, int] | None = None,
                    resize_on_device: bool = False) -> dict[str, np.ndarray]:
  """A Batch of random images on a `height` x `width` canvas, each with `num_gt` random boxes.

  The image fills the canvas, or (`content_hw`) its top-left `content_hw` part, with zero
  padding beyond as the input pipeline pads; `image_hw` and the boxes follow the content.
  With `resize_on_device` the Batch carries what the pipeline ships when the device resizes
  (`frcnn_jax.ops.images.SOURCE_KEYS`): a random image of the content's shape with its long
  side `SOURCE_LONG_SIDE` (VOC's decoded size) on a source canvas rounded up to 32, every
  other image flipped; the step resizes it to the content size.
  """
  ch, cw = content_hw or (height, width)
  if not (0 < ch <= height and 0 < cw <= width):
    raise ValueError(f"content {ch}x{cw} does not fit the canvas {height}x{width}")
  rng = np.random.default_rng(seed)
  if resize_on_device:
    sh, sw = (max(1, round(v * SOURCE_LONG_SIDE / max(ch, cw))) for v in (ch, cw))
    (source_hw,) = canvases.source_canvases(np.array([[sh, sw]]), np.zeros(1), 1)
    source = np.zeros((batch, *source_hw, 3), np.uint8)
    source[:, :sh, :sw] = rng.integers(0, 256, (batch, sh, sw, 3), dtype=np.uint8)
    pixels = {"source_image": source,
              "source_hw": np.tile(np.asarray([[sh, sw]], np.int32), (batch, 1)),
              "flip": np.arange(batch) % 2 == 1,
              "canvas": np.zeros((batch, height, width, 0), np.uint8)}
    scale, orig_hw = ch / sh, (sh, sw)
  else:
    image = np.zeros((batch, height, width, 3), np.uint8)
    image[:, :ch, :cw] = rng.integers(0, 256, (batch, ch, cw, 3), dtype=np.uint8)
    pixels, scale, orig_hw = {"image": image}, 1.0, (ch, cw)
  x1 = rng.uniform(0, cw * 0.6, (batch, max_gt))
  y1 = rng.uniform(0, ch * 0.6, (batch, max_gt))
  w = rng.uniform(min(32, cw * 0.2), cw * 0.4, (batch, max_gt))
  h = rng.uniform(min(32, ch * 0.2), ch * 0.4, (batch, max_gt))
  valid = np.arange(max_gt)[None, :] < min(num_gt, max_gt)
  valid = np.broadcast_to(valid, (batch, max_gt)).copy()
  return {
      **pixels,
      "image_hw": np.tile(np.asarray([[ch, cw]], np.int32), (batch, 1)),
      "scale": np.full(batch, scale, np.float32),
      "gt_boxes": np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32),
      "gt_labels": np.where(valid, rng.integers(1, num_classes + 1, (batch, max_gt)), 0
                            ).astype(np.int32),
      "gt_valid": valid,
      "gt_difficult": np.zeros((batch, max_gt), bool),
      "image_id": np.arange(batch, dtype=np.int32),
      "orig_hw": np.tile(np.asarray([orig_hw], np.int32), (batch, 1)),   # = source_hw
      "valid": np.ones(batch, bool),
  }


def _timed_runs(fn, steps: int) -> tuple[list[float], list[float]]:
  """Wall and process-CPU seconds of `steps` calls of `fn` (after one warm-up call), each
  until its outputs are ready."""
  jax.block_until_ready(fn())
  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return times, cpu_times


def _compile(jitted, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _program_flops(compiled) -> float | None:
  try:
    return flops.compiled_flops(compiled)
  except ValueError:
    return None


def _program_mib(compiled) -> float | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return total / 2**20


def peak_memory() -> tuple[float, str]:
  """(MiB, source): the device's peak bytes in use, or the process's peak RSS on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def device_name() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind}"


def machine() -> dict[str, Any]:
  """What ran the benchmark: CPU model, cores, JAX versions, devices, XLA flags."""
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jaxlib": metadata.version("jaxlib"),
          "device": device_name(), "num_devices": jax.device_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def measure_case(config: ml_collections.ConfigDict, case: Case, mesh: jax.sharding.Mesh,
                 steps: int, num_gt: int) -> dict[str, Any]:
  """Compiles and times one row; returns its figures (None for parts not timed)."""
  c = case_config(config, case)
  num_classes = len(c.data.classes)
  model = builders.model_from_config(c, num_classes)
  settings = builders.detector_settings_from_config(c)
  global_batch = case.batch * mesh.devices.size
  host = synthetic_batch(global_batch // jax.process_count(), case.height, case.width,
                         c.data.max_gt, num_gt, num_classes,
                         resize_on_device=builders.resize_on_device(c))
  batch = parallel.host_batch_to_global(host, mesh)
  row: dict[str, Any] = {"group": case.group}
  for part in PARTS:
    row.update({f"{part}_{k}": None for k in ("step_time_s", "images_per_s", "compile_s",
                                              "runs_s", "cpu_runs_s", "cpu_step_time_s",
                                              "flops_per_image", "program_mib")})

  state, tx, lr_fn = train_step.create_train_state(c, model, mesh)
  if "train" in case.parts:
    jitted = train_step.jit_train_step(model, settings, tx, lr_fn, mesh,
                                  grad_accum_steps=c.train.grad_accum_steps)
    compiled, row["train_compile_s"] = _compile(jitted, state, batch)
    holder = {"state": state}
    del state

    def run_train():
      holder["state"], holder["metrics"] = compiled(holder["state"], batch)
      return holder["state"], holder["metrics"]

    row["train_runs_s"], row["train_cpu_runs_s"] = _timed_runs(run_train, steps)
    row["train_finite"] = bool(holder.pop("metrics")["finite"])
    state = holder.pop("state")
    row["train_flops_per_image"] = _optional_div(_program_flops(compiled), case.batch)
    row["train_program_mib"] = _program_mib(compiled)
    del compiled
  if "infer" in case.parts:
    predict = jax.jit(functools.partial(detector.predict, model=model, settings=settings))
    compiled, row["infer_compile_s"] = _compile(predict, state.params, batch)
    row["infer_runs_s"], row["infer_cpu_runs_s"] = _timed_runs(
        lambda: compiled(state.params, batch), steps)
    row["infer_flops_per_image"] = _optional_div(_program_flops(compiled), case.batch)
    row["infer_program_mib"] = _program_mib(compiled)
    del compiled
  del state
  for part in PARTS:
    if row[f"{part}_runs_s"] is not None:
      step = statistics.median(row[f"{part}_runs_s"])
      row[f"{part}_step_time_s"] = step
      row[f"{part}_images_per_s"] = global_batch / step
      row[f"{part}_cpu_step_time_s"] = statistics.median(row[f"{part}_cpu_runs_s"])
  memory, source = peak_memory()
  row.update({
      "train_step_s": _optional_div(row["train_step_time_s"], global_batch),
      "infer_s": _optional_div(row["infer_step_time_s"], global_batch),
      "compile_s": sum(row[f"{p}_compile_s"] or 0.0 for p in PARTS),
      "peak_memory_mib": memory, "memory_source": source,
      "device": device_name(), "num_devices": mesh.devices.size,
      "height": case.height, "width": case.width, "batch": case.batch,
      "global_batch": global_batch, "steps": steps, "dtype": case.dtype,
      "roi_op": c.model.roi_op, "post_nms_top_n_test": case.proposals,
      "post_nms_top_n_train": int(c.rpn.post_nms_top_n_train),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_avg_1min": round(os.getloadavg()[0], 2),
  })
  return row


def _optional_div(value: float | None, by: float) -> float | None:
  return None if value is None else value / by


def matmul_peaks(dtypes: list[str], size: int) -> dict[str, dict[str, float]]:
  """Measured matmul FLOP/s of each dtype (`frcnn_jax.flops.matmul_peak`)."""
  accelerator = jax.devices()[0].platform != "cpu"
  n = size or (8192 if accelerator else 2048)
  return {dtype: flops.matmul_peak(n, dtype, chain=10 if accelerator else 1)
          for dtype in dtypes}


def add_mfu(row: dict[str, Any], peak: dict[str, float]) -> None:
  """Adds "{train,infer}_mfu": achieved per-device FLOP/s over the matmul peak's FLOP/s.

  On CPU also "{train,infer}_mfu_cpu_time": FLOPs per process-CPU-second over the matmul's
  FLOPs per CPU-second, and "{train,infer}_cores_used" (CPU seconds / wall seconds). On a CPU
  shared with other processes the wall-clock MFU moves with the cores this process gets while
  the peak and the row are measured; the CPU-time figure does not.
  """
  row["peak_flops_per_s"] = peak["flops_per_s"]
  on_cpu = row["device"].startswith("cpu")
  for part in PARTS:
    per_image, step = row[f"{part}_flops_per_image"], row[f"{part}_step_time_s"]
    flop = None if per_image is None else per_image * row["batch"]
    row[f"{part}_mfu"] = None if flop is None or step is None else flop / step / peak[
        "flops_per_s"]
    if on_cpu:
      cpu = row[f"{part}_cpu_step_time_s"]
      usable = flop is not None and cpu and math.isfinite(peak["flops_per_cpu_s"])
      row[f"{part}_mfu_cpu_time"] = flop / cpu / peak["flops_per_cpu_s"] if usable else None
      row[f"{part}_cores_used"] = cpu / step if cpu and step else None


def _peer_module(config: ml_collections.ConfigDict) -> tuple[Any, str | None]:
  """(scripts/peer_torchvision.py as a module, None), or (None, why the peer cannot run)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import peer_torchvision  # pylint: disable=g-import-not-at-top
  m = config.model
  try:
    peer_torchvision.import_torch()
    if m.width != 1.0 or tuple(m.convs_per_block) != vgg.VGG16_CONVS_PER_BLOCK:
      raise peer_torchvision.PeerUnavailable(
          f"the config's trunk is not VGG16 (model.width={m.width}, model.convs_per_block="
          f"{tuple(m.convs_per_block)}); the torchvision peer is always VGG16")
  except peer_torchvision.PeerUnavailable as e:
    print(f"peer: not measured: {e}. Continuing with our figures only.", flush=True)
    return None, str(e)
  return peer_torchvision, None


def run_peer(cases: list[Case], config: ml_collections.ConfigDict, steps: int, num_gt: int
             ) -> dict[str, Any]:
  """torchvision's figures for each grid row's (dtype, size, batch), or why there are none."""
  peer_torchvision, error = _peer_module(config)
  if error:
    return {"available": False, "error": error, "results": {}}
  num_classes = len(config.data.classes)
  device = "cpu" if jax.devices()[0].platform == "cpu" else "cuda"
  results = {}
  for case in cases:
    key = (case.dtype, case.height, case.width, case.batch)
    if case.group != "grid" or key in results:
      continue
    arrays = peer_torchvision.random_batch(case.batch, case.height, case.width, num_gt,
                                           num_classes)
    r, p = config.rpn, config.roi
    try:
      results[key] = peer_torchvision.measure(
          arrays, steps=steps, dtype=case.dtype, num_classes=num_classes, device=device,
          frozen_blocks=config.model.frozen_blocks, fc_dim=config.model.fc_dim,
          pre_nms_train=r.pre_nms_top_n_train, post_nms_train=r.post_nms_top_n_train,
          pre_nms_test=r.pre_nms_top_n_test, post_nms_test=case.proposals,
          rpn_batch=r.batch_size_per_image, roi_batch=p.batch_size_per_image,
          test_nms=config.test.nms_threshold, score_threshold=config.test.score_threshold,
          detections=config.test.detections_per_image)
    except RuntimeError as e:   # e.g. out of memory inside torch
      print(f"peer: {case.dtype} {case.height}x{case.width} batch {case.batch} failed: {e}",
            flush=True)
      results[key] = {"error": str(e)}
      continue
    print(f"peer: {case.dtype} {case.height}x{case.width} batch {case.batch}: train "
          f"{results[key]['train_step_s']:.3f} s/image, infer {results[key]['infer_s']:.3f} "
          f"s/image", flush=True)
  return {"available": True, "results": results}


def add_peer(row: dict[str, Any], peer: dict[str, Any]) -> None:
  """Adds torchvision's seconds per image and our speed-up over it (per device) to a row."""
  key = (row["dtype"], row["height"], row["width"], row["batch"])
  figures = peer.get("results", {}).get(key)
  if not figures or "error" in figures:
    return
  row["peer_train_step_s"] = figures["train_step_s"]
  row["peer_infer_s"] = figures["infer_s"]
  for ours, theirs, name in (("train_step_s", "peer_train_step_s", "train_speedup_vs_peer"),
                             ("infer_s", "peer_infer_s", "infer_speedup_vs_peer")):
    if row[ours] is not None:   # ours is per image over all devices; torchvision used one
      row[name] = row[theirs] / (row[ours] * row["num_devices"])


def _fmt(value: float | None, spec: str) -> str:
  """format(value, spec), or "-" padded to the spec's width for a missing value."""
  if value is None:
    return "-".rjust(int(spec.split(".")[0] or 0))
  return format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
  """One line per row: seconds/image, images/s, compile, GFLOP/image, MFU, memory, load."""
  header = (f"{'dtype':<9}{'HxW':>10}{'b/dev':>6}{'props':>6} | {'train s/im':>10}"
            f"{'im/s':>7}{'infer s/im':>11}{'im/s':>7} | {'compile s':>11} | "
            f"{'GFLOP/im tr/inf':>16} | {'MFU tr/inf':>12} | {'CPU-time MFU':>13} | "
            f"{'cores':>9} | {'prog MiB tr/inf':>16} | {'load':>5}")
  print(header)
  print("-" * len(header))
  for r in rows:
    gflops = "/".join(_fmt(r[f"{p}_flops_per_image"] and r[f"{p}_flops_per_image"] / 1e9,
                           ".1f") for p in PARTS)
    mfu = "/".join(_fmt(r.get(f"{p}_mfu") and 100 * r[f"{p}_mfu"], ".1f") for p in PARTS)
    cpu_mfu = "/".join(_fmt(r.get(f"{p}_mfu_cpu_time") and 100 * r[f"{p}_mfu_cpu_time"], ".1f")
                       for p in PARTS)
    cores = "/".join(_fmt(r.get(f"{p}_cores_used"), ".2f") for p in PARTS)
    compile_s = "/".join(_fmt(r[f"{p}_compile_s"], ".1f") for p in PARTS)
    memory = "/".join(_fmt(r[f"{p}_program_mib"], ".0f") for p in PARTS)
    print(f"{r['dtype']:<9}{r['height']:>5}x{r['width']:<4}{r['batch']:>6}"
          f"{r['post_nms_top_n_test']:>6} | {_fmt(r['train_step_s'], '10.3f')}"
          f"{_fmt(r['train_images_per_s'], '7.2f')}{_fmt(r['infer_s'], '11.3f')}"
          f"{_fmt(r['infer_images_per_s'], '7.2f')} | {compile_s:>11} | {gflops:>16} | "
          f"{mfu + '%':>12} | {cpu_mfu + '%':>13} | {cores:>9} | {memory:>16} | "
          f"{r['load_avg_1min']:>5.2f}")
  peered = [r for r in rows if "peer_infer_s" in r]
  if peered:
    print("\nvs torchvision (same device, per device):")
    print(f"{'dtype':<9}{'HxW':>10}{'b/dev':>6} | {'train s/im ours':>15}{'torchvision':>12}"
          f"{'speed-up':>9} | {'infer s/im ours':>15}{'torchvision':>12}{'speed-up':>9}")
    for r in peered:
      print(f"{r['dtype']:<9}{r['height']:>5}x{r['width']:<4}{r['batch']:>6} | "
            f"{_fmt(r['train_step_s'], '15.3f')}{r['peer_train_step_s']:>12.3f}"
            f"{_fmt(r.get('train_speedup_vs_peer'), '8.2f')}x | "
            f"{_fmt(r['infer_s'], '15.3f')}{r['peer_infer_s']:>12.3f}"
            f"{_fmt(r.get('infer_speedup_vs_peer'), '8.2f')}x")


def _json_safe(value: Any) -> Any:
  """Replaces non-finite floats by None and tuple keys by strings, recursively."""
  if isinstance(value, dict):
    return {("x".join(map(str, k)) if isinstance(k, tuple) else k): _json_safe(v)
            for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


# ---------------------------------------------------------------------------------------------
# Dataset-shaped mode (--mix): the single canvas against K chosen canvases over a size mix.

VOC07_SIZES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks", "voc2007_test_sizes.txt")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a size mix is laid out on canvases.

  Attributes:
    name: "single HxW" (the one fixed canvas) or "K=k" (`canvases.choose_canvases`).
    canvases: the (height, width) canvases, ascending by area for chosen ones.
    shares: fraction of the mix's images on each canvas (each on the smallest that holds it).
    useful: image pixels / canvas pixels over the mix.
  """
  name: str
  canvases: tuple[tuple[int, int], ...]
  shares: tuple[float, ...]
  useful: float


def parse_mix_list(text: str) -> tuple[np.ndarray, np.ndarray]:
  """Parses "375x500:3,500x375" (original HxW, optional :count) into (hw [U, 2], counts [U]).

  Raises:
    ValueError: naming the bad entry.
  """
  hws, counts = [], []
  for entry in text.split(","):
    size, _, count = entry.strip().partition(":")
    hws.append(parse_size(size))
    try:
      counts.append(int(count) if count else 1)
    except ValueError:
      raise ValueError(f"--mix entry {entry!r}: the count after ':' must be an integer"
                       ) from None
    if counts[-1] < 1:
      raise ValueError(f"--mix entry {entry!r}: the count must be >= 1")
  return np.asarray(hws, np.int64).reshape(-1, 2), np.asarray(counts, np.int64)


def read_size_table(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(hw [U, 2], counts [U]) from a "height width count" table ('#' lines are comments)."""
  rows = np.loadtxt(path, dtype=np.int64, comments="#", ndmin=2)
  if rows.shape[1] != 3 or rows.min() < 1:
    raise ValueError(f"{path}: expected lines 'height width count' of positive integers")
  return rows[:, :2], rows[:, 2]


def source_size_mix(source) -> tuple[np.ndarray, np.ndarray, int]:
  """Original sizes of a source's records from `annotation(i)["orig_hw"]` (no decoding).

  Returns:
    (hw [U, 2], counts [U], unreadable): distinct sizes, how many records have each, and how
    many records were left out because their image header is unreadable (tfds source).
  """
  sizes, unreadable = [], 0
  for i in range(len(source)):
    try:
      sizes.append(tuple(int(v) for v in source.annotation(i)["orig_hw"]))
    except images.ImageDecodeError:
      unreadable += 1
  if not sizes:
    raise ValueError(f"{getattr(source, 'name', 'source')}: no readable records")
  hw, counts = np.unique(np.asarray(sizes, np.int64), axis=0, return_counts=True)
  return hw, counts.astype(np.int64), unreadable


def mix_sizes(spec: str, config: ml_collections.ConfigDict
              ) -> tuple[np.ndarray, np.ndarray, str]:
  """The original sizes of the mix `--mix` names, with counts, and a description.

  Args:
    spec: "voc07" (benchmarks/voc2007_test_sizes.txt: the 4952 VOC2007 test images), "train"
      or "eval" (every record of the config's dataset split, e.g. a VOCdevkit folder with
      `--config.data.name=voc_folder --config.data.data_dir=...`), or a list "HxW:count,...".
    config: the loaded config (data source, for "train" / "eval").

  Returns:
    (hw int64 [U, 2] original (height, width), counts int64 [U], description).
  """
  if spec == "voc07":
    hw, counts = read_size_table(VOC07_SIZES)
    return hw, counts, (f"VOC2007 test sizes ({int(counts.sum())} images, "
                        f"{os.path.relpath(VOC07_SIZES)})")
  if spec in ("train", "eval"):
    source = builders.source_from_config(config, spec)
    hw, counts, unreadable = source_size_mix(source)
    note = f", {unreadable} with unreadable headers left out" if unreadable else ""
    return hw, counts, (f"{config.data.name} {spec} split of {config.data.data_dir or '-'} "
                        f"({int(counts.sum())} records{note})")
  hw, counts = parse_mix_list(spec)
  return hw, counts, f"listed sizes {spec}"


def resized_mix(hw: np.ndarray, counts: np.ndarray, min_size: int, max_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Distinct resized sizes (py-faster-rcnn's rule, `canvases.resized_hw`) and their counts.

  Returns:
    (sizes int64 [V, 2], counts int64 [V]), most frequent first (ties: by size).
  """
  resized = np.asarray([canvases.resized_hw(s, min_size, max_size) for s in hw], np.int64)
  sizes, inverse = np.unique(resized.reshape(-1, 2), axis=0, return_inverse=True)
  merged = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(sizes))
  merged = merged.astype(np.int64)
  order = np.lexsort((sizes[:, 1], sizes[:, 0], -merged))
  return sizes[order], merged[order]


def make_layout(name: str, canvas_list, sizes: np.ndarray, counts: np.ndarray) -> Layout:
  """Places every size on the smallest canvas that holds it (`canvases.assign_canvases`)."""
  canvas_list = tuple((int(h), int(w)) for h, w in canvas_list)
  index = canvases.assign_canvases(sizes, canvas_list)
  areas = np.asarray([h * w for h, w in canvas_list], np.float64)
  content = float((counts * sizes[:, 0] * sizes[:, 1]).sum())
  shares = np.bincount(index, weights=counts, minlength=len(canvas_list)) / counts.sum()
  return Layout(name, canvas_list, tuple(float(s) for s in shares),
                content / float((counts * areas[index]).sum()))


def plan_layouts(sizes: np.ndarray, counts: np.ndarray, single_hw: tuple[int, int],
                 num_canvases: list[int], multiple: int) -> list[Layout]:
  """The single fixed canvas, then the K chosen canvases for each K of `num_canvases`.

  Raises:
    ValueError: the single canvas does not hold some resized size (named).
  """
  try:
    layouts = [make_layout(f"single {single_hw[0]}x{single_hw[1]}", [single_hw], sizes,
                           counts)]
  except ValueError as e:
    raise ValueError(f"--mix_single {single_hw[0]}x{single_hw[1]}: {e}") from None
  expanded = np.repeat(sizes, counts, axis=0)
  for k in num_canvases:
    layouts.append(make_layout(f"K={k}", canvases.choose_canvases(expanded, k, multiple),
                               sizes, counts))
  return layouts


def canvas_contents(layouts: list[Layout], sizes: np.ndarray, counts: np.ndarray
                    ) -> dict[tuple[int, int], tuple[int, int]]:
  """Each distinct canvas (first-seen order) -> the most frequent size placed on it."""
  weight: dict[tuple[int, int], collections.Counter] = {}
  for layout in layouts:
    index = canvases.assign_canvases(sizes, layout.canvases)
    for i, canvas in enumerate(layout.canvases):
      tally = weight.setdefault(canvas, collections.Counter())
      for size, n in zip(sizes[index == i], counts[index == i]):
        tally[(int(size[0]), int(size[1]))] += int(n)
  return {canvas: tally.most_common(1)[0][0] for canvas, tally in weight.items()}


def exact_flop_sizes(sizes: np.ndarray, counts: np.ndarray, top: int
                     ) -> list[tuple[int, int]]:
  """Content sizes whose FLOPs XLA counts: the `top` most frequent, the fewest and the most
  pixels (sizes are most frequent first)."""
  pixels = sizes[:, 0] * sizes[:, 1]
  picks = list(range(min(top, len(sizes)))) + [int(np.argmin(pixels)), int(np.argmax(pixels))]
  return list(dict.fromkeys((int(sizes[i, 0]), int(sizes[i, 1])) for i in picks))


def pixel_line(known: dict[tuple[int, int], float], sizes: np.ndarray
               ) -> tuple[np.ndarray, float]:
  """Values at `sizes`: the known ones exactly, the others on a line in the pixel count.

  The line is the least-squares a + b * pixels through the known sizes (proportional to the
  pixels when they all have the same pixel count).

  Returns:
    (values float64 [V], largest relative deviation of a known value from the line).
  """
  if not known:
    raise ValueError("no known values to fit")
  px = np.asarray([h * w for h, w in known], np.float64)
  y = np.asarray(list(known.values()), np.float64)
  if len(np.unique(px)) >= 2:
    b, a = np.polyfit(px, y, 1)
  else:
    a, b = 0.0, float(np.mean(y / px))
  line = lambda p: a + b * p
  residual = float(np.max(np.abs(line(px) - y) / y))
  values = np.asarray([known.get((int(h), int(w)), line(float(h * w))) for h, w in sizes])
  return values, residual


def mix_mean(values: np.ndarray, counts: np.ndarray, mask: np.ndarray | None = None) -> float:
  """The count-weighted mean of per-size values (over `mask` when given)."""
  weights = counts if mask is None else counts * mask
  return float((values * weights).sum() / weights.sum())


def layout_per_image(layout: Layout, canvas_seconds: dict[tuple[int, int], float]) -> float:
  """Per-image seconds over the mix: sum over canvases of share x seconds per image there."""
  return sum(share * canvas_seconds[canvas]
             for canvas, share in zip(layout.canvases, layout.shares) if share > 0)


def interleaved_runs(items: list[tuple[Any, Any]], rounds: int
                      ) -> dict[Any, tuple[list[float], list[float]]]:
  """Wall and process-CPU seconds of each (key, fn): all warmed up once, then `rounds` rounds
  that call every fn once in order (so load changes hit every item alike)."""
  for _, fn in items:
    fn()
  out = {key: ([], []) for key, _ in items}
  for _ in range(rounds):
    for key, fn in items:
      start, cpu_start = time.perf_counter(), time.process_time()
      fn()
      out[key][0].append(time.perf_counter() - start)
      out[key][1].append(time.process_time() - cpu_start)
  return out


def _load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


@dataclasses.dataclass(frozen=True)
class MixPlan:
  """A size mix and its layouts.

  Attributes:
    description: where the sizes come from.
    sizes: int64 [V, 2] distinct resized (height, width), most frequent first.
    counts: int64 [V] images of each.
    layouts: the single canvas, then one Layout per K.
    multiple: the canvas multiple.
  """
  description: str
  sizes: np.ndarray
  counts: np.ndarray
  layouts: list[Layout]
  multiple: int


def plan_mix(config: ml_collections.ConfigDict, spec: str, num_canvases: list[int],
             single_hw: tuple[int, int], multiple: int) -> MixPlan:
  """Reads the mix `spec` names (`mix_sizes`), resizes it and plans its layouts.

  Raises:
    ValueError / FileNotFoundError: a bad spec, missing data, or a single canvas too small.
  """
  hw, orig_counts, description = mix_sizes(spec, config)
  sizes, counts = resized_mix(hw, orig_counts, config.data.min_size, config.data.max_size)
  return MixPlan(description, sizes, counts,
                 plan_layouts(sizes, counts, single_hw, num_canvases, multiple), multiple)


def run_mix(config: ml_collections.ConfigDict, plan: MixPlan, *, dtype: str, steps: int,
            num_gt: int, peer: bool, peer_sizes: int, flop_sizes: int, peak_size: int
            ) -> dict[str, Any]:
  """The dataset-shaped measurement (module docstring, "--mix"); prints and returns figures."""
  load_start = _load()
  description, sizes, counts, layouts = plan.description, plan.sizes, plan.counts, plan.layouts
  single_hw = layouts[0].canvases[0]
  contents = canvas_contents(layouts, sizes, counts)
  print(f"mix: {description}; {len(sizes)} distinct resized sizes "
        f"(data.min_size {config.data.min_size}, max_size {config.data.max_size})", flush=True)
  for layout in layouts:
    print(f"  {layout.name:<16} useful pixels {100 * layout.useful:5.1f}%  canvases " + ", ".join(
        f"{h}x{w} ({100 * s:.1f}%)" for (h, w), s in zip(layout.canvases, layout.shares)),
        flush=True)

  case = Case(dtype, single_hw[0], single_hw[1], 1, int(config.rpn.post_nms_top_n_test), PARTS)
  c = case_config(config, case)
  num_classes = len(c.data.classes)
  model = builders.model_from_config(c, num_classes)
  settings = builders.detector_settings_from_config(c)
  mesh = parallel.make_mesh()
  global_batch = mesh.devices.size
  peaks_before = matmul_peaks([dtype], peak_size)
  state, tx, lr_fn = train_step.create_train_state(c, model, mesh)
  train_jit = train_step.jit_train_step(model, settings, tx, lr_fn, mesh,
                                   grad_accum_steps=c.train.grad_accum_steps)
  predict_jit = jax.jit(functools.partial(detector.predict, model=model, settings=settings))

  def batch_for(height, width, content_hw=None):
    host = synthetic_batch(global_batch // jax.process_count(), height, width, c.data.max_gt,
                           num_gt, num_classes, content_hw=content_hw,
                           resize_on_device=builders.resize_on_device(c))
    return parallel.host_batch_to_global(host, mesh)

  holder = {"state": state}
  del state
  programs: dict[tuple[int, int], dict[str, Any]] = {}
  items = []
  for canvas, content in contents.items():
    batch = batch_for(*canvas, content)
    train_c, train_s = _compile(train_jit, holder["state"], batch)
    infer_c, infer_s = _compile(predict_jit, holder["state"].params, batch)
    programs[canvas] = {
        "content_hw": content, "train_compile_s": train_s, "infer_compile_s": infer_s,
        "train_flops_per_image": _program_flops(train_c),
        "infer_flops_per_image": _program_flops(infer_c),
        "train_program_mib": _program_mib(train_c), "infer_program_mib": _program_mib(infer_c)}
    print(f"compiled {canvas[0]}x{canvas[1]} (content {content[0]}x{content[1]}): "
          f"{train_s:.1f} s / {infer_s:.1f} s", flush=True)

    def run_train(compiled=train_c, batch=batch, canvas=canvas):
      holder["state"], metrics = compiled(holder["state"], batch)
      programs[canvas]["train_finite"] = bool(jax.block_until_ready(metrics)["finite"])

    def run_infer(compiled=infer_c, batch=batch):
      jax.block_until_ready(compiled(holder["state"].params, batch))

    items.append((("ours", canvas), (run_train, run_infer)))

  # Useful FLOPs: XLA's count for a program whose canvas is exactly the image (no padding).
  # FLOPs do not depend on image_hw (a runtime value), so a canvas equal to a content size
  # gives that size's count; the others are compiled here, the rest of the mix on a line.
  exact = {}
  on_canvas = [s for s in map(tuple, sizes.tolist()) if s in programs]
  for size in dict.fromkeys(exact_flop_sizes(sizes, counts, flop_sizes) + on_canvas):
    if size in programs:
      exact[size] = (programs[size]["train_flops_per_image"],
                     programs[size]["infer_flops_per_image"])
      continue
    batch = batch_for(*size)
    exact[size] = (_program_flops(_compile(train_jit, holder["state"], batch)[0]),
                   _program_flops(_compile(predict_jit, holder["state"].params, batch)[0]))
  useful = {}
  for i, part in enumerate(PARTS):
    known = {s: f[i] for s, f in exact.items() if f[i] is not None}
    if known:
      per_size, residual = pixel_line(known, sizes)
      useful[part] = {"flops_per_image": mix_mean(per_size, counts),
                      "line_max_residual": residual}
  print(f"useful FLOPs: XLA's count at content sizes {sorted(exact)}; mix mean "
        + ", ".join(f"{p} {u['flops_per_image'] / 1e9:.1f} GFLOP/image" for p, u in
                    useful.items()), flush=True)

  peer_info: dict[str, Any] = {"available": False, "error": "not requested (--peer)"}
  peer_hw = [tuple(int(v) for v in s) for s in sizes[:peer_sizes]]
  if peer and peer_hw:
    peer_info = _peer_runners(c, peer_hw, dtype, num_gt)
    if peer_info["available"]:
      runners = peer_info.pop("runners")
      ours = list(items)
      theirs = [(("peer", hw), (runners["train"][hw], runners["infer"][hw])) for hw in peer_hw]
      items = [x for pair in itertools.zip_longest(ours, theirs) for x in pair if x]
  flat = [((*key, part), fn) for key, fns in items for part, fn in zip(PARTS, fns)]
  print(f"timing: {len(flat)} programs, one warm-up round then {steps} interleaved rounds "
        f"(load {load_start})", flush=True)
  runs = interleaved_runs(flat, steps)
  peaks_after = matmul_peaks([dtype], peak_size)
  peak = max(peaks_before[dtype], peaks_after[dtype], key=lambda p: p["flops_per_s"])
  peak = {**peak, "before_flops_per_s": peaks_before[dtype]["flops_per_s"],
          "after_flops_per_s": peaks_after[dtype]["flops_per_s"],
          "flops_per_cpu_s": max(peaks_before[dtype]["flops_per_cpu_s"],
                                 peaks_after[dtype]["flops_per_cpu_s"])}

  seconds = {part: {} for part in PARTS}
  cpu_seconds = {part: {} for part in PARTS}
  for (who, size, part), (walls, cpus) in runs.items():
    per = global_batch if who == "ours" else 1
    if who == "ours":
      programs[size][f"{part}_runs_s"] = walls
      programs[size][f"{part}_cpu_runs_s"] = cpus
      programs[size][f"{part}_s"] = statistics.median(walls) / per
      programs[size][f"{part}_cores_used"] = statistics.median(cpus) / statistics.median(walls)
      seconds[part][size] = statistics.median(walls) / per
      cpu_seconds[part][size] = statistics.median(cpus) / per
    else:
      peer_info.setdefault("sizes", {}).setdefault(size, {}).update({
          f"{part}_runs_s": walls, f"{part}_s": statistics.median(walls),
          f"{part}_cores_used": statistics.median(cpus) / statistics.median(walls)})

  rows = []
  for layout in layouts:
    row = {"layout": layout.name, "canvases": layout.canvases, "shares": layout.shares,
           "useful_pixels": layout.useful}
    for part in PARTS:
      row[f"{part}_s_per_image"] = layout_per_image(layout, seconds[part])
      cpu = layout_per_image(layout, cpu_seconds[part])
      u = useful.get(part)   # per device: each device's program holds one image
      row[f"{part}_content_mfu"] = (u and u["flops_per_image"] / (
          row[f"{part}_s_per_image"] * global_batch) / peak["flops_per_s"])
      row[f"{part}_content_mfu_cpu_time"] = (u and u["flops_per_image"] / (cpu * global_batch)
                                             / peak["flops_per_cpu_s"])
      programs_flops = sum(share * (programs[cv][f"{part}_flops_per_image"] or math.nan)
                           for cv, share in zip(layout.canvases, layout.shares))
      row[f"{part}_program_flops_per_image"] = programs_flops
    rows.append(row)
  for row in rows:
    for part in PARTS:
      row[f"{part}_vs_single"] = row[f"{part}_s_per_image"] / rows[0][f"{part}_s_per_image"]
  if peer_info.get("sizes"):
    _add_peer_mix(peer_info, rows, layouts, sizes, counts, seconds)

  info = machine()
  info.update({"load_start": load_start, "load_end": _load()})
  result = {"mode": "mix", "mix": {"description": description, "images": int(counts.sum()),
                                   "distinct_resized_sizes": len(sizes),
                                   "min_size": int(config.data.min_size),
                                   "max_size": int(config.data.max_size),
                                   "multiple": plan.multiple},
            "dtype": dtype, "steps": steps, "layouts": rows,
            "canvases": {cv: p for cv, p in programs.items()}, "useful_flops": useful,
            "exact_flop_sizes": {s: {"train": f[0], "infer": f[1]} for s, f in exact.items()},
            "peer": peer_info, "matmul_peak": peak, "machine": info,
            "targets": mix_targets(rows, peer_info)}
  print_mix(result)
  return result


def _peer_runners(config: ml_collections.ConfigDict, sizes: list[tuple[int, int]], dtype: str,
                  num_gt: int) -> dict[str, Any]:
  """torchvision's per-size runners (`peer_torchvision.size_runners`), or why there are none."""
  peer_torchvision, error = _peer_module(config)
  if error:
    return {"available": False, "error": error}
  m, r, p = config.model, config.rpn, config.roi
  runners = peer_torchvision.size_runners(
      sizes, dtype=dtype, num_classes=len(config.data.classes),
      device="cpu" if jax.devices()[0].platform == "cpu" else "cuda", num_gt=num_gt,
      frozen_blocks=m.frozen_blocks, fc_dim=m.fc_dim,
      pre_nms_train=r.pre_nms_top_n_train, post_nms_train=r.post_nms_top_n_train,
      pre_nms_test=r.pre_nms_top_n_test, post_nms_test=r.post_nms_top_n_test,
      rpn_batch=r.batch_size_per_image, roi_batch=p.batch_size_per_image,
      test_nms=config.test.nms_threshold, score_threshold=config.test.score_threshold,
      detections=config.test.detections_per_image)
  return {"available": True, "runners": runners, **runners["info"]}


def _add_peer_mix(peer_info: dict[str, Any], rows: list[dict[str, Any]],
                  layouts: list[Layout], sizes: np.ndarray, counts: np.ndarray,
                  seconds: dict[str, dict[tuple[int, int], float]]) -> None:
  """torchvision's per-image seconds over the mix, and our speed-up over it per layout.

  torchvision was timed at the most frequent sizes; the other sizes' seconds lie on the line
  in the pixel count through those (`pixel_line`). The "measured" figures compare both on
  the images of the timed sizes only (no line).
  """
  measured = peer_info["sizes"]
  timed = np.asarray([(int(h), int(w)) in measured for h, w in sizes])
  peer_info["timed_share"] = float(counts[timed].sum() / counts.sum())
  for part in PARTS:
    per_size, residual = pixel_line({s: f[f"{part}_s"] for s, f in measured.items()}, sizes)
    peer_info[f"{part}_s_per_image"] = mix_mean(per_size, counts)
    peer_info[f"{part}_line_max_residual"] = residual
    peer_info[f"{part}_s_per_image_timed_sizes"] = mix_mean(per_size, counts, timed)
    for layout, row in zip(layouts, rows):
      index = canvases.assign_canvases(sizes, layout.canvases)
      ours = np.asarray([seconds[part][layout.canvases[i]] for i in index])
      row[f"{part}_speedup_vs_peer"] = peer_info[f"{part}_s_per_image"] / row[
          f"{part}_s_per_image"]
      row[f"{part}_speedup_vs_peer_timed_sizes"] = (
          peer_info[f"{part}_s_per_image_timed_sizes"] / mix_mean(ours, counts, timed))


def mix_targets(rows: list[dict[str, Any]], peer_info: dict[str, Any]) -> dict[str, Any]:
  """Issue 11's targets over the layouts with at most 4 canvases (None: not measured)."""
  chosen = [r for r in rows[1:] if len(r["canvases"]) <= 4]
  if not chosen:
    return {}
  best_useful = max(chosen, key=lambda r: r["useful_pixels"])
  fastest = min(chosen, key=lambda r: r["train_s_per_image"])
  out = {"useful_pixels": {"layout": best_useful["layout"],
                           "value": best_useful["useful_pixels"], "target": ">= 0.90",
                           "met": best_useful["useful_pixels"] >= 0.90},
         "train_vs_single": {"layout": fastest["layout"], "value": fastest["train_vs_single"],
                             "target": "<= 0.60", "met": fastest["train_vs_single"] <= 0.60}}
  if "train_s_per_image" in peer_info:
    out["train_vs_torchvision"] = {
        "layout": fastest["layout"], "value": fastest["train_speedup_vs_peer"],
        "target": "> 1 (speed-up)", "met": fastest["train_speedup_vs_peer"] > 1}
  return out


def print_mix(result: dict[str, Any]) -> None:
  """The per-canvas table, the per-layout table, torchvision's sizes and the targets."""
  print(f"\nmatmul peak {result['dtype']}: {result['matmul_peak']['flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s ({result['matmul_peak']['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second)")
  print(f"\n{'canvas':>10} {'content':>9} | {'train s/im':>10} {'infer s/im':>10} | "
        f"{'GFLOP/im tr/inf':>16} | {'compile s':>11} | {'cores':>9} | finite")
  for (h, w), p in result["canvases"].items():
    gflop = "/".join(_fmt(p[f"{q}_flops_per_image"] and p[f"{q}_flops_per_image"] / 1e9, ".1f")
                     for q in PARTS)
    print(f"{h:>5}x{w:<4} {p['content_hw'][0]:>4}x{p['content_hw'][1]:<4} | "
          f"{p['train_s']:>10.3f} {p['infer_s']:>10.3f} | {gflop:>16} | "
          f"{p['train_compile_s']:>5.1f}/{p['infer_compile_s']:<5.1f} | "
          f"{p['train_cores_used']:>4.2f}/{p['infer_cores_used']:<4.2f} | "
          f"{p.get('train_finite')}")
  peer = result["peer"]
  print(f"\n{'layout':<16} {'useful px':>9} | {'train s/im':>10} {'x single':>8} | "
        f"{'infer s/im':>10} {'x single':>8} | {'content MFU tr/inf':>18} | "
        f"{'CPU-time':>11} | {'vs torchvision tr/inf':>21} | canvases (share)")
  for r in result["layouts"]:
    mfu = "/".join(_fmt(r[f"{q}_content_mfu"] and 100 * r[f"{q}_content_mfu"], ".1f")
                   for q in PARTS)
    cpu_mfu = "/".join(_fmt(r[f"{q}_content_mfu_cpu_time"]
                            and 100 * r[f"{q}_content_mfu_cpu_time"], ".1f") for q in PARTS)
    vs = "/".join(_fmt(r.get(f"{q}_speedup_vs_peer"), ".2f") for q in PARTS)
    print(f"{r['layout']:<16} {100 * r['useful_pixels']:>8.1f}% | "
          f"{r['train_s_per_image']:>10.3f} {r['train_vs_single']:>8.2f} | "
          f"{r['infer_s_per_image']:>10.3f} {r['infer_vs_single']:>8.2f} | {mfu + '%':>18} | "
          f"{cpu_mfu + '%':>11} | {vs + 'x':>21} | " + ", ".join(
              f"{h}x{w} ({100 * s:.0f}%)" for (h, w), s in zip(r["canvases"], r["shares"])))
  if "train_s_per_image" in peer:
    print(f"{'torchvision':<16} {'100.0%':>9} | {peer['train_s_per_image']:>10.3f} "
          f"{'':>8} | {peer['infer_s_per_image']:>10.3f} {'':>8} | (each image at its own "
          f"size; timed at {len(peer['sizes'])} sizes = {100 * peer['timed_share']:.1f}% of "
          f"the images, the rest on a line in pixels)")
    for (h, w), f in peer["sizes"].items():
      print(f"  torchvision {h}x{w}: train {f['train_s']:.3f} s, infer {f['infer_s']:.3f} s "
            f"(cores {f['train_cores_used']:.2f}/{f['infer_cores_used']:.2f})")
  elif peer.get("error"):
    print(f"torchvision: not measured ({peer['error']})")
  for name, t in result["targets"].items():
    print(f"target {name}: {t['layout']} {t['value']:.3f} ({t['target']}): "
          f"{'met' if t['met'] else 'NOT met'}")
  print(f"load average (1, 5, 15 min): start {result['machine']['load_start']}, end "
        f"{result['machine']['load_end']}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise app.UsageError("--config is required (e.g. experiments/voc.py)")
  if f.steps < 1:
    raise app.UsageError(f"--steps must be >= 1, got {f.steps}")
  if host_memory.wanted(config.train.reuse_host_memory):   # as in train.py
    host_memory.keep_freed_memory()
  if f.mix:
    main_mix(f, config)
    return
  try:
    cases = make_cases(config, dtypes=f.dtype, sizes=f.sizes, height=f.height, width=f.width,
                       batch=f.batch, parts=f.parts, sweep=f.sweep, sweep_sizes=f.sweep_sizes,
                       sweep_proposals=f.sweep_proposals)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if f.peer:   # before JAX starts its backend: leave accelerator memory to torch too
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  info = machine()
  info["load_avg_1min_start"] = round(os.getloadavg()[0], 2)
  print(f"machine: {info}", flush=True)
  peer = {"available": False, "error": "not requested (--peer)", "results": {}}
  if f.peer:
    peer = run_peer(cases, config, f.steps, f.num_gt)

  dtypes = sorted({case.dtype for case in cases})
  peaks_before = matmul_peaks(dtypes, f.peak_size)
  mesh = parallel.make_mesh()
  rows = []
  for case in cases:
    row = measure_case(config, case, mesh, f.steps, f.num_gt)
    rows.append(row)
    print(f"measured {case.dtype} {case.height}x{case.width} batch {case.batch}/device, "
          f"{case.proposals} test proposals: train {_fmt(row['train_step_s'], '.3f')} "
          f"s/image, infer {_fmt(row['infer_s'], '.3f')} s/image, compile "
          f"{row['compile_s']:.1f} s (load {row['load_avg_1min']})", flush=True)
  peaks_after = matmul_peaks(dtypes, f.peak_size)
  peaks = {}
  for dtype in dtypes:
    best = max(peaks_before[dtype], peaks_after[dtype], key=lambda p: p["flops_per_s"])
    peaks[dtype] = {**best, "before_flops_per_s": peaks_before[dtype]["flops_per_s"],
                    "after_flops_per_s": peaks_after[dtype]["flops_per_s"],
                    "flops_per_cpu_s": max(peaks_before[dtype]["flops_per_cpu_s"],
                                           peaks_after[dtype]["flops_per_cpu_s"])}
  for row in rows:
    add_mfu(row, peaks[row["dtype"]])
    add_peer(row, peer)

  print()
  print("matmul peak: " + ", ".join(
      f"{d} {p['flops_per_s'] / 1e9:.1f} GFLOP/s ({p['n']}x{p['n']}; "
      f"{p['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second)" for d, p in peaks.items()))
  print(f"memory: program buffers per compiled step; peak so far ({rows[0]['memory_source']}): "
        f"{rows[-1]['peak_memory_mib']:.0f} MiB")
  print_table(rows)
  info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
  result = {**rows[0], "rows": rows, "matmul_peak": peaks, "machine": info, "peer": peer}
  print(json.dumps(_json_safe(result)))


def main_mix(f, config: ml_collections.ConfigDict) -> None:
  """`--mix`: checks the flags, runs `run_mix` and prints its JSON line."""
  if f.sweep or f.sizes or f.height or f.width:
    raise app.UsageError("--mix measures its own canvases: drop --sweep, --sizes, --height and "
                         "--width")
  if [b.strip() for b in f.batch] != ["1"]:
    raise app.UsageError("--mix runs one image per device per step (drop --batch)")
  if f.dtype and len(f.dtype) > 1:
    raise app.UsageError("--mix measures one --dtype")
  if min(f.peer_sizes, f.flop_sizes) < 1:
    raise app.UsageError("--peer_sizes and --flop_sizes must be >= 1")
  try:
    num_canvases = parse_positive_ints("mix_canvases", list(f.mix_canvases))
    single = parse_size(f.mix_single) if f.mix_single else tuple(config.data.pad_hw)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  dtype = f.dtype[0] if f.dtype else config.model.dtype
  if dtype not in config_flags.CHOICES["model.dtype"]:
    raise app.UsageError(f"--dtype {dtype!r} must be one of {config_flags.CHOICES['model.dtype']}")
  if f.peer:   # before JAX starts its backend: leave accelerator memory to torch too
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  try:
    plan = plan_mix(config, f.mix, num_canvases, single, f.mix_multiple)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  result = run_mix(config, plan, dtype=dtype, steps=f.steps, num_gt=f.num_gt, peer=f.peer,
                   peer_sizes=f.peer_sizes, flop_sizes=f.flop_sizes, peak_size=f.peak_size)
  print(json.dumps(_json_safe(result)))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
