r"""One-shot accelerator check: speed, MFU, a per-stage profile and torchvision, in a time budget.

The command for one GPU (an H200 or H100; VGG16 on VOC-shaped canvases, random weights), from
the repository root (frcnn_jax need not be installed; ml_collections, grain (with array_record
and portpicker) and pycocotools must import, as `frcnn_jax.train` imports them):

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 python3 scripts/accelerator_check.py \
      --config experiments/voc.py --output benchmarks/accelerator --budget_s 420

On this project's device machine, with those packages carried as wheels in .whl/ (run's carry
[".whl"], timeout_s 480, the outputs under $OUT/accelerator). .whl/ is not in git: fetch the six
wheels the 2026-11-30 runs used with the device README's `pip download` line (cp312,
manylinux): ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6
portpicker==1.6.0 pycocotools==2.0.11 tensorboardx==2.6.5.

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 python3 scripts/accelerator_check.py \
      --config experiments/voc.py --output $OUT/accelerator --budget_s 420

It ends within `--budget_s` seconds whatever happens (a watchdog writes what has been measured
and exits), writing after every item, so an interrupted run still leaves its figures. Items, most
important first, each started only while the time left covers its estimated cost (the slowest
item of its kind so far):

1. the matmul peak of each dtype (`scripts/benchmark.py`'s `matmul_peaks`);
2. bfloat16 on the first `--sizes` canvas at the profiled per-device batch (`--profile_batch`,
   2): training step and inference (`benchmark.measure_case`: compile time, images/s, FLOPs,
   MFU);
3. a `jax.profiler` trace of that training step (its program comes from the compilation
   cache), summarised per stage (below);
4. torchvision's same model (`benchmark.run_peer`, when torch and torchvision are installed) on
   item 2's row, and the speed-ups;
5. bfloat16 at the other batches (1, 4, 8), then torchvision on them;
6. float32 at the same canvas and batches;
7. the cost of GPU determinism: the profiled case again in a child process with
   `XLA_FLAGS=--xla_gpu_deterministic_ops=true`, then `--xla_gpu_exclude_nondeterministic_ops=true`
   (`--deterministic`; flags a backend does not know make the child fail, which is recorded);
8. the other canvases in bfloat16 (batch 1 and the best batch), then in float32;
9. torchvision on the remaining rows.

Items 2-4 give each of the three targets a figure, so that a run whose compiles are slow (on
the H200, eight bf16 programs compiling in four threads had not finished after 185 s) still
answers all three before the batch sweep.

Per-stage profile: the step's stages carry `jax.named_scope`s (detector.py: "proposals",
"rpn_targets", "roi_sampling", "losses", "postprocess"; train.py: "optimizer"; ops/images.py:
"input_resize", the device's resize of the input; Flax's module
scopes give "trunk", "rpn", "head" and the RoI op `_roi_features`). Each traced op event names
its HLO instruction (`hlo_op`); the compiled program's text gives that instruction's scope path
(`metadata op_name`) and whether it is a convolution or matrix product (also inside fusions and
cuBLAS/cuDNN custom calls). Op time is exclusive (nested events subtracted), on the device's own
timeline where the trace has one (GPU, TPU), else the host's (CPU). Reported per step: time per
stage, its matmul and other parts, device-busy time vs the step's wall time (the gap is host
syncs and launch gaps), and the extra wall time when the batch comes from the host every step
("input transfer"). On a GPU, when the annotated kernels cover less than half of the step
(kernels replayed from CUDA graphs may carry no HLO op), the step is compiled again without
command buffers and traced again (said in the profile). When the trace yields no op events at
all, stage-ablated programs are timed instead (trunk+RPN forward, proposals, the rest of the
forward, backward, optimizer).

Input: the rows' Batches are what the pipeline ships under `data.resize_on` (its "auto" is
the device on GPUs and TPUs): decoded VOC-sized images (long side 500) that the step resizes,
flips and pads (`frcnn_jax.ops.images.batch_images`, counted in the step's time and FLOPs).

Content pixels: MFU counts the FLOPs of the image content, not of canvas padding: each canvas is
given the largest common VOC shape (4:3 or 3:2 at shorter side `data.min_size`) that fits in it,
and the content MFU is the MFU times content / canvas pixels (a slight underestimate: the RoI
head's FLOPs do not shrink with the canvas).

Targets (issue 14) printed next to the figures: >= 40% content MFU in bfloat16 training at the
best batch; inference >= 3x torchvision's images/s; no stage but the matmuls above 15% of the
step (every stage's non-matmul time and the device's idle time).

Compiling dominates a fresh run. Each row is compiled and then measured at once, so whatever
the budget allows is measured; `--precompile_threads=N` instead first compiles the main
dtype's rows in N threads into JAX's persistent compilation cache (`--compilation_cache`),
which the rows and the profile then load (a rerun on the same machine compiles nothing). On
the H200 (2026-11-30, JAX 0.11.2) precompiling the eight bf16 608x800 programs (training and
inference, batch 1-8) in 4 threads had not finished after 185 s, and that run measured
nothing but the matmul peaks: give a fresh GPU run a budget of 420 s or more.

Outputs in `--output` (at most 3 files): results.json (every figure, the machine, versions,
what was skipped and why), summary.md (tables, targets) and train_step_trace.json.gz (the
profiled steps' perfetto trace, only if under 8 MiB; open in ui.perfetto.dev).
"""

import time

