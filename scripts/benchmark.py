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

The config is loaded as training loads it (a config file plus `--config.key=value` overrides);
`model.pretrained` is ignored (random weights) and `train.reuse_host_memory` applies as in
training (frcnn_jax/runtime/host_memory.py). Every combination of `--dtype`, `--sizes` and
`--batch` (images per device; the global batch spans every device, sharded as in training) is
one row. `--sweep` instead shows how the cost grows with pixels (training and inference at each
of `--sweep_sizes`) and with the number of proposals (inference at the first sweep size for each
`rpn.post_nms_top_n_test` in `--sweep_proposals`).

Per row (`frcnn_jax.benchmarking.rows`): the training step and inference are compiled (compile
time), run once to warm up, then `--steps` times; the median is reported as seconds per image
and images/s. FLOPs come from XLA's cost analysis of one device's compiled program
(`frcnn_jax.benchmarking.flops`); MFU = achieved FLOP/s / the device's own matmul peak measured
in the same run, the best of a measurement before and after the rows
(`frcnn_jax.benchmarking.mfu`). On CPU the same ratio is also given per process-CPU-second
("CPU-time MFU") with the cores the row actually used. Memory: the compiled program's buffers,
and the peak so far in this process (device peak bytes where the device reports them, else
the process's peak RSS; the JSON says which).

Any experiment works, whatever its backbone (`model.backbone`); without `--height/--width` or
`--sizes` the canvas is `data.pad_hw`, else the first of `data.canvases`, else `data.min_size` x
`data.max_size` rounded up to `data.canvas_multiple` (`cases.default_canvas`). Where the
dataset's class names are in files not on this machine (COCO json), 80 classes are used.

`--peer` times torchvision's same architecture for the config's backbone (vgg16, zf,
resnet_c4, resnet_fpn; `frcnn_jax.benchmarking.torchvision_frcnn` and `peer`) with the
config's anchors, proposal counts and RoI settings, on the same device, sizes, dtypes and batch
in this run and prints both and their ratio; without torch/torchvision, for a backbone without
a peer, or for a model that is not torchvision's architecture (e.g. a narrowed width) it says
why and continues. On GPU it runs before our rows, with JAX's memory preallocation off, so that
both fit.

`--mix` (dataset-shaped mode, `frcnn_jax.benchmarking.mix`): the single canvas
(`--mix_single`, default `cases.default_canvas`) against K chosen canvases for each K of
`--mix_canvases` (multiples of `--mix_multiple`), over a mix of image sizes: `voc07` (the
VOC2007 test images' sizes, benchmarks/voc2007_test_sizes.txt), `train` / `eval` (every record
of the config's dataset split, e.g. `--config.data.name=voc_folder
--config.data.voc_folder.data_dir=DIR`), or a list of original sizes `HxW:count,...`. Per
layout: the useful pixel fraction, the share of images per canvas, and the per-image training
and inference seconds over the mix; content MFU counts only useful FLOPs (XLA's count at the
`--flop_sizes` most frequent content sizes plus the smallest and the largest, the rest on a line
in the pixel count). With `--peer`, torchvision runs at its own size for each of the
`--peer_sizes` most frequent sizes, interleaved with ours.
The last line is one JSON object ("layouts", "canvases", "peer", "targets", ...).

Output: a progress line per row, then a table; the last line is one JSON object whose top-level
keys are the first row's ("train_step_s", "infer_s" (seconds per image: the step's median wall
time over the global batch), "compile_s", "device", "height", "width", ...;
"train_step_time_s" / "infer_step_time_s" are whole steps) plus "rows" (every row),
"matmul_peak", "machine" and "peer".
"""

import json
import os

import ml_collections
from absl import app
from absl import flags

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import mfu
from frcnn_jax.benchmarking import mix
from frcnn_jax.benchmarking import peer as peer_lib
from frcnn_jax.benchmarking import report
from frcnn_jax.benchmarking import rows as rows_lib
from frcnn_jax.benchmarking import size_mix
from frcnn_jax.config import flags as config_flags
from frcnn_jax.runtime import host_memory
from frcnn_jax.runtime import parallel


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: importing defines none)."""
  config_flags.define_config_flag()
  flags.DEFINE_integer("height", None, "Canvas height (default: data.pad_hw's, else the "
                       "first data.canvases', else data.min_size rounded up).")
  flags.DEFINE_integer("width", None, "Canvas width (default: data.pad_hw's, else the first "
                       "data.canvases', else data.max_size rounded up).")
  flags.DEFINE_list("sizes", None, "Canvas sizes HxW, e.g. 600x800,600x1000 (instead of "
                    "--height/--width).")
  flags.DEFINE_list("batch", ["1"], "Images per device per step, e.g. 1,2,4.")
  flags.DEFINE_list("dtype", None, "Compute dtypes, e.g. float32,bfloat16 (default: "
                    "model.dtype).")
  flags.DEFINE_integer("steps", 5, "Timed repetitions (after one warm-up run).")
  flags.DEFINE_integer("num_gt", 5, "Valid ground-truth boxes per image.")
  flags.DEFINE_list("parts", list(cases.PARTS), "What to time: train, infer or both.")
  flags.DEFINE_bool("sweep", False, "Sweep image sizes and proposal counts instead of the "
                    "--sizes x --batch x --dtype grid.")
  flags.DEFINE_list("sweep_sizes", ["300x500", "450x750", "600x1000"], "Sizes of the --sweep.")
  flags.DEFINE_list("sweep_proposals", ["100", "300", "1000"],
                    "rpn.post_nms_top_n_test values of the --sweep.")
  flags.DEFINE_bool("peer", False, "Also time torchvision's Faster R-CNN of the config's "
                    "backbone (frcnn_jax.benchmarking.torchvision_frcnn) and print the ratios.")
  flags.DEFINE_integer("peak_size", 0, "Matrix side of the matmul-peak measurement (0: 2048 on "
                       "CPU, 8192 on accelerators).")
  flags.DEFINE_string("mix", None, "Dataset-shaped mode over a size mix: voc07 (VOC2007 test "
                      "sizes), train / eval (the config's dataset split, from annotation(i)) or "
                      "original sizes HxW:count,...")
  flags.DEFINE_list("mix_canvases", ["1", "2", "3", "4"], "--mix: the K values (canvases "
                    "chosen by frcnn_jax.data.canvases.choose_canvases).")
  flags.DEFINE_string("mix_single", None, "--mix: the single fixed canvas HxW compared "
                      "(default: as --height/--width).")
  flags.DEFINE_integer("mix_multiple", 32, "--mix: canvas sides are multiples of this.")
  flags.DEFINE_integer("peer_sizes", 4, "--mix --peer: torchvision is timed at this many of "
                       "the most frequent resized sizes.")
  flags.DEFINE_integer("flop_sizes", 1, "--mix: XLA counts the useful FLOPs at this many of the "
                       "most frequent content sizes, plus the smallest and the largest.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise app.UsageError("--config is required (e.g. experiments/voc.py)")
  if f.steps < 1:
    raise app.UsageError(f"--steps must be >= 1, got {f.steps}")
  if host_memory.wanted(config.train.reuse_host_memory):   # as in training
    host_memory.keep_freed_memory()
  if f.mix:
    main_mix(f, config)
    return
  try:
    rows_to_measure = cases.make_cases(
        config, dtypes=f.dtype, sizes=f.sizes, height=f.height, width=f.width, batch=f.batch,
        parts=f.parts, sweep=f.sweep, sweep_sizes=f.sweep_sizes,
        sweep_proposals=f.sweep_proposals)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if f.peer:   # before JAX starts its backend: leave accelerator memory to torch too
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  info = machine.machine()
  info["load_avg_1min_start"] = round(os.getloadavg()[0], 2)
  print(f"machine: {info}", flush=True)
  peer = {"available": False, "error": "not requested (--peer)", "results": {}}
  if f.peer:
    peer = peer_lib.run_peer(rows_to_measure, config, f.steps, f.num_gt)

  dtypes = sorted({case.dtype for case in rows_to_measure})
  peaks_before = mfu.matmul_peaks(dtypes, f.peak_size)
  mesh = parallel.make_mesh()
  rows = []
  for case in rows_to_measure:
    row = rows_lib.measure_case(config, case, mesh, f.steps, f.num_gt)
    rows.append(row)
    print(rows_lib.progress_line(case, row), flush=True)
  peaks = mfu.best_peaks(peaks_before, mfu.matmul_peaks(dtypes, f.peak_size))
  for row in rows:
    mfu.add_mfu(row, peaks[row["dtype"]])
    peer_lib.add_peer(row, peer)

  print()
  print("matmul peak: " + ", ".join(
      f"{d} {p['flops_per_s'] / 1e9:.1f} GFLOP/s ({p['n']}x{p['n']}; "
      f"{p['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second)" for d, p in peaks.items()))
  print(f"memory: program buffers per compiled step; peak so far ({rows[0]['memory_source']}): "
        f"{rows[-1]['peak_memory_mib']:.0f} MiB")
  rows_lib.print_table(rows)
  info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
  result = {**rows[0], "rows": rows, "matmul_peak": peaks, "machine": info, "peer": peer}
  print(json.dumps(report.json_safe(result)))


def main_mix(f, config: ml_collections.ConfigDict) -> None:
  """`--mix`: checks the flags, runs `mix.run_mix` and prints its JSON line."""
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
    num_canvases = cases.parse_positive_ints("mix_canvases", list(f.mix_canvases))
    single = cases.parse_size(f.mix_single) if f.mix_single else cases.default_canvas(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  dtype = f.dtype[0] if f.dtype else config.model.dtype
  try:
    cases.check_dtype(dtype)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if f.peer:   # before JAX starts its backend: leave accelerator memory to torch too
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  try:
    plan = size_mix.plan_mix(config, f.mix, num_canvases, single, f.mix_multiple)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  result = mix.run_mix(config, plan, dtype=dtype, steps=f.steps, num_gt=f.num_gt, peer=f.peer,
                       peer_sizes=f.peer_sizes, flop_sizes=f.flop_sizes,
                       peak_size=f.peak_size)
  print(json.dumps(report.json_safe(result)))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
