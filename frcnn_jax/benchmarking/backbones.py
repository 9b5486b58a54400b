"""Each backbone against torchvision's same architecture, per image, in one run
(`scripts/bench_backbones.py`).

A backbone is measured on its experiment's config (`EXPERIMENTS`: VOC's numbers where there is a
VOC experiment) with random weights and one image per step on one canvas: our inference
(`detector.predict`, jitted) and our training step (`frcnn_jax.training.step`, as training
builds it), torchvision's inference and training step (`torchvision_frcnn.runners`, the model
`peer.model_args` builds from the same config) on the same image and ground-truth boxes. After
compiling ours and `warmup` untimed calls of each (torch's first calls build its kernels), the
four are timed in interleaved rounds
(`timing.interleaved_runs`: ours infer, theirs infer, ours train, theirs train, ...), so that
load changes hit all alike; medians per image. GFLOP per image: XLA's cost analysis of our
compiled programs (`flops.program_flops`). One backbone's models are freed before the next.
"""

import ast
import dataclasses
import gc
import os
import statistics
from typing import Any

import jax
import ml_collections
import numpy as np

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import flops
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import peer as peer_lib
from frcnn_jax.benchmarking import report
from frcnn_jax.benchmarking import timing
from frcnn_jax.benchmarking import torchvision_frcnn
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.models.registry import BACKBONES
from frcnn_jax.runtime import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Our backbone name -> the experiment it is measured with (relative to the repository root).
EXPERIMENTS = {
    "vgg16": "experiments/voc.py",
    "zf": "experiments/voc_zf.py",
    "resnet_c4": "experiments/voc_r101_c4.py",   # VOC's numbers; the depth comes from the entry
    "resnet_fpn": "experiments/coco_r50_fpn.py",
}
DEFAULT_BACKBONES = ("vgg16", "zf", "resnet_c4:50", "resnet_fpn")
ITEMS = (("ours", "infer"), ("torchvision", "infer"), ("ours", "train"),
         ("torchvision", "train"))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One backbone to measure.

  Attributes:
    label: as given ("resnet_c4:50").
    backbone: our `model.backbone` name.
    experiment: the config file.
    overrides: dotted config keys set for this entry (the depth).
  """
  label: str
  backbone: str
  experiment: str
  overrides: dict[str, Any]


def parse_entry(spec: str) -> Entry:
  """Parses NAME[:DEPTH][=EXPERIMENT] ("resnet_c4:101", "zf=experiments/my_zf.py").

  The experiment defaults to `EXPERIMENTS[NAME]`; DEPTH sets `model.<NAME>.depth`.

  Raises:
    ValueError: an unregistered backbone, a bad depth, or no experiment for it.
  """
  head, _, experiment = spec.strip().partition("=")
  name, _, depth = head.partition(":")
  if name not in BACKBONES.names():
    raise ValueError(f"--backbones {spec!r}: {name!r} is not a registered backbone "
                     f"{tuple(BACKBONES.names())}")
  overrides: dict[str, Any] = {}
  if depth:
    if not depth.isdigit():
      raise ValueError(f"--backbones {spec!r}: the depth after ':' must be an integer")
    overrides[f"model.{name}.depth"] = int(depth)
  experiment = experiment or EXPERIMENTS.get(name, "")
  if not experiment:
    raise ValueError(f"--backbones {spec!r}: no experiment for {name}; give one as "
                     f"{name}=experiments/X.py")
  return Entry(spec.strip(), name, experiment, overrides)


def default_entries() -> tuple[list[Entry], list[str]]:
  """The entries of DEFAULT_BACKBONES that can run here, and a line for each left out (a
  backbone not registered, or its experiment file missing)."""
  entries, skipped = [], []
  for spec in DEFAULT_BACKBONES:
    name = spec.partition(":")[0]
    if name not in BACKBONES.names():
      skipped.append(f"{spec}: not a registered backbone here: skipped")
      continue
    entry = parse_entry(spec)
    if not os.path.isfile(experiment_path(entry)):
      skipped.append(f"{spec}: {entry.experiment} does not exist: skipped")
      continue
    entries.append(entry)
  return entries, skipped


def experiment_path(entry: Entry) -> str:
  """The entry's config file (a relative path is taken from the repository root)."""
  path = entry.experiment.partition(":")[0]
  return path if os.path.isabs(path) or os.path.isfile(path) else os.path.join(ROOT, path)