_T0 = time.monotonic()   # the budget counts from here, before the slow imports

import collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import datetime
import functools
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from importlib import metadata
from typing import Any

from absl import app
from absl import flags

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]   # benchmark.py, and frcnn_jax uninstalled
import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from frcnn_jax.config import build as builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.config import flags as config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.detection import detector  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.runtime import atomic_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.runtime import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.runtime import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from frcnn_jax.training import step as train_step

_json_safe = benchmark._json_safe  # pylint: disable=protected-access
_fmt = benchmark._fmt  # pylint: disable=protected-access

TARGET_MFU = 0.40
TARGET_INFER_SPEEDUP = 3.0
TARGET_STAGE_FRACTION = 0.15
DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops=true",
                     "--xla_gpu_exclude_nondeterministic_ops=true")
VOC_ASPECTS = (4 / 3, 3 / 2)
MAX_TRACE_BYTES = 8 * 2**20
RESERVE_S = 8.0          # kept for writing the outputs
FIRST_ITEM_GUESS_S = {"cpu": 0.0, "other": 60.0}   # cost guess before an item of a kind ran

# Stage of an HLO op: the innermost token of its scope path that names one.
SCOPE_STAGES = {
    "trunk": "trunk", "rpn": "rpn_head", "head": "roi_head",
    "_roi_features": "roi_ops", "head._roi_features": "roi_ops",
    "proposals": "proposals_nms", "rpn_targets": "rpn_targets", "roi_sampling": "roi_sampling",
    "losses": "losses", "optimizer": "optimizer", "postprocess": "postprocess",
    "input_resize": "input_resize",
}
_MATMUL_TARGET = re.compile(r"gemm|matmul|conv|cublas|cudnn", re.IGNORECASE)


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
  flags.DEFINE_integer("peak_size", 0, "Matmul-peak matrix side (0: benchmark.py's default).")
  flags.DEFINE_string("compilation_cache", os.path.join(tempfile.gettempdir(),
                                                        "frcnn_jax_compile_cache"),
                      "JAX persistent compilation cache (\"\": off); the profiled step and "
                      "reruns reuse compiled programs.")
  flags.DEFINE_integer("precompile_threads", 0, "Compile the main dtype's rows in this many "
                       "threads before timing anything (the rows then load them from the "
                       "compilation cache); 0: off.")
  flags.DEFINE_string("child_case", "", "Internal: measure one DTYPE:HxW:BATCH row and print "
                      "it as JSON (the determinism child).")


# ------------------------------------------------------------------------------------------
# Pure helpers (unit-tested).


def content_hw(height: int, width: int, min_size: int) -> tuple[int, int]:
  """The largest common VOC image (4:3 or 3:2 at shorter side min_size) inside a canvas.

  The orientation follows the canvas; a canvas too small for either aspect gets its own size
  (clipped to min_size on the shorter side).
  """
  short_side, long_side = min(height, width), max(height, width)
  s = min(short_side, min_size)
  fitting = [round(s * a) for a in VOC_ASPECTS if round(s * a) <= long_side]
  l = max(fitting) if fitting else long_side
  return (s, l) if height <= width else (l, s)


