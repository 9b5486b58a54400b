"""A traced training step summarised per stage (trunk, RPN, proposals, RoI ops, losses, ...).

Each traced op event names its HLO instruction ("hlo_op"); the compiled program's text gives
that instruction's scope path and whether it is a convolution or matrix product
(`frcnn_jax.benchmarking.hlo`). Op time is exclusive (nested events subtracted), on the
device's own timeline where the trace has one (GPU, TPU), else the host's (CPU). Reported per
step: time per stage, its matmul and other parts, device-busy time against the step's wall
time (the gap is host syncs and launch gaps), and the extra wall time when the batch comes
from the host every step ("input transfer"). On a GPU, when the annotated kernels cover less
than half of the step (kernels replayed from CUDA graphs may carry no HLO op), the step is
compiled again without command buffers and traced again (said in the profile). When the trace
yields no op events at all, stage-ablated programs are timed instead (trunk+RPN forward,
proposals, the rest of the forward, backward, optimizer).
"""

import collections
import dataclasses
import functools
import gzip
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import ml_collections

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import hlo
from frcnn_jax.benchmarking import timing
from frcnn_jax.detection import detector
from frcnn_jax.models import faster_rcnn
from frcnn_jax.ops import images as image_ops

MAX_TRACE_BYTES = 8 * 2**20   # a larger perfetto trace is not copied to the output
TRACE_NAME = "train_step_trace.json.gz"


def load_trace_events(path: str) -> list[dict[str, Any]]:
  """The events of a gzipped Chrome/perfetto JSON trace."""
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_times(events: list[dict[str, Any]]) -> tuple[dict[str, float], float, str]:
  """Exclusive seconds per HLO op from trace events.

  Only complete events ("ph" X) with an "hlo_op" argument count, of the device processes
  (names with "/device:") when they have any, else of every process; only the most frequent
  HLO module's events (the profiled program's). A nested event's time is taken from its
  parent's.

  Returns:
    ({hlo_op: exclusive seconds}, busy seconds (top-level events merged over threads), the
    timeline used: "device" or "host").
  """
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  ops = [e for e in events if e.get("ph") == "X" and isinstance(e.get("args"), dict)
         and "hlo_op" in e["args"] and "dur" in e]
  device = [e for e in ops if "/device:" in names.get(e["pid"], "")]
  timeline = "device" if device else "host"
  ops = device or ops
  if not ops:
    return {}, 0.0, timeline
  module = collections.Counter(e["args"].get("hlo_module", "") for e in ops).most_common(1)[0][0]
  ops = [e for e in ops if e["args"].get("hlo_module", "") == module]
  by_thread = collections.defaultdict(list)
  for e in ops:
    by_thread[(e["pid"], e["tid"])].append(e)
  exclusive: dict[str, float] = collections.defaultdict(float)
  intervals = []   # top-level events, for the busy time
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    stack: list[list] = []   # open events: [end, hlo_op, time of direct children]
    for e in thread_events:
      start, dur, name = float(e["ts"]), float(e["dur"]), e["args"]["hlo_op"]
      while stack and start >= stack[-1][0]:
        _, parent, children = stack.pop()
        exclusive[parent] -= children
      if stack:
        stack[-1][2] += dur
      else:
        intervals.append((start, start + dur))
      exclusive[name] += dur
      stack.append([start + dur, name, 0.0])
    for _, parent, children in stack:
      exclusive[parent] -= children
  intervals.sort()
  busy, cur_start, cur_end = 0.0, None, None
  for start, end in intervals:
    if cur_end is None or start > cur_end:
      if cur_end is not None:
        busy += cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  if cur_end is not None:
    busy += cur_end - cur_start
  return {k: v * 1e-6 for k, v in exclusive.items()}, busy * 1e-6, timeline   # us -> s


