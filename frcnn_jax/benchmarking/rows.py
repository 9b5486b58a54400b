"""One benchmark row measured: compile time, seconds per image, images/s, FLOPs and memory.

Each timed part of a row (the training step, inference) is lowered and compiled (compile
time), run once to warm up, then timed `steps` times, each run until its outputs are ready;
the median is reported as seconds per image (over the global batch: every device's images)
and images/s. FLOPs come from XLA's cost analysis of one device's compiled program. Memory:
the compiled program's buffers, and the peak so far in this process
(`frcnn_jax.benchmarking.machine.peak_memory`).
"""

import functools
import os
import statistics
from typing import Any

import jax
import ml_collections

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import flops
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import report
from frcnn_jax.benchmarking import timing

PARTS = cases.PARTS
PART_KEYS = ("step_time_s", "images_per_s", "compile_s", "runs_s", "cpu_runs_s",
             "cpu_step_time_s", "flops_per_image", "program_mib")


def _optional_div(value: float | None, by: float) -> float | None:
  return None if value is None else value / by


def measure_case(config: ml_collections.ConfigDict, case: cases.Case, mesh: jax.sharding.Mesh,
                 steps: int, num_gt: int) -> dict[str, Any]:
  """Compiles and times one row.

  Args:
    config: the experiment config (the row's dtype and proposals replace its own).
    case: the row.
    mesh: the data mesh; the global batch is `case.batch` per device.
    steps: timed runs of each part.
    num_gt: valid ground-truth boxes per image.

  Returns:
    The row's figures: for each part in PARTS "{part}_" + each of PART_KEYS (None for parts
    not timed; "runs_s" / "cpu_runs_s" list every timed step's seconds), "train_finite",
    "train_step_s" and "infer_s" (seconds per image), "compile_s" (both parts),
    "peak_memory_mib", "memory_source", "device", "num_devices", "height", "width",
    "batch", "global_batch", "steps", "dtype", "roi_op", "post_nms_top_n_test",
    "post_nms_top_n_train", "xla_flags", "load_avg_1min" and "group".
  """
  programs, state = cases.build(config, case, mesh)
  c = programs.config
  global_batch = case.batch * mesh.devices.size
  batch = programs.global_batch(programs.host_batch(case.batch, case.height, case.width,
                                                    num_gt))
  row: dict[str, Any] = {"group": case.group}
  for part in PARTS:
    row.update({f"{part}_{k}": None for k in PART_KEYS})

  if "train" in case.parts:
    compiled, row["train_compile_s"] = timing.compile_timed(programs.train, state, batch)
    holder = {"state": state}
    del state

    def run_train():
      holder["state"], holder["metrics"] = compiled(holder["state"], batch)
      return holder["state"], holder["metrics"]

    row["train_runs_s"], row["train_cpu_runs_s"] = timing.timed_runs(run_train, steps)
    row["train_finite"] = bool(holder.pop("metrics")["finite"])
    state = holder.pop("state")
    row["train_flops_per_image"] = _optional_div(flops.program_flops(compiled), case.batch)
    row["train_program_mib"] = machine.program_mib(compiled)
    del compiled
  if "infer" in case.parts:
    compiled, row["infer_compile_s"] = timing.compile_timed(programs.predict, state.params,
                                                            batch)
    row["infer_runs_s"], row["infer_cpu_runs_s"] = timing.timed_runs(
        functools.partial(compiled, state.params, batch), steps)
    row["infer_flops_per_image"] = _optional_div(flops.program_flops(compiled), case.batch)
    row["infer_program_mib"] = machine.program_mib(compiled)
    del compiled
  del state
  for part in PARTS:
    if row[f"{part}_runs_s"] is not None:
      step = statistics.median(row[f"{part}_runs_s"])
      row[f"{part}_step_time_s"] = step
      row[f"{part}_images_per_s"] = global_batch / step
      row[f"{part}_cpu_step_time_s"] = statistics.median(row[f"{part}_cpu_runs_s"])
  memory, source = machine.peak_memory()
  row.update({
      "train_step_s": _optional_div(row["train_step_time_s"], global_batch),
      "infer_s": _optional_div(row["infer_step_time_s"], global_batch),
      "compile_s": sum(row[f"{p}_compile_s"] or 0.0 for p in PARTS),
      "peak_memory_mib": memory, "memory_source": source,
      "device": machine.device_name(), "num_devices": mesh.devices.size,
      "height": case.height, "width": case.width, "batch": case.batch,
      "global_batch": global_batch, "steps": steps, "dtype": case.dtype,
      "roi_op": c.model.roi_op, "post_nms_top_n_test": case.proposals,
      "post_nms_top_n_train": int(c.rpn.post_nms_top_n_train),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_avg_1min": round(os.getloadavg()[0], 2),
  })
  return row


