r"""Every backbone against torchvision's same architecture: seconds per image, same run.

Usage:
  python scripts/bench_backbones.py [--backbones vgg16,zf,resnet_c4:50,resnet_fpn] \
      [--height 600 --width 800 | --experiment_canvas] [--steps 3] [--warmup 2] [--threads N] \
      [--override KEY=VALUE ...] [--nopeer]

For each backbone (`NAME[:DEPTH][=EXPERIMENT]`; default vgg16, zf, resnet_c4 at depth 50 and
resnet_fpn where it is registered and its experiment exists), on its experiment's config
(`frcnn_jax.benchmarking.backbones.EXPERIMENTS`: experiments/voc.py, voc_zf.py, voc_r101_c4.py
with the depth of the entry, coco_r50_fpn.py) with random weights, one image of
`--height` x `--width` (default a VOC-like 600 x 800; `--experiment_canvas`: each experiment's
canvas, `cases.default_canvas`) and `--num_gt` random boxes: our inference and training step,
torchvision's same architecture's inference (`eval()`) and training step (`train()`) on the same
image and boxes (`frcnn_jax.benchmarking.torchvision_frcnn`, configured by
`frcnn_jax.benchmarking.peer` from the same config), compiled / built, each called `--warmup`
times untimed, then `--steps` interleaved rounds; medians per image. With the peer, both sides
keep glibc's default heap: the train command's `train.reuse_host_memory` would apply to torch
too (without `--peer` it applies as in training). `--override KEY=VALUE` (repeatable) sets a
config key of every backbone's config (e.g. model.zf.width=0.0625 for a tiny test; a model that
then differs from torchvision's architecture still runs, and the differences are printed).

Output: a progress line per backbone, a markdown table (backbone, image, ours / torchvision
inference and training seconds per image with torchvision's over ours, GFLOP per image from
XLA's cost analysis of our programs) and, last, one JSON line {"rows", "machine", ...}.
"""

import json
import os

from absl import app
from absl import flags

from frcnn_jax.benchmarking import backbones
from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import report
from frcnn_jax.benchmarking import timing
from frcnn_jax.config import flags as config_flags
from frcnn_jax.runtime import host_memory


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_list("backbones", None, "NAME[:DEPTH][=EXPERIMENT] entries (default: "
                    f"{','.join(backbones.DEFAULT_BACKBONES)}, those that exist here).")
  flags.DEFINE_integer("height", 600, "Image height.")
  flags.DEFINE_integer("width", 800, "Image width.")
  flags.DEFINE_bool("experiment_canvas", False, "Each backbone at its experiment's canvas "
                    "instead of --height x --width.")
  flags.DEFINE_integer("steps", 3, "Interleaved timed rounds.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls of each program before the rounds (torch "
                       "builds its kernels in its first calls).")
  flags.DEFINE_integer("num_gt", 5, "Ground-truth boxes per image.")
  flags.DEFINE_enum("dtype", "float32", list(cases.DTYPES), "Compute dtype.")
  flags.DEFINE_integer("threads", 0, "torch's CPU threads (0: every core, as XLA uses).")
  flags.DEFINE_multi_string("override", [], "KEY=VALUE set in every backbone's config.")
  flags.DEFINE_bool("peer", True, "Time torchvision (needs torch and torchvision).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  for name in ("height", "width", "steps", "warmup"):
    if f[name].value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {f[name].value}")
  try:
    if f.backbones:
      entries, skipped = [backbones.parse_entry(s) for s in f.backbones], []
    else:
      entries, skipped = backbones.default_entries()
    overrides = dict(backbones.parse_override(o) for o in f.override)
    configs = [backbones.load_config(e, overrides) for e in entries]
  except (ValueError, config_flags.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  for line in skipped:
    print(line, flush=True)
  if not entries:
    raise app.UsageError("no backbone to measure")
  # The training heap setting would apply to torch as well, and torch's allocations between
  # our steps then slow ours (benchmarks/RESULTS.md): with the peer, both
  # sides keep glibc's defaults.
  if not f.peer and host_memory.wanted(configs[0].train.reuse_host_memory):
    host_memory.keep_freed_memory()
  info = machine.machine()
  load_start = timing.load_average()
  print(f"machine: {info}; load {load_start}", flush=True)
  rows = []
  for entry, config in zip(entries, configs):
    hw = cases.default_canvas(config) if f.experiment_canvas else (f.height, f.width)
    row = backbones.measure_backbone(entry, config, height=hw[0], width=hw[1], steps=f.steps,
                                     num_gt=f.num_gt, dtype=f.dtype,
                                     threads=f.threads or None, peer=f.peer, warmup=f.warmup)
    rows.append(row)
    fmt = report.fmt
    print(f"{entry.label} {hw[0]}x{hw[1]}: ours infer {fmt(row['ours_infer_s'], '.3f')} / "
          f"train {fmt(row['ours_train_s'], '.3f')} s/image, torchvision infer "
          f"{fmt(row['torchvision_infer_s'], '.3f')} / train "
          f"{fmt(row['torchvision_train_s'], '.3f')} s/image (load {os.getloadavg()[0]:.2f})",
          flush=True)
  print()
  backbones.print_table(rows)
  result = {"rows": rows, "machine": info, "load_start": load_start,
            "load_end": timing.load_average(), "steps": f.steps, "warmup": f.warmup,
            "dtype": f.dtype,
            "overrides": f.override}
  print(json.dumps(report.json_safe(result)))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