def stage_summary(times: dict[str, float], ops: dict[str, dict[str, Any]], steps: int
                  ) -> dict[str, Any]:
  """Per-step seconds per stage from op times (`op_times`) and the program's ops (`hlo_ops`).

  Returns:
    {"op_seconds_per_step", "stages": {stage: {"s", "matmul_s", "other_s", "fraction",
     "other_fraction"}} (largest first; fractions of all op time), "unmapped_op_seconds_per_step"
     (ops missing from the program's text), "top_ops": the 25 slowest ops}.
  """
  stages: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: {"s": 0.0, "matmul_s": 0.0, "other_s": 0.0})
  unknown = 0.0
  for name, seconds in times.items():
    info = ops.get(name)
    if info is None:
      unknown += seconds
    stage, matmul = hlo.op_stage(info)
    s = stages[stage]
    s["s"] += seconds / steps
    s["matmul_s" if matmul else "other_s"] += seconds / steps
  total = sum(s["s"] for s in stages.values())
  for s in stages.values():
    s["fraction"] = s["s"] / total if total else 0.0
    s["other_fraction"] = s["other_s"] / total if total else 0.0
  top = sorted(times.items(), key=lambda kv: -kv[1])[:25]
  return {
      "op_seconds_per_step": total,
      "stages": dict(sorted(stages.items(), key=lambda kv: -kv[1]["s"])),
      "unmapped_op_seconds_per_step": unknown / steps,
      "top_ops": [{"hlo_op": n, "s_per_step": t / steps,
                   "op_name": ops.get(n, {}).get("op_name", ""),
                   "matmul": ops.get(n, {}).get("matmul"),
                   "stage": hlo.op_stage(ops.get(n))[0]} for n, t in top],
  }


def worst_non_matmul(profile: dict[str, Any]) -> tuple[str, float]:
  """The largest share of the step that is not matmul work: (what, fraction of the step).

  Candidates: every stage's non-matmul op time over all op time, and the device's idle share
  of the step's wall time ("idle_fraction"). ("-", NaN) without either.
  """
  candidates = [(f"{name} (non-matmul)", s["other_fraction"])
                for name, s in profile.get("stages", {}).items()]
  if profile.get("idle_fraction") is not None:
    candidates.append(("device idle (host syncs, launch gaps)", profile["idle_fraction"]))
  return max(candidates, key=lambda c: c[1]) if candidates else ("-", math.nan)


def brief(profile: dict[str, Any]) -> dict[str, Any]:
  """The profile without its op list, stages as fractions, floats rounded (a progress line)."""
  return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in profile.items()
          if k not in ("top_ops", "stages")} | {
              "stages": {n: round(s.get("fraction", 0.0), 3)
                         for n, s in profile.get("stages", {}).items()}}


def ablation_stages(programs: cases.Programs, params: Any, batch: Any, step_s: float
                    ) -> dict[str, Any]:
  """Fallback: per-stage seconds from programs that stop at stage boundaries.

  forward = the loss; backward = value_and_grad - forward; optimizer = the step - value_and_grad;
  the trunk + RPN forward and the training proposals (`detector.proposals` with the training
  counts) are timed alone on the same inputs (and are part of the forward).

  Returns:
    {stage: {"s", "fraction" (of `step_s`), "matmul_s": None, "other_s": None,
     "other_fraction"}}; proposals and the optimizer count as non-matmul work.
  """
  model, settings = programs.model, programs.settings
  key = jax.random.key(0)
  loss_of = lambda p, b: detector.loss_fn(p, b, key, model=model, settings=settings)[0]
  loss, grad = jax.jit(loss_of), jax.jit(jax.value_and_grad(loss_of))
  trunk = jax.jit(lambda p, b: model.apply(
      {"params": p}, image_ops.batch_images(b), b["image_hw"],
      method=faster_rcnn.FasterRCNN.features_and_rpn))
  rpn = settings.rpn
  train_counts = dataclasses.replace(settings, rpn=dataclasses.replace(
      rpn, pre_nms_top_n_test=rpn.pre_nms_top_n_train,
      post_nms_top_n_test=rpn.post_nms_top_n_train))
  props = functools.partial(detector.proposals, model=model, settings=train_counts)
  forward = timing.median_seconds(lambda: loss(params, batch))
  with_grad = timing.median_seconds(lambda: grad(params, batch))
  trunk_rpn = timing.median_seconds(lambda: trunk(params, batch))
  proposals = timing.median_seconds(lambda: props(params, batch)) - trunk_rpn
  parts = {"trunk_rpn_forward": trunk_rpn, "proposals_nms": proposals,
           "targets_roi_head_losses_forward": forward - trunk_rpn - proposals,
           "backward": with_grad - forward, "optimizer": step_s - with_grad}
  return {name: {"s": s, "fraction": s / step_s if step_s else 0.0,
                 "matmul_s": None, "other_s": None,
                 "other_fraction": (s / step_s if step_s and name in ("proposals_nms",
                                                                      "optimizer") else 0.0)}
          for name, s in parts.items()}