def progress_line(case: cases.Case, row: dict[str, Any]) -> str:
  """The one-line summary printed after a row is measured."""
  return (f"measured {case.dtype} {case.height}x{case.width} batch {case.batch}/device, "
          f"{case.proposals} test proposals: train {report.fmt(row['train_step_s'], '.3f')} "
          f"s/image, infer {report.fmt(row['infer_s'], '.3f')} s/image, compile "
          f"{row['compile_s']:.1f} s (load {row['load_avg_1min']})")


def print_table(rows: list[dict[str, Any]]) -> None:
  """Prints one line per row (seconds/image, images/s, compile, GFLOP/image, MFU, CPU-time
  MFU, cores, program memory, load), then the rows with torchvision's figures beside ours."""
  fmt = report.fmt
  header = (f"{'dtype':<9}{'HxW':>10}{'b/dev':>6}{'props':>6} | {'train s/im':>10}"
            f"{'im/s':>7}{'infer s/im':>11}{'im/s':>7} | {'compile s':>11} | "
            f"{'GFLOP/im tr/inf':>16} | {'MFU tr/inf':>12} | {'CPU-time MFU':>13} | "
            f"{'cores':>9} | {'prog MiB tr/inf':>16} | {'load':>5}")
  print(header)
  print("-" * len(header))
  for r in rows:
    gflops = "/".join(fmt(r[f"{p}_flops_per_image"] and r[f"{p}_flops_per_image"] / 1e9,
                          ".1f") for p in PARTS)
    mfu = "/".join(fmt(r.get(f"{p}_mfu") and 100 * r[f"{p}_mfu"], ".1f") for p in PARTS)
    cpu_mfu = "/".join(fmt(r.get(f"{p}_mfu_cpu_time") and 100 * r[f"{p}_mfu_cpu_time"], ".1f")
                       for p in PARTS)
    cores = "/".join(fmt(r.get(f"{p}_cores_used"), ".2f") for p in PARTS)
    compile_s = "/".join(fmt(r[f"{p}_compile_s"], ".1f") for p in PARTS)
    memory = "/".join(fmt(r[f"{p}_program_mib"], ".0f") for p in PARTS)
    print(f"{r['dtype']:<9}{r['height']:>5}x{r['width']:<4}{r['batch']:>6}"
          f"{r['post_nms_top_n_test']:>6} | {fmt(r['train_step_s'], '10.3f')}"
          f"{fmt(r['train_images_per_s'], '7.2f')}{fmt(r['infer_s'], '11.3f')}"
          f"{fmt(r['infer_images_per_s'], '7.2f')} | {compile_s:>11} | {gflops:>16} | "
          f"{mfu + '%':>12} | {cpu_mfu + '%':>13} | {cores:>9} | {memory:>16} | "
          f"{r['load_avg_1min']:>5.2f}")
  peered = [r for r in rows if "peer_infer_s" in r]
  if peered:
    print("\nvs torchvision (same device, per device):")
    print(f"{'dtype':<9}{'HxW':>10}{'b/dev':>6} | {'train s/im ours':>15}{'torchvision':>12}"
          f"{'speed-up':>9} | {'infer s/im ours':>15}{'torchvision':>12}{'speed-up':>9}")
    for r in peered:
      print(f"{r['dtype']:<9}{r['height']:>5}x{r['width']:<4}{r['batch']:>6} | "
            f"{fmt(r['train_step_s'], '15.3f')}{r['peer_train_step_s']:>12.3f}"
            f"{fmt(r.get('train_speedup_vs_peer'), '8.2f')}x | "
            f"{fmt(r['infer_s'], '15.3f')}{r['peer_infer_s']:>12.3f}"
            f"{fmt(r.get('infer_speedup_vs_peer'), '8.2f')}x")
