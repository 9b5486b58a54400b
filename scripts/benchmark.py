r"""Speed of the detector with random weights: images/s, compile time, memory, FLOPs and MFU.

Usage:
  python scripts/benchmark.py --config experiments/X.py [--height 600 --width 800] [--batch 1]
      [--steps 5] [--config.model.dtype=bfloat16 ...]
  python scripts/benchmark.py --config experiments/voc.py --sizes 600x800,600x1000 \
      --batch 1,2,4 --dtype float32,bfloat16 [--peer]
  python scripts/benchmark.py --config experiments/voc.py --sweep \
      [--sweep_sizes 300x500,450x750,600x1000] [--sweep_proposals 100,300,1000]

The config is loaded as train.py loads it (a config file plus `--config.key=value` overrides);
`model.pretrained` is ignored (random weights) and `train.reuse_host_memory` applies as in
training (frcnn_jax/host_memory.py). Every combination of `--dtype`, `--sizes` and
`--batch` (images per device; the global batch spans every device, sharded as in training) is
one row. `--sweep` instead shows how the cost grows with pixels (training and inference at each
of `--sweep_sizes`) and with the number of proposals (inference at the first sweep size for each
`rpn.post_nms_top_n_test` in `--sweep_proposals`).

Per row: the training step is `frcnn_jax.train.make_train_step` (forward, backward, the config's
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

Output: a progress line per row, then a table; the last line is one JSON object whose top-level
keys are the first row's (issue 3's contract: "train_step_s", "infer_s" (seconds per image:
the step's median wall time over the global batch), "compile_s", "device", "height", "width",
...; "train_step_time_s" / "infer_step_time_s" are whole steps) plus "rows" (every row),
"matmul_peak", "machine" and "peer".
"""

import dataclasses
import functools
from importlib import metadata
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from frcnn_jax import builders
from frcnn_jax import config_flags
from frcnn_jax import detector
from frcnn_jax import flops
from frcnn_jax import host_memory
from frcnn_jax import parallel
from frcnn_jax import train
from frcnn_jax.models import vgg

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


def synthetic_batch(batch: int, height: int, width: int, max_gt: int, num_gt: int,
                    num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A Batch of random images filling the canvas, each with `num_gt` random boxes."""
  rng = np.random.default_rng(seed)
  x1 = rng.uniform(0, width * 0.6, (batch, max_gt))
  y1 = rng.uniform(0, height * 0.6, (batch, max_gt))
  w = rng.uniform(min(32, width * 0.2), width * 0.4, (batch, max_gt))
  h = rng.uniform(min(32, height * 0.2), height * 0.4, (batch, max_gt))
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
                         c.data.max_gt, num_gt, num_classes)
  batch = parallel.host_batch_to_global(host, mesh)
  row: dict[str, Any] = {"group": case.group}
  for part in PARTS:
    row.update({f"{part}_{k}": None for k in ("step_time_s", "images_per_s", "compile_s",
                                              "runs_s", "cpu_runs_s", "cpu_step_time_s",
                                              "flops_per_image", "program_mib")})

  state, tx, lr_fn = train.create_train_state(c, model, mesh)
  if "train" in case.parts:
    step_fn = train.make_train_step(model, settings, tx, lr_fn,
                                    grad_accum_steps=c.train.grad_accum_steps)
    jitted = jax.jit(step_fn, in_shardings=(parallel.replicated(mesh),
                                            parallel.batch_sharding(mesh)),
                     out_shardings=parallel.replicated(mesh), donate_argnums=0)
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


def run_peer(cases: list[Case], config: ml_collections.ConfigDict, steps: int, num_gt: int
             ) -> dict[str, Any]:
  """torchvision's figures for each grid row's (dtype, size, batch), or why there are none."""
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
    return {"available": False, "error": str(e), "results": {}}
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise app.UsageError("--config is required (e.g. experiments/voc.py)")
  if f.steps < 1:
    raise app.UsageError(f"--steps must be >= 1, got {f.steps}")
  if config.train.reuse_host_memory:   # before JAX starts its thread pools, as in train.py
    host_memory.keep_freed_memory()
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


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
