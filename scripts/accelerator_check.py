r"""One-shot accelerator check: speed, MFU, a per-stage profile and torchvision, in a time budget.

On any GPU or TPU machine, from the repository root (random weights on VOC-shaped canvases;
`--config` picks the backbone: experiments/voc.py VGG16, voc_zf.py ZF, voc_r101_c4.py /
coco_r50_c4.py ResNet C4, coco_r50_fpn.py ResNet-50-FPN):

  pip install -e . "jax[cuda12]"      # on a TPU VM: pip install -e . "jax[tpu]"
  pip install torch torchvision       # optional: the torchvision comparison
  XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/accelerator_check.py \
      --config experiments/voc.py --output benchmarks/accelerator --budget_s 420

It ends within `--budget_s` seconds whatever happens (a watchdog writes what has been measured
and exits), writing after every item, so an interrupted run still leaves its figures. Items, most
important first, each started only while the time left covers its estimated cost (the slowest
item of its kind so far; `frcnn_jax.benchmarking.budget`):

1. the matmul peak of each dtype (`frcnn_jax.benchmarking.mfu.matmul_peaks`);
2. the first `--dtype` on the first `--sizes` canvas at the profiled per-device batch
   (`--profile_batch`): training step and inference (`frcnn_jax.benchmarking.rows`: compile
   time, images/s, FLOPs, MFU);
3. a `jax.profiler` trace of that training step (its program comes from the compilation
   cache), summarised per stage (`frcnn_jax.benchmarking.stage_profile`);
4. torchvision's same architecture for the config's backbone (`frcnn_jax.benchmarking.peer`,
   when torch and torchvision are installed and the model is torchvision's: full width) on
   item 2's row, and the speed-ups;
5. the first dtype at the other batches, then torchvision on them;
6. the other dtypes at the same canvas and batches;
7. the cost of GPU determinism: the profiled case again in a child process with
   `XLA_FLAGS=--xla_gpu_deterministic_ops=true`, then `--xla_gpu_exclude_nondeterministic_ops=true`
   (`--deterministic`; flags a backend does not know make the child fail, which is recorded);
8. the other canvases in each dtype (batch 1 and the best batch);
9. torchvision on the remaining rows.

Items 2-4 give each of the three targets a figure, so that a run whose compiles are slow still
answers all three before the batch sweep.

Input: the rows' Batches are what the pipeline ships under `data.resize_on` (its "auto" is
the device on GPUs and TPUs): decoded VOC-sized images (long side 500) that the step resizes,
flips and pads (`frcnn_jax.ops.images.batch_images`, counted in the step's time and FLOPs).

Content pixels: MFU counts the FLOPs of the image content, not of canvas padding: each canvas is
given the largest common VOC shape (4:3 or 3:2 at shorter side `data.min_size`) that fits in it,
and the content MFU is the MFU times content / canvas pixels (`mfu.add_content_mfu`).

Targets printed next to the figures (`frcnn_jax.benchmarking.accelerator_report`): >= 40%
content MFU in bfloat16 training at the best batch; inference >= 3x torchvision's images/s; no
stage but the matmuls above 15% of the step (every stage's non-matmul time and the device's
idle time).

Compiling dominates a fresh run. Each row is compiled and then measured at once, so whatever
the budget allows is measured; `--precompile_threads=N` instead first compiles the main
dtype's rows in N threads into JAX's persistent compilation cache (`--compilation_cache`),
which the rows and the profile then load (a rerun on the same machine compiles nothing). A
fresh GPU run needs a budget of several minutes (benchmarks/RESULTS.md, section "H200").

Outputs in `--output` (at most 3 files): results.json (every figure, the machine, versions,
what was skipped and why), summary.md (tables, targets) and train_step_trace.json.gz (the
profiled steps' perfetto trace, only if under 8 MiB; open in ui.perfetto.dev).
"""

import time

_T0 = time.monotonic()   # the budget counts from here, before the slow imports

import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys
import tempfile

import jax
from absl import app
from absl import flags

from frcnn_jax.benchmarking import accelerator
from frcnn_jax.benchmarking import budget
from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import mfu
from frcnn_jax.config import flags as config_flags
from frcnn_jax.runtime import host_memory
from frcnn_jax.runtime import parallel