def _instruction(line: str) -> tuple[str, str, str] | None:
  """(name, opcode, rest) of an HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
  if not m:
    return None
  op = re.search(r"(?:^|[\s)\]}])([a-z][a-z0-9\-]*)\(", m.group(2))
  if not op:
    return None
  return m.group(1), op.group(1), m.group(2)


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Every instruction of a compiled module's text: {name: {"op_name", "opcode", "matmul"}}.

  "matmul" is True for convolutions and dot products, cuBLAS/cuDNN-style custom calls, and
  fusions (or calls) whose computation holds one of those, transitively.
  """
  computations: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
  current = ""
  for line in hlo_text.splitlines():
    header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*(?:->\s*.*)?\{\s*$", line)
    if header and " = " not in line:
      current = header.group(1)
      continue
    parsed = _instruction(line)
    if parsed:
      computations[current].append(parsed)

  direct: dict[str, bool] = {}
  calls: dict[str, list[str]] = {}
  for comp, instructions in computations.items():
    direct[comp] = any(_is_matmul_instruction(op, rest) for _, op, rest in instructions)
    calls[comp] = [c for _, _, rest in instructions for c in _called(rest)]

  memo: dict[str, bool] = {}

  def holds_matmul(comp: str, seen: frozenset = frozenset()) -> bool:
    if comp not in memo:
      memo[comp] = direct.get(comp, False) or any(
          holds_matmul(c, seen | {comp}) for c in calls.get(comp, ()) if c not in seen)
    return memo[comp]

  def own_op_name(rest: str) -> str:
    m = re.search(r'op_name="([^"]*)"', rest)
    return m.group(1) if m else ""

  def inner_op_name(comp: str, seen: frozenset = frozenset()) -> str:
    """The scope of a computation: its matmul's, else its most common (XLA's fusions and
    layout copies often carry no metadata of their own)."""
    names = [(own_op_name(rest), _is_matmul_instruction(op, rest))
             for _, op, rest in computations.get(comp, ())]
    for name, matmul in names:
      if name and matmul:
        return name
    common = collections.Counter(n for n, _ in names if n).most_common(1)
    if common:
      return common[0][0]
    for c in calls.get(comp, ()):
      if c not in seen and (found := inner_op_name(c, seen | {comp})):
        return found
    return ""

  result = {}
  for comp, instructions in computations.items():
    for name, op, rest in instructions:
      called = _called(rest)
      matmul = _is_matmul_instruction(op, rest) or (
          op in ("fusion", "call", "custom-call") and any(holds_matmul(c) for c in called))
      op_name = own_op_name(rest)
      if not op_name or (matmul and not _is_matmul_instruction(op, rest)):
        op_name = next((n for c in called if (n := inner_op_name(c))), op_name)
      result[name] = {"op_name": op_name, "opcode": op, "matmul": matmul, "computation": comp}
  return result


def _called(rest: str) -> list[str]:
  names = []
  for m in re.finditer(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest):
    names.append(m.group(1))
  for m in re.finditer(r"called_computations=\{([^}]*)\}", rest):
    names += [n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip()]
  return names


def _is_matmul_instruction(opcode: str, rest: str) -> bool:
  if opcode in ("convolution", "dot"):
    return True
  if opcode == "custom-call":
    m = re.search(r'custom_call_target="([^"]*)"', rest)
    return bool(m and _MATMUL_TARGET.search(m.group(1)))
  return False


def stage_of(op_name: str) -> str:
  """The stage of an op from its scope path (SCOPE_STAGES; "other" when none matches)."""
  stage = "other"
  for token in re.findall(r"[A-Za-z_][\w.]*", op_name):
    if token in SCOPE_STAGES:
      stage = SCOPE_STAGES[token]
    elif token.endswith("._roi_features"):
      stage = "roi_ops"
  return stage


def _load_trace_events(path: str) -> list[dict[str, Any]]:
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_times(events: list[dict[str, Any]]) -> tuple[dict[str, float], float, str]:
  """Exclusive seconds per HLO op from trace events, the busy (merged) seconds, and the
  timeline used ("device" or "host").

  Only complete events ("ph" X) with an "hlo_op" argument count, of the device processes
  (names with "/device:") when they have any, else of every process; only the most frequent
  HLO module's events (the profiled program's). A nested event's time is taken from its
  parent's.
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
  """Per-step seconds per stage (total, matmul, other), fractions, and the top ops."""
  stages: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: {"s": 0.0, "matmul_s": 0.0, "other_s": 0.0})
  unknown = 0.0
  for name, seconds in times.items():
    info = ops.get(name)
    if info is None:
      unknown += seconds
    stage, matmul = _op_stage(info)
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
                   "stage": _op_stage(ops.get(n))[0]} for n, t in top],
  }


def _op_stage(info: dict[str, Any] | None) -> tuple[str, bool]:
  """(stage, is matmul) of an hlo_ops entry; matmuls without a scope are "unscoped_matmul"
  (XLA:CPU's weight-gradient convolutions lose their metadata)."""
  if info is None:
    return "other", False
  stage = stage_of(info["op_name"])
  if stage == "other" and info["matmul"]:
    stage = "unscoped_matmul"
  return stage, info["matmul"]


def worst_non_matmul(profile: dict[str, Any]) -> tuple[str, float]:
  """The largest share of the step that is not matmul work: (what, fraction of the step).

  Candidates: every stage's non-matmul op time over all op time, and the device's idle share
  of the step's wall time.
  """
  candidates = [(f"{name} (non-matmul)", s["other_fraction"])
                for name, s in profile.get("stages", {}).items()]
  if profile.get("idle_fraction") is not None:
    candidates.append(("device idle (host syncs, launch gaps)", profile["idle_fraction"]))
  return max(candidates, key=lambda c: c[1]) if candidates else ("-", math.nan)


# ------------------------------------------------------------------------------------------
# The run.


class Run:
  """The measurements so far, the budget, and writing the outputs (also from the watchdog)."""

  def __init__(self, output: str, budget_s: float, argv: list[str],
               start: float | None = None):
    self.start = _T0 if start is None else start   # time.monotonic() of the budget's start
    self.budget_s = budget_s
    self.output = output
    self.lock = threading.RLock()
    self.child: subprocess.Popen | None = None
    self.durations: dict[str, float] = {}
    self.result: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(argv), "budget_s": budget_s, "complete": False, "rows": [],
        "peer": {"available": False, "error": "not run", "results": {}}, "profile": None,
        "determinism": [], "skipped": [], "errors": [], "matmul_peak": {}, "targets": {}}

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()

  def fits(self, kind: str, what: str, guess: float) -> bool:
    """True if the slowest earlier item of `kind` (or `guess`) fits in the time left."""
    estimate = self.durations.get(kind, guess)
    if self.left() - RESERVE_S >= estimate:
      return True
    with self.lock:
      self.result["skipped"].append(f"{what}: {self.left():.0f} s left, about {estimate:.0f} s "
                                    f"needed")
    print(f"skip {what} (budget: {self.left():.0f} s left, ~{estimate:.0f} s needed)",
          flush=True)
    return False

  def took(self, kind: str, seconds: float) -> None:
    self.durations[kind] = max(self.durations.get(kind, 0.0), seconds)

  def write(self, final: bool = False) -> None:
    """Writes results.json and summary.md (atomically: readers never see half a file)."""
    with self.lock:
      self.result["elapsed_s"] = round(self.elapsed(), 1)
      if final:
        self.result["complete"] = not self.result["skipped"] and not self.result["errors"]
      _evaluate_targets(self.result)
      os.makedirs(self.output, exist_ok=True)
      atomic_io.write_text(os.path.join(self.output, "results.json"),
                    json.dumps(_json_safe(self.result), indent=1))
      atomic_io.write_text(os.path.join(self.output, "summary.md"), markdown(self.result))

  def watchdog(self) -> threading.Timer:
    """A timer that writes the outputs and ends the process at the budget."""

    def expire():
      with self.lock:
        self.result["errors"].append(f"stopped by the watchdog at {self.budget_s:.0f} s")
        if self.child is not None and self.child.poll() is None:
          self.child.kill()
        self.write(final=True)
      print(f"budget of {self.budget_s:.0f} s reached: wrote {self.output}; exiting",
            flush=True)
      os._exit(0)

    timer = threading.Timer(max(self.budget_s - 3.0, 1.0), expire)
    timer.daemon = True
    return timer


def versions() -> dict[str, Any]:
  """JAX, jaxlib, plugin, CUDA and torch versions, and the device."""
  info = benchmark.machine()
  for package in ("flax", "optax", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu",
                  "torch", "torchvision"):
    try:
      info[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  try:
    info["platform_version"] = jax.devices()[0].client.platform_version
  except Exception:  # pylint: disable=broad-except
    pass
  if "torch" in sys.modules:
    info["torch_cuda"] = getattr(sys.modules["torch"].version, "cuda", None)
  return info


def precompile(run: Run, config, mesh, cases: list[benchmark.Case], num_gt: int,
               threads: int) -> None:
  """Compiles the cases' programs as `benchmark.measure_case` builds them, in parallel, into
  the persistent compilation cache (measure_case then loads them). Before any timing, so that
  compiling (GPU autotuning included) never overlaps a measurement."""
  if threads < 1 or not cases or not jax.config.jax_compilation_cache_dir:
    return
  if not run.fits("precompile", f"precompiling {len(cases)} rows", _guess()):
    return

  def one(case: benchmark.Case) -> None:
    c = benchmark.case_config(config, case)
    num_classes = len(c.data.classes)
    model = builders.model_from_config(c, num_classes)
    settings = builders.detector_settings_from_config(c)
    host = benchmark.synthetic_batch(case.batch * mesh.devices.size // jax.process_count(),
                                     case.height, case.width, c.data.max_gt, num_gt,
                                     num_classes, resize_on_device=builders.resize_on_device(c))
    batch = parallel.host_batch_to_global(host, mesh)
    state, tx, lr_fn = train_step.create_train_state(c, model, mesh)
    train_step.jit_train_step(model, settings, tx, lr_fn, mesh,
                         grad_accum_steps=c.train.grad_accum_steps).lower(state, batch).compile()
    jax.jit(functools.partial(detector.predict, model=model, settings=settings)).lower(
        state.params, batch).compile()

  start = time.monotonic()
  with futures.ThreadPoolExecutor(threads) as pool:
    for case, error in zip(cases, pool.map(_exception_of(one), cases)):
      if error:
        with run.lock:
          run.result["errors"].append(f"precompile {case}: {error}"[:600])
  seconds = time.monotonic() - start
  run.took("precompile", seconds)
  with run.lock:
    run.result["precompile"] = {"rows": len(cases), "threads": threads, "seconds": seconds}
  print(f"precompiled {len(cases)} rows in {seconds:.0f} s ({threads} threads)", flush=True)


def _exception_of(fn):
  def wrapped(*args):
    try:
      fn(*args)
      return None
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {e}"
  return wrapped


def measure(run: Run, config, mesh, case: benchmark.Case, steps: int, num_gt: int,
            peaks: dict[str, Any]) -> dict[str, Any] | None:
  """One benchmark row (benchmark.measure_case) with MFU and content MFU, added to the run."""
  what = f"{case.dtype} {case.height}x{case.width} batch {case.batch}"
  if not run.fits(f"row:{case.dtype}", what, _guess()):
    return None
  start = time.monotonic()
  try:
    row = benchmark.measure_case(config, case, mesh, steps, num_gt)
  except Exception as e:  # pylint: disable=broad-except   # e.g. out of memory: keep going
    with run.lock:
      run.result["errors"].append(f"{what}: {type(e).__name__}: {str(e)[:500]}")
    print(f"row {what} failed: {e}", flush=True)
    run.took(f"row:{case.dtype}", time.monotonic() - start)
    return None
  run.took(f"row:{case.dtype}", time.monotonic() - start)
  if case.dtype in peaks:
    benchmark.add_mfu(row, peaks[case.dtype])
  ch, cw = content_hw(case.height, case.width, int(config.data.min_size))
  row["content_hw"] = [ch, cw]
  row["content_fraction"] = ch * cw / (case.height * case.width)
  for part in benchmark.PARTS:
    mfu = row.get(f"{part}_mfu")
    row[f"{part}_mfu_content"] = None if mfu is None else mfu * row["content_fraction"]
  with run.lock:
    run.result["rows"].append(row)
    benchmark.add_peer(row, run.result["peer"])
  print(f"row {what}: train {_fmt(row['train_images_per_s'], '.1f')} im/s, infer "
        f"{_fmt(row['infer_images_per_s'], '.1f')} im/s, compile "
        f"{row['compile_s']:.1f} s, content MFU train "
        f"{_pct(row.get('train_mfu_content'))} ({time.monotonic() - start:.0f} s)", flush=True)
  run.write()
  return row


def _guess() -> float:
  return FIRST_ITEM_GUESS_S["cpu" if jax.devices()[0].platform == "cpu" else "other"]


def _pct(value: float | None) -> str:
  return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def peer(run: Run, config, cases: list[benchmark.Case], steps: int, num_gt: int) -> None:
  """torchvision on each case (benchmark.run_peer), merged into the run, speed-ups re-added."""
  for case in cases:
    key = (case.dtype, case.height, case.width, case.batch)
    if run.result["peer"].get("unavailable"):
      return   # not installed, or not VGG16: said once
    if key in run.result["peer"]["results"]:
      continue
    if not run.fits("peer", f"torchvision {' '.join(map(str, key))}", 30.0):
      return
    start = time.monotonic()
    got = benchmark.run_peer([case], config, steps, num_gt)
    run.took("peer", time.monotonic() - start)
    with run.lock:
      if not got["available"]:
        run.result["peer"] = {**got, "unavailable": True}
        return
      run.result["peer"].update(available=True, error=None)
      run.result["peer"]["results"].update(got["results"])
      for row in run.result["rows"]:
        benchmark.add_peer(row, run.result["peer"])
    run.write()


def profile_step(run: Run, config, mesh, dtype: str, height: int, width: int, batch: int,
                 steps: int, num_gt: int, output: str) -> None:
  """Traces `steps` training steps and summarises the op time per stage into the run."""
  what = f"profile {dtype} {height}x{width} batch {batch}"
  # Its compile is a cache hit after the rows; a row's time bounds it from above.
  if not run.fits("profile", what, run.durations.get(f"row:{dtype}", 2 * _guess())):
    return
  start = time.monotonic()
  case = benchmark.Case(dtype, height, width, batch, int(config.rpn.post_nms_top_n_test),
                        ("train",))
  c = benchmark.case_config(config, case)
  num_classes = len(c.data.classes)
  model = builders.model_from_config(c, num_classes)
  settings = builders.detector_settings_from_config(c)
  global_batch = batch * mesh.devices.size
  host = benchmark.synthetic_batch(global_batch // jax.process_count(), height, width,
                                   c.data.max_gt, num_gt, num_classes,
                                   resize_on_device=builders.resize_on_device(c))
  device_batch = parallel.host_batch_to_global(host, mesh)
  state, tx, lr_fn = train_step.create_train_state(c, model, mesh)
  jitted = train_step.jit_train_step(model, settings, tx, lr_fn, mesh,
                                grad_accum_steps=c.train.grad_accum_steps)
  compile_start = time.monotonic()
  lowered = jitted.lower(state, device_batch)
  compiled = lowered.compile()
  profile: dict[str, Any] = {"dtype": dtype, "height": height, "width": width, "batch": batch,
                             "steps": steps, "compile_s": time.monotonic() - compile_start}
  holder = {"state": state}
  del state

  def run_steps(program, n: int, from_host: bool) -> list[float]:
    times = []
    for _ in range(n):
      t = time.perf_counter()
      b = parallel.host_batch_to_global(host, mesh) if from_host else device_batch
      holder["state"], metrics = program(holder["state"], b)
      jax.block_until_ready((holder["state"], metrics))
      times.append(time.perf_counter() - t)
    return times

  run_steps(compiled, 2, False)
  wall = sorted(run_steps(compiled, max(steps, 3), False))
  from_host = sorted(run_steps(compiled, max(steps, 3), True))
  step_s = wall[len(wall) // 2]
  profile["wall_step_s"] = step_s
  profile["input_transfer_s"] = from_host[len(from_host) // 2] - step_s
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
      profile.update(stage_summary(times, hlo_ops(compiled.as_text()), steps))
      profile["device_busy_s"] = busy / steps
      profile["idle_fraction"] = max(0.0, 1.0 - busy / steps / step_s) if step_s else None
      if trace and os.path.getsize(trace) <= MAX_TRACE_BYTES:
        shutil.copyfile(trace, os.path.join(output, "train_step_trace.json.gz"))
    else:
      profile["source"] = "ablation"
      profile["stages"] = ablation_stages(model, settings, holder["state"], device_batch,
                                          step_s)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  run.took("profile", time.monotonic() - start)
  with run.lock:
    run.result["profile"] = profile
  print(f"profile: {json.dumps(_json_safe(_brief(profile)))}", flush=True)
  run.write()


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
  return (*op_times(_load_trace_events(traces[0])), traces[0])


def _brief(profile: dict[str, Any]) -> dict[str, Any]:
  return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in profile.items()
          if k not in ("top_ops", "stages")} | {
              "stages": {n: round(s.get("fraction", 0.0), 3)
                         for n, s in profile.get("stages", {}).items()}}


def _median_time(fn, n: int = 3) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def ablation_stages(model, settings, state, batch, step_s: float) -> dict[str, Any]:
  """Fallback: per-stage seconds from programs that stop at stage boundaries.

  forward = loss_fn; backward = value_and_grad - forward; optimizer = step - value_and_grad;
  proposals and targets are timed alone on the forward's inputs (and part of the forward).
  """
  key = jax.random.key(0)
  loss = jax.jit(lambda p, b: detector.loss_fn(p, b, key, model=model, settings=settings)[0])
  grad = jax.jit(jax.value_and_grad(
      lambda p, b: detector.loss_fn(p, b, key, model=model, settings=settings)[0]))
  props = jax.jit(lambda p, b: detector._rpn_and_proposals(  # pylint: disable=protected-access
      p, b, model, settings, train=True)[-1])
  trunk = jax.jit(lambda p, b: detector._rpn_and_proposals(  # pylint: disable=protected-access
      p, b, model, settings, train=True)[:3])
  forward = _median_time(lambda: loss(state.params, batch))
  with_grad = _median_time(lambda: grad(state.params, batch))
  trunk_rpn = _median_time(lambda: trunk(state.params, batch))
  proposals = _median_time(lambda: props(state.params, batch)) - trunk_rpn
  parts = {"trunk_rpn_forward": trunk_rpn, "proposals_nms": proposals,
           "targets_roi_head_losses_forward": forward - trunk_rpn - proposals,
           "backward": with_grad - forward, "optimizer": step_s - with_grad}
  return {name: {"s": s, "fraction": s / step_s if step_s else 0.0,
                 "matmul_s": None, "other_s": None,
                 "other_fraction": (s / step_s if step_s and name in ("proposals_nms",
                                                                      "optimizer") else 0.0)}
          for name, s in parts.items()}


def determinism(run: Run, argv_config: list[str], dtype: str, height: int, width: int,
                batch: int, steps: int, baseline: dict[str, Any] | None) -> None:
  """Runs the profiled case in child processes with each determinism flag; records the cost."""
  for flag in DETERMINISM_FLAGS:
    what = f"determinism {flag}"
    if not run.fits("determinism", what, 2 * _guess() + 20.0):
      return
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    cmd = [sys.executable, os.path.abspath(__file__), *argv_config,
           f"--child_case={dtype}:{height}x{width}:{batch}", f"--steps={steps}",
           "--compilation_cache="]
    start = time.monotonic()
    entry: dict[str, Any] = {"xla_flags": env["XLA_FLAGS"], "dtype": dtype, "height": height,
                             "width": width, "batch": batch}
    try:
      with run.lock:
        run.child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
      out, _ = run.child.communicate(timeout=max(run.left() - RESERVE_S, 1.0))
      lines = [l for l in out.splitlines() if l.startswith("CHILD_ROW ")]
      if run.child.returncode != 0 or not lines:
        entry["error"] = f"exit {run.child.returncode}: {out[-800:]}"
      else:
        row = json.loads(lines[-1][len("CHILD_ROW "):])
        entry.update({k: row.get(k) for k in ("train_step_s", "infer_s", "compile_s",
                                              "train_finite")})
        if baseline:
          for k in ("train_step_s", "infer_s"):
            if entry.get(k) and baseline.get(k):
              entry[f"{k}_vs_default"] = entry[k] / baseline[k]
    except subprocess.TimeoutExpired:
      run.child.kill()
      entry["error"] = "timed out"
    run.took("determinism", time.monotonic() - start)
    with run.lock:
      run.child = None
      run.result["determinism"].append(entry)
    print(f"determinism: {entry}"[:1000], flush=True)
    run.write()


def _evaluate_targets(result: dict[str, Any]) -> None:
  rows = [r for r in result["rows"] if r["dtype"] == "bfloat16"]
  targets = {}
  mfus = [(r["train_mfu_content"], r) for r in rows if r.get("train_mfu_content") is not None]
  if mfus:
    best, row = max(mfus, key=lambda m: m[0])
    targets["train_mfu_content_best"] = {
        "value": best, "target": TARGET_MFU, "met": best >= TARGET_MFU,
        "at": f"{row['height']}x{row['width']} batch {row['batch']}"}
  speedups = [(r["infer_speedup_vs_peer"], r) for r in rows if r.get("infer_speedup_vs_peer")]
  if speedups:
    best, row = max(speedups, key=lambda m: m[0])
    targets["infer_speedup_vs_torchvision_best"] = {
        "value": best, "target": TARGET_INFER_SPEEDUP, "met": best >= TARGET_INFER_SPEEDUP,
        "at": f"{row['height']}x{row['width']} batch {row['batch']}",
        "all": {f"{r['height']}x{r['width']} b{r['batch']}": s for s, r in speedups}}
  if result.get("profile") and result["profile"].get("stages"):
    what, fraction = worst_non_matmul(result["profile"])
    targets["largest_non_matmul_share"] = {
        "value": fraction, "target": TARGET_STAGE_FRACTION,
        "met": fraction <= TARGET_STAGE_FRACTION, "what": what}
  result["targets"] = targets


def markdown(result: dict[str, Any]) -> str:
  """The human summary: machine, targets, rows, torchvision, profile, determinism, skips."""
  m = result.get("machine", {})
  lines = [f"# Accelerator check, {result['date_utc']} UTC", "",
           f"- device: {m.get('device', '?')} x {m.get('num_devices', '?')}; CPU "
           f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores)",
           f"- jax {m.get('jax', '?')}, jaxlib {m.get('jaxlib', '?')}, platform "
           f"{m.get('platform_version', '?')}, plugin "
           f"{m.get('jax-cuda13-plugin') or m.get('jax-cuda12-plugin') or '-'}; flax "
           f"{m.get('flax', '?')}; torch {m.get('torch', '-')} (CUDA {m.get('torch_cuda', '-')}),"
           f" torchvision {m.get('torchvision', '-')}",
           f"- XLA_FLAGS: `{m.get('xla_flags', '')}`",
           f"- command: `{result['command']}`",
           f"- elapsed {result.get('elapsed_s', 0):.0f} s of {result['budget_s']:.0f} s; "
           f"complete: {result['complete']}", ""]
  lines += ["## Targets (issue 14)", ""]
  names = {"train_mfu_content_best": "bf16 training MFU on content pixels, best batch",
           "infer_speedup_vs_torchvision_best": "inference images/s vs torchvision",
           "largest_non_matmul_share": "largest non-matmul share of the step"}
  for key, label in names.items():
    t = result["targets"].get(key)
    if not t:
      lines.append(f"- {label}: not measured")
      continue
    value = f"{t['value']:.2f}x" if "speedup" in key else _pct(t["value"])
    target = (f">= {t['target']:.0f}x" if "speedup" in key else
              (f"<= {_pct(t['target'])}" if "share" in key else f">= {_pct(t['target'])}"))
    where = t.get("at") or t.get("what")
    lines.append(f"- {label}: **{value}** ({where}); target {target}: "
                 f"{'met' if t['met'] else 'NOT met'}")
  peaks = result.get("matmul_peak", {})
  if peaks:
    lines += ["", "Matmul peak: " + ", ".join(
        f"{d} {p['flops_per_s'] / 1e12:.1f} TFLOP/s" for d, p in peaks.items())]
  lines += ["", "## Rows (per device; s/im over the global batch)", "",
            "| dtype | canvas | content | b/dev | train im/s | infer im/s | compile s tr/inf | "
            "GFLOP/im tr | MFU tr/inf | content MFU tr/inf | vs torchvision tr/inf | prog MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    f = _fmt
    lines.append(
        f"| {r['dtype']} | {r['height']}x{r['width']} | {r['content_hw'][0]}x"
        f"{r['content_hw'][1]} | {r['batch']} | {f(r['train_images_per_s'], '.1f')} | "
        f"{f(r['infer_images_per_s'], '.1f')} | {f(r['train_compile_s'], '.0f')}/"
        f"{f(r['infer_compile_s'], '.0f')} | "
        f"{f(r['train_flops_per_image'] and r['train_flops_per_image'] / 1e9, '.0f')} | "
        f"{_pct(r.get('train_mfu'))}/{_pct(r.get('infer_mfu'))} | "
        f"{_pct(r.get('train_mfu_content'))}/{_pct(r.get('infer_mfu_content'))} | "
        f"{f(r.get('train_speedup_vs_peer'), '.2f')}x/{f(r.get('infer_speedup_vs_peer'), '.2f')}x"
        f" | {f(r['train_program_mib'], '.0f')} |")
  peer_info = result["peer"]
  lines += ["", f"torchvision: {'measured' if peer_info.get('available') else 'not measured'}"
            + (f" ({peer_info.get('error')})" if peer_info.get("error") else "")]
  for key, figures in peer_info.get("results", {}).items():
    key = "x".join(map(str, key)) if isinstance(key, tuple) else key
    if "error" in figures:
      lines.append(f"- {key}: {figures['error'][:200]}")
    else:
      lines.append(f"- {key}: train {1 / figures['train_step_s']:.1f} im/s, infer "
                   f"{1 / figures['infer_s']:.1f} im/s")
  p = result.get("profile")
  lines += ["", "## Training step per stage", ""]
  if not p:
    lines.append("not measured")
  else:
    lines.append(f"{p['dtype']} {p['height']}x{p['width']} batch {p['batch']}, "
                 f"source: {p.get('source', '-')} ({p.get('timeline', '-')} timeline); step "
                 f"{1e3 * p.get('wall_step_s', math.nan):.1f} ms wall, device busy "
                 f"{1e3 * (p.get('device_busy_s') or math.nan):.1f} ms (idle "
                 f"{_pct(p.get('idle_fraction'))}); host->device input transfer "
                 f"{1e3 * p.get('input_transfer_s', math.nan):.1f} ms per step if not "
                 f"prefetched")
    lines += ["", "| stage | ms/step | share | matmul ms | other ms | other share |",
              "|---|---|---|---|---|---|"]
    for name, s in p.get("stages", {}).items():
      ms = lambda v: "-" if v is None else f"{1e3 * v:.2f}"
      lines.append(f"| {name} | {ms(s['s'])} | {_pct(s['fraction'])} | {ms(s['matmul_s'])} | "
                   f"{ms(s['other_s'])} | {_pct(s['other_fraction'])} |")
    if p.get("top_ops"):
      lines += ["", "Top ops:", ""]
      for o in p["top_ops"][:12]:
        lines.append(f"- {1e3 * o['s_per_step']:.2f} ms {o['hlo_op']} [{o['stage']}"
                     f"{', matmul' if o['matmul'] else ''}] `{o['op_name'][-120:]}`")
  lines += ["", "## Determinism flags (child process, same case)", ""]
  for d in result["determinism"] or [{"xla_flags": "not measured"}]:
    if "error" in d:
      lines.append(f"- `{d['xla_flags']}`: failed: {d['error'][-300:]}")
    elif "train_step_s" in d:
      lines.append(f"- `{d['xla_flags']}`: train x{d.get('train_step_s_vs_default', math.nan):.2f}"
                   f", infer x{d.get('infer_s_vs_default', math.nan):.2f} the default's time "
                   f"(compile {d.get('compile_s') or math.nan:.0f} s)")
    else:
      lines.append(f"- {d['xla_flags']}")
  if result["skipped"] or result["errors"]:
    lines += ["", "## Skipped / errors", ""]
    lines += [f"- skipped: {s}" for s in result["skipped"]]
    lines += [f"- error: {e[:500]}" for e in result["errors"]]
  return "\n".join(lines) + "\n"


def child_main(config, spec: str, steps: int, num_gt: int) -> None:
  """Measures one DTYPE:HxW:BATCH row and prints it as `CHILD_ROW {json}`."""
  dtype, size, batch = spec.split(":")
  height, width = benchmark.parse_size(size)
  case = benchmark.Case(dtype, height, width, int(batch), int(config.rpn.post_nms_top_n_test),
                        benchmark.PARTS)
  row = benchmark.measure_case(config, case, parallel.make_mesh(), steps, num_gt)
  print("CHILD_ROW " + json.dumps(_json_safe(row)), flush=True)


def _config_argv(argv: list[str]) -> list[str]:
  """The --config and --config.* arguments of this command (passed on to the child)."""
  out, take_next = [], False
  for a in argv[1:]:
    if take_next:
      out.append(a)
      take_next = False
    elif a == "--config" or (a.startswith("--config.") and "=" not in a):
      out.append(a)
      take_next = True
    elif a.startswith("--config=") or a.startswith("--config."):
      out.append(a)
  return out


def main(argv):
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise app.UsageError("--config is required (e.g. experiments/voc.py)")
  if f.child_case:
    child_main(config, f.child_case, f.steps, f.num_gt)
    return
  if f.budget_s <= RESERVE_S:
    raise app.UsageError(f"--budget_s must exceed {RESERVE_S:.0f} s")
  if host_memory.wanted(config.train.reuse_host_memory):   # as in training (XLA:CPU only)
    host_memory.keep_freed_memory()
  if f.peer or f.deterministic:   # before JAX starts its backend: share the accelerator's
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # memory (torch, child)
  if f.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", f.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  dtypes = list(f.dtype)
  try:
    sizes = [benchmark.parse_size(s) for s in f.sizes]
    batches = benchmark.parse_positive_ints("batch", list(f.batch))
    benchmark.make_cases(config, dtypes=dtypes, sizes=f.sizes, batch=f.batch)   # validates
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if os.path.exists(os.path.join(f.output, "results.json")) and not f.overwrite:
    raise app.UsageError(f"{f.output} holds an earlier check's results: choose another "
                         "--output, or pass --overwrite to replace them")
  run = Run(f.output, f.budget_s, sys.argv)
  os.makedirs(f.output, exist_ok=True)
  timer = run.watchdog()
  timer.start()
  run.result["machine"] = versions()
  print(f"machine: {run.result['machine']}", flush=True)
  run.write()

  proposals = int(config.rpn.post_nms_top_n_test)
  case = lambda d, hw, b: benchmark.Case(d, hw[0], hw[1], b, proposals, benchmark.PARTS)
  main_dtype, main_size = dtypes[0], sizes[0]
  mesh = parallel.make_mesh()
  start = time.monotonic()
  peaks = benchmark.matmul_peaks(sorted(set(dtypes)), f.peak_size)
  run.took("peaks", time.monotonic() - start)
  run.result["matmul_peak"] = peaks
  run.write()

  profile_batch = f.profile_batch if f.profile_batch in batches else batches[0]
  main_batches = [profile_batch] + [b for b in batches if b != profile_batch]
  precompile(run, config, mesh, [case(main_dtype, main_size, b) for b in main_batches],
             f.num_gt, f.precompile_threads)
  measure(run, config, mesh, case(main_dtype, main_size, profile_batch), f.steps, f.num_gt,
          peaks)
  try:
    profile_step(run, config, mesh, main_dtype, *main_size, profile_batch, f.profile_steps,
                 f.num_gt, f.output)
  except Exception as e:  # pylint: disable=broad-except
    run.result["errors"].append(f"profile: {type(e).__name__}: {str(e)[:500]}")
    print(f"profile failed: {e}", flush=True)
  if f.peer:
    peer(run, config, [case(main_dtype, main_size, profile_batch)], f.steps, f.num_gt)
  for b in main_batches[1:]:
    measure(run, config, mesh, case(main_dtype, main_size, b), f.steps, f.num_gt, peaks)
  if f.peer:
    peer(run, config, [case(main_dtype, main_size, b) for b in main_batches], f.steps,
         f.num_gt)
  for d in dtypes[1:]:
    for b in batches:
      measure(run, config, mesh, case(d, main_size, b), f.steps, f.num_gt, peaks)
  if f.deterministic:
    baseline = next((r for r in run.result["rows"] if r["dtype"] == main_dtype
                     and (r["height"], r["width"]) == main_size
                     and r["batch"] == profile_batch), None)
    determinism(run, _config_argv(sys.argv), main_dtype, *main_size, profile_batch, f.steps,
                baseline)
  for d in dtypes:
    done = [r for r in run.result["rows"] if r["dtype"] == d]
    best = max(done, key=lambda r: r["train_images_per_s"] or 0.0)["batch"] if done else 1
    for size in sizes[1:]:
      for b in sorted({1, best}):
        measure(run, config, mesh, case(d, size, b), f.steps, f.num_gt, peaks)
  if f.peer:
    peer(run, config, [case(r["dtype"], (r["height"], r["width"]), r["batch"])
                       for r in run.result["rows"]], f.steps, f.num_gt)
  timer.cancel()
  run.write(final=True)
  print(open(os.path.join(f.output, "summary.md")).read(), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