def _trace(compiled, run_steps, steps: int, trace_dir: str, name: str
           ) -> tuple[dict[str, float], float, str, str | None]:
  """Traces `steps` steps of `compiled`: (op seconds, busy seconds, timeline, trace path)."""
  directory = os.path.join(trace_dir, name)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    run_steps(compiled, steps, False)
  traces = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs
            if f.endswith("perfetto_trace.json.gz")]
  if not traces:
    return {}, 0.0, "none", None
  return (*op_times(load_trace_events(traces[0])), traces[0])


def profile_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, dtype: str,
                       height: int, width: int, batch: int, steps: int, num_gt: int,
                       output: str) -> dict[str, Any]:
  """Traces `steps` training steps of a row and summarises the op time per stage.

  Args:
    config: the experiment config.
    mesh: the data mesh.
    dtype: compute dtype.
    height: canvas height.
    width: canvas width.
    batch: images per device.
    steps: traced steps.
    num_gt: ground-truth boxes per image.
    output: folder that receives TRACE_NAME (the trace, when under MAX_TRACE_BYTES).

  Returns:
    {"dtype", "height", "width", "batch", "steps", "compile_s", "wall_step_s",
     "input_transfer_s", "timeline", "source" ("trace" or "ablation"), "stages", and from a
     trace also `stage_summary`'s entries, "device_busy_s" and "idle_fraction"}.
  """
  case = cases.Case(dtype, height, width, batch, int(config.rpn.post_nms_top_n_test),
                    ("train",))
  programs, state = cases.build(config, case, mesh)
  host = programs.host_batch(batch, height, width, num_gt)
  device_batch = programs.global_batch(host)
  compile_start = time.monotonic()
  lowered = programs.train.lower(state, device_batch)
  compiled = lowered.compile()
  profile: dict[str, Any] = {"dtype": dtype, "height": height, "width": width, "batch": batch,
                             "steps": steps, "compile_s": time.monotonic() - compile_start}
  holder = {"state": state}
  del state

  def run_steps(program, n: int, from_host: bool) -> list[float]:
    times = []
    for _ in range(n):
      t = time.perf_counter()
      b = programs.global_batch(host) if from_host else device_batch
      holder["state"], metrics = program(holder["state"], b)
      jax.block_until_ready((holder["state"], metrics))
      times.append(time.perf_counter() - t)
    return times

  run_steps(compiled, 2, False)
  upper_median = lambda times: sorted(times)[len(times) // 2]
  step_s = upper_median(run_steps(compiled, max(steps, 3), False))
  profile["wall_step_s"] = step_s
  profile["input_transfer_s"] = upper_median(run_steps(compiled, max(steps, 3), True)) - step_s
  trace_dir = tempfile.mkdtemp(prefix="frcnn_trace_")
  try:
    times, busy, timeline, trace = _trace(compiled, run_steps, steps, trace_dir, "default")
    gpu = jax.devices()[0].platform in ("gpu", "cuda", "rocm")
    if gpu and (not times or busy / steps < 0.5 * step_s):
      # Kernels replayed from CUDA graphs may lack their HLO op annotation: trace a build
      # without command buffers (another compile) and say so.
      profile["annotated_share_with_command_buffers"] = busy / steps / step_s
      compiled = lowered.compile(compiler_options={"xla_gpu_enable_command_buffer": ""})
      run_steps(compiled, 2, False)
      times, busy, timeline, trace = _trace(compiled, run_steps, steps, trace_dir, "nocb")
      profile["command_buffers"] = "off for the trace (xla_gpu_enable_command_buffer='')"
    profile["timeline"] = timeline
    if times:
      profile["source"] = "trace"
      profile.update(stage_summary(times, hlo.hlo_ops(compiled.as_text()), steps))
      profile["device_busy_s"] = busy / steps
      profile["idle_fraction"] = max(0.0, 1.0 - busy / steps / step_s) if step_s else None
      if trace and os.path.getsize(trace) <= MAX_TRACE_BYTES:
        shutil.copyfile(trace, os.path.join(output, TRACE_NAME))
    else:
      profile["source"] = "ablation"
      profile["stages"] = ablation_stages(programs, holder["state"].params, device_batch,
                                          step_s)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  return profile