def define_flags() -> None:
  """The command-line flags (only when run as a program)."""
  config_flags.define_config_flag()
  flags.DEFINE_string("output", "benchmarks/accelerator", "Folder for results.json, "
                      "summary.md and the trace (created; a folder that already holds "
                      "results.json is refused unless --overwrite).")
  flags.DEFINE_float("budget_s", 420.0, "Wall-clock budget of the whole run, in seconds.")
  flags.DEFINE_list("sizes", ["608x800", "800x608", "608x928", "1000x1000"],
                    "Canvases HxW; the first is the main one.")
  flags.DEFINE_list("batch", ["1", "2", "4", "8"], "Images per device per step.")
  flags.DEFINE_list("dtype", ["bfloat16", "float32"], "Compute dtypes; the first is the main.")
  flags.DEFINE_integer("steps", 5, "Timed repetitions per row (after one warm-up).")
  flags.DEFINE_integer("num_gt", 5, "Ground-truth boxes per image.")
  flags.DEFINE_integer("profile_batch", 2, "Per-device batch of the profiled step.")
  flags.DEFINE_integer("profile_steps", 3, "Traced training steps.")
  flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier check in "
                    "--output.")
  flags.DEFINE_bool("peer", True, "Time torchvision's Faster R-CNN when it is installed.")
  flags.DEFINE_bool("deterministic", True, "Measure the determinism flags' cost (child "
                    "processes).")
  flags.DEFINE_integer("peak_size", 0, "Matmul-peak matrix side (0: 2048 on CPU, 8192 on "
                       "accelerators).")
  flags.DEFINE_string("compilation_cache", os.path.join(tempfile.gettempdir(),
                                                        "frcnn_jax_compile_cache"),
                      "JAX persistent compilation cache (\"\": off); the profiled step and "
                      "reruns reuse compiled programs.")
  flags.DEFINE_integer("precompile_threads", 0, "Compile the main dtype's rows in this many "
                       "threads before timing anything (the rows then load them from the "
                       "compilation cache); 0: off.")
  flags.DEFINE_string("child_case", "", "Internal: measure one DTYPE:HxW:BATCH row and print "
                      "it as JSON (the determinism child).")


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise app.UsageError("--config is required (e.g. experiments/voc.py)")
  if f.child_case:
    print(accelerator.child_row(config, f.child_case, f.steps, f.num_gt), flush=True)
    return
  if f.budget_s <= budget.RESERVE_S:
    raise app.UsageError(f"--budget_s must exceed {budget.RESERVE_S:.0f} s")
  if host_memory.wanted(config.train.reuse_host_memory):   # as in training (XLA:CPU only)
    host_memory.keep_freed_memory()
  if f.peer or f.deterministic:   # before JAX starts its backend: share the accelerator's
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # memory (torch, child)
  if f.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", f.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  dtypes = list(f.dtype)
  try:
    sizes = [cases.parse_size(s) for s in f.sizes]
    batches = cases.parse_positive_ints("batch", list(f.batch))
    cases.make_cases(config, dtypes=dtypes, sizes=f.sizes, batch=f.batch)   # validates
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if os.path.exists(os.path.join(f.output, budget.RESULTS)) and not f.overwrite:
    raise app.UsageError(f"{f.output} holds an earlier check's results: choose another "
                         "--output, or pass --overwrite to replace them")
  run = accelerator.new_run(f.output, f.budget_s, sys.argv, start=_T0)
  os.makedirs(f.output, exist_ok=True)
  timer = run.watchdog()
  timer.start()
  run.result["machine"] = machine.versions()
  print(f"machine: {run.result['machine']}", flush=True)
  run.write()

  proposals = int(config.rpn.post_nms_top_n_test)
  case = lambda d, hw, b: cases.Case(d, hw[0], hw[1], b, proposals, cases.PARTS)
  main_dtype, main_size = dtypes[0], sizes[0]
  mesh = parallel.make_mesh()
  start = time.monotonic()
  peaks = mfu.matmul_peaks(sorted(set(dtypes)), f.peak_size)
  run.took("peaks", time.monotonic() - start)
  run.result["matmul_peak"] = peaks
  run.write()

  measure = lambda d, hw, b: accelerator.measure(run, config, mesh, case(d, hw, b), f.steps,
                                                 f.num_gt, peaks)
  peer = lambda rows: accelerator.peer(run, config, rows, f.steps, f.num_gt)
  profile_batch = f.profile_batch if f.profile_batch in batches else batches[0]
  main_batches = [profile_batch] + [b for b in batches if b != profile_batch]
  accelerator.precompile(run, config, mesh, [case(main_dtype, main_size, b)
                                             for b in main_batches],
                         f.num_gt, f.precompile_threads)
  measure(main_dtype, main_size, profile_batch)
  try:
    accelerator.profile(run, config, mesh, main_dtype, *main_size, profile_batch,
                        f.profile_steps, f.num_gt)
  except Exception as e:  # pylint: disable=broad-except
    run.error(f"profile: {type(e).__name__}: {str(e)[:500]}")
    print(f"profile failed: {e}", flush=True)
  if f.peer:
    peer([case(main_dtype, main_size, profile_batch)])
  for b in main_batches[1:]:
    measure(main_dtype, main_size, b)
  if f.peer:
    peer([case(main_dtype, main_size, b) for b in main_batches])
  for d in dtypes[1:]:
    for b in batches:
      measure(d, main_size, b)
  if f.deterministic:
    baseline = next((r for r in run.result["rows"] if r["dtype"] == main_dtype
                     and (r["height"], r["width"]) == main_size
                     and r["batch"] == profile_batch), None)
    accelerator.determinism(run, os.path.abspath(__file__), accelerator.config_argv(sys.argv),
                            main_dtype, *main_size, profile_batch, f.steps, baseline)
  for d in dtypes:
    done = [r for r in run.result["rows"] if r["dtype"] == d]
    best = max(done, key=lambda r: r["train_images_per_s"] or 0.0)["batch"] if done else 1
    for size in sizes[1:]:
      for b in sorted({1, best}):
        measure(d, size, b)
  if f.peer:
    peer([case(r["dtype"], (r["height"], r["width"]), r["batch"]) for r in run.result["rows"]])
  timer.cancel()
  run.write(final=True)
  with open(os.path.join(f.output, budget.SUMMARY)) as summary:
    print(summary.read(), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
