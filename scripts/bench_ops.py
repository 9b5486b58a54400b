"""Median milliseconds of the detection ops on this machine, next to torchvision's kernels.

  python scripts/bench_ops.py [--repeats 15] [--ops all|nms|roi] [--compare_ref REV]

Measures, each jitted, after warm-up, with block_until_ready: `nms` on 2000, 6000 and 12000
RPN-like boxes (IoU 0.7, max_output_size = N so that every kept box is found, as torchvision's
nms does), and as the detector calls it: the training proposals of a batch of 2 (12000 -> 2000,
vmapped), the test proposals (6000 -> 300) and the per-class NMS of the detections
(`batched_nms`, 20 classes x 300 boxes, 10% above the score threshold, 0.3 -> 100);
`roi_align` (sampling_ratio 2, aligned False) and `roi_pool` of 128 and 300 RoIs on a
38x63x512 map (a 600x1000 image at stride 16), 7x7 output, spatial scale 1/16, plus their
gradients with respect to the features (`frcnn_jax.benchmarking.detection_ops`).

When torch and torchvision are installed (`pip install torch torchvision`), torchvision's
kernels run in the same process on the same inputs, on as many threads as the machine has
cores: `torchvision.ops.nms` (its result cut to the same count, per image for the training
case), `batched_nms` on the boxes above the threshold, `roi_align` / `roi_pool` on the NCHW
map, and the gradient of the summed output through their backward. Each NMS case also checks
that both keep the same boxes in the same order. The machine, the device JAX runs on and the
load average (other processes share the cores: compare medians taken under similar load) are
printed first; the last line is one JSON object with every figure.

`--compare_ref REV` also times the `frcnn_jax/ops/nms.py` of git revision REV (loaded from
`git show` into a temporary module; or a copy of it at path REV, where there is no git
checkout) against the working tree's on the same inputs, interleaved (old, new, old, new, ...)
so that both see the same load, checks that their outputs are equal, and reports the medians
of wall and process-CPU milliseconds and their ratios (new / old; the CPU-time ratio is the
steadier one on a loaded machine).
"""

import argparse
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.benchmarking import detection_ops as bench
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import timing
from frcnn_jax.benchmarking import torchvision_frcnn
from frcnn_jax.ops import nms as nms_ops


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=15, help="timed runs per op (median)")
  parser.add_argument("--ops", choices=("all", "nms", "roi"), default="all",
                      help="which ops to time")
  parser.add_argument("--compare_ref", metavar="REV",
                      help="also time nms.py of this git revision (or file) against the "
                           "working tree's")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  reference = None
  if args.compare_ref and args.ops in ("all", "nms"):
    try:   # before any timing: a bad revision is a usage error, not a late traceback
      reference = bench.load_reference_nms(args.compare_ref)
    except (subprocess.CalledProcessError, OSError) as e:   # OSError: no git at all
      detail = (getattr(e, "stderr", None) or str(e)).strip()
      parser.error(f"--compare_ref {args.compare_ref}: no such file, and git cannot show its "
                   f"frcnn_jax/ops/nms.py ({detail})")
  info = {"cpu": machine.cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
          "device": str(jax.devices()[0]), "load_avg_1min": round(os.getloadavg()[0], 2)}
  print(f"machine: {info}")
  try:
    torch, torchvision = torchvision_frcnn.import_torch()
    torch.set_num_threads(os.cpu_count() or 1)
    peer = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads()}
  except torchvision_frcnn.PeerUnavailable as e:
    torch = torchvision = None
    peer = {"unavailable": str(e)}
  print(f"torchvision: {peer}", flush=True)
  figures, comparison, theirs, agrees = {}, {}, {}, {}
  if args.ops in ("all", "nms"):
    nms_cases = bench.nms_cases(np.random.default_rng(0))
    for name, (make, fn_args) in nms_cases.items():
      ours = make(nms_ops)
      figures[name] = timing.median_ms(ours, *fn_args, repeats=args.repeats)
      if torch is not None:
        fn, tv_args, same = bench.torchvision_nms(torch, torchvision, name, fn_args)
        theirs[name] = timing.median_ms(fn, *tv_args, repeats=args.repeats)
        agrees[name] = same(np.asarray(ours(*fn_args)), fn(*tv_args))
    if reference is not None:
      for name, (make, fn_args) in nms_cases.items():
        comparison[name] = bench.compare(make(reference), make(nms_ops), fn_args, args.repeats)
        print(f"{name}: {args.compare_ref} vs working tree {comparison[name]}", flush=True)
  if args.ops in ("all", "roi"):
    rng = np.random.default_rng(0)
    for n in bench.NMS_SIZES:   # the RoIs drawn after the first nms inputs, as always
      bench.rpn_like_boxes(rng, n)
    features = np.asarray(jax.random.normal(jax.random.key(0), bench.FEATURE_SHAPE,
                                            jnp.float32))
    roi_cases = bench.roi_cases(rng)
    figures.update(bench.roi_figures(features, roi_cases, args.repeats))
    if torch is not None:
      theirs.update(bench.torchvision_roi_figures(torch, torchvision, features, roi_cases,
                                                  args.repeats))

  print(f"{'op':<28}{'ms (median)':>12}{'torchvision':>13}{'ratio':>8}")
  for name, ms in figures.items():
    ref = theirs.get(name)
    ref_txt, ratio_txt = (f"{ref:.1f}", f"{ms / ref:.2f}") if ref else ("-", "-")
    print(f"{name:<28}{ms:>12.1f}{ref_txt:>13}{ratio_txt:>8}")
  if agrees:
    print(f"same boxes kept as torchvision: {agrees}")
  ratios = {k: round(figures[k] / v, 3) for k, v in theirs.items()}
  result = {"machine": info, "ms": {k: round(v, 2) for k, v in figures.items()},
            "torchvision": peer, "torchvision_ms": {k: round(v, 2) for k, v in theirs.items()},
            "ratio_to_torchvision": ratios, "nms_agrees_with_torchvision": agrees}
  if reference is not None:
    result["compare_ref"] = {"rev": args.compare_ref,
                             "load_avg_1min_end": round(os.getloadavg()[0], 2), **comparison}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