def parse_override(text: str) -> tuple[str, Any]:
  """Parses "model.zf.width=0.0625" into ("model.zf.width", 0.0625) (a Python literal, else the
  text itself).

  Raises:
    ValueError: no "=".
  """
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"--override {text!r} must be KEY=VALUE, e.g. model.zf.width=0.0625")
  try:
    parsed = ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    parsed = value.strip()
  return key.strip(), parsed


def load_config(entry: Entry, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The entry's config with its own overrides, then `overrides` (every entry's).

  Raises:
    ValueError / ConfigError: a bad key or value, or an experiment of another backbone.
  """
  path = experiment_path(entry)
  suffix = entry.experiment.partition(":")[1:]
  config = config_flags.load_config(path + "".join(suffix), {**entry.overrides, **overrides})
  if config.model.backbone != entry.backbone:
    raise ValueError(f"{entry.experiment} uses model.backbone={config.model.backbone}, not "
                     f"{entry.backbone}")
  return config


def canvas_of(config: ml_collections.ConfigDict, height: int, width: int
              ) -> tuple[int, int]:
  """The canvas of an H x W image: the image itself, or for a multi-level backbone its sides
  rounded up to the backbone's `stride` (its canvases' multiple; torchvision's FPN pads to
  its size_divisible 32 alike)."""
  trunk = builders.backbone_from_config(config)
  if len(getattr(trunk, "strides", None) or ()) < 2:
    return height, width
  multiple = int(trunk.stride)
  return tuple(-(-n // multiple) * multiple for n in (height, width))


def _peer_arrays(host: dict[str, np.ndarray], height: int, width: int, num_gt: int,
                 num_classes: int) -> dict[str, np.ndarray]:
  """torchvision's batch: our first image (its content) and boxes, or random ones where our
  batch ships the source image (device resize)."""
  if "image" not in host:
    return torchvision_frcnn.random_batch(1, height, width, num_gt, num_classes)
  return {"image": host["image"][:1, :height, :width], "gt_boxes": host["gt_boxes"][:1],
          "gt_labels": host["gt_labels"][:1], "gt_valid": host["gt_valid"][:1]}


def measure_backbone(entry: Entry, config: ml_collections.ConfigDict, **kwargs
                     ) -> dict[str, Any]:
  """`measure`, then frees its programs and models (JAX's caches included) before the next
  backbone."""
  row = measure(entry, config, **kwargs)
  jax.clear_caches()
  gc.collect()
  return row


def measure(entry: Entry, config: ml_collections.ConfigDict, *, height: int, width: int,
            steps: int, num_gt: int, dtype: str, threads: int | None, peer: bool = True,
            warmup: int = 2) -> dict[str, Any]:
  """Measures one backbone, ours and torchvision's interleaved (module docstring).

  Args:
    entry: the backbone.
    config: its config (`load_config`).
    height: image height.
    width: image width.
    steps: interleaved timed rounds.
    num_gt: ground-truth boxes per image.
    dtype: compute dtype, "float32" or "bfloat16".
    threads: torch's CPU threads (None: every core).
    peer: also time torchvision.
    warmup: untimed calls of each before the rounds (at least 1).

  Returns:
    {"backbone" (the entry's label), "experiment", "height", "width", "canvas", "dtype",
     "steps", "num_classes", "{ours,torchvision}_{infer,train}_s" (median seconds per image;
     None where not measured), "{ours,torchvision}_{infer,train}_runs_s", "..._cores_used",
     "infer_ratio" / "train_ratio" (torchvision's seconds over ours: > 1 where ours is faster),
     "{train,infer}_gflop_per_image" (XLA), "compile_s" {"train", "infer"}, "train_finite",
     "peer" {"available", "error", "differences" (our model against the peer's architecture),
     and torch's "device", "threads", "torch", "torchvision"}}.
  """
  canvas = canvas_of(config, height, width)
  case = cases.Case(dtype, canvas[0], canvas[1], 1, int(config.rpn.post_nms_top_n_test),
                    cases.PARTS)
  mesh = parallel.make_mesh()
  programs, state = cases.build(config, case, mesh)
  num_classes = cases.num_classes(programs.config)
  host = programs.host_batch(1, *canvas, num_gt, content_hw=(height, width))
  batch = programs.global_batch(host)
  per_image = mesh.devices.size   # our step holds one image per device
  train_c, train_compile = timing.compile_timed(programs.train, state, batch)
  infer_c, infer_compile = timing.compile_timed(programs.predict, state.params, batch)
  holder: dict[str, Any] = {"state": state}
  del state

  def ours_train():
    holder["state"], metrics = train_c(holder["state"], batch)
    holder["finite"] = bool(jax.block_until_ready(metrics)["finite"])

  def ours_infer():
    jax.block_until_ready(infer_c(holder["state"].params, batch))

  fns = {("ours", "train"): ours_train, ("ours", "infer"): ours_infer}
  peer_info: dict[str, Any] = {"available": False, "error": "not requested", "differences": []}
  release = None
  if peer:
    try:
      peer_info["differences"] = peer_lib.differences(programs.config)
      torch_side = torchvision_frcnn.runners(
          _peer_arrays(host, height, width, num_gt, num_classes), dtype=dtype,
          num_classes=num_classes, device="cpu" if machine.on_cpu() else "cuda",
          threads=threads, **peer_lib.model_args(programs.config, strict=False))
      fns.update({("torchvision", "train"): torch_side["train"],
                  ("torchvision", "infer"): torch_side["infer"]})
      release = torch_side["release"]
      peer_info.update(available=True, error=None, **torch_side["info"])
    except (torchvision_frcnn.PeerUnavailable, RuntimeError) as e:   # e.g. out of memory
      peer_info["error"] = f"{type(e).__name__}: {e}"
  items = [(key, fns[key]) for key in ITEMS if key in fns]
  for _ in range(warmup - 1):   # interleaved_runs makes the last warm-up call
    for _, fn in items:
      fn()
  runs = timing.interleaved_runs(items, steps)
  row: dict[str, Any] = {
      "backbone": entry.label, "experiment": entry.experiment, "height": height,
      "width": width, "canvas": list(canvas), "dtype": dtype, "steps": steps,
      "num_classes": num_classes,
      "train_gflop_per_image": _gflop(train_c), "infer_gflop_per_image": _gflop(infer_c),
      "compile_s": {"train": train_compile, "infer": infer_compile},
      "train_finite": holder.get("finite"), "peer": peer_info}
  for who, part in ITEMS:
    walls, cpus = runs.get((who, part), (None, None))
    images = per_image if who == "ours" else 1
    row[f"{who}_{part}_s"] = statistics.median(walls) / images if walls else None
    row[f"{who}_{part}_runs_s"] = walls
    row[f"{who}_{part}_cores_used"] = (statistics.median(cpus) / statistics.median(walls)
                                       if walls else None)
  for part in ("infer", "train"):
    ours, theirs = row[f"ours_{part}_s"], row[f"torchvision_{part}_s"]
    row[f"{part}_ratio"] = theirs / ours if ours and theirs else None
  if release:
    release()
  return row


def _gflop(compiled: Any) -> float | None:
  """GFLOP of one device's program, which holds one image."""
  count = flops.program_flops(compiled)
  return None if count is None else count / 1e9


def print_table(rows: list[dict[str, Any]]) -> None:
  """Prints the rows as a markdown table, then each row's differences from its peer."""
  f = report.fmt
  print("| backbone | image | ours infer s/im | tv infer s/im | tv/ours | ours train s/im | "
        "tv train s/im | tv/ours | GFLOP/im train / infer (XLA) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['backbone']} | {r['height']}x{r['width']} | {f(r['ours_infer_s'], '.3f')} | "
          f"{f(r['torchvision_infer_s'], '.3f')} | {f(r['infer_ratio'], '.2f')} | "
          f"{f(r['ours_train_s'], '.3f')} | {f(r['torchvision_train_s'], '.3f')} | "
          f"{f(r['train_ratio'], '.2f')} | {f(r['train_gflop_per_image'], '.1f')} / "
          f"{f(r['infer_gflop_per_image'], '.1f')} |")
  for r in rows:
    p = r["peer"]
    if not p["available"]:
      print(f"{r['backbone']}: torchvision not measured: {p['error']}")
    elif p["differences"]:
      print(f"{r['backbone']}: ours differs from torchvision's architecture: "
            f"{'; '.join(p['differences'])}")
