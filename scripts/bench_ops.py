"""Median milliseconds of the detection ops on this machine, next to torchvision's kernels.

  python scripts/bench_ops.py [--repeats 15] [--ops all|nms|roi] [--compare_ref REV]

Measures, each jitted, after warm-up, with block_until_ready: `nms` on 2000, 6000 and 12000
RPN-like boxes (IoU 0.7, max_output_size = N so that every kept box is found, as torchvision's
nms does), and as the detector calls it: the training proposals of a batch of 2 (12000 -> 2000,
vmapped), the test proposals (6000 -> 300) and the per-class NMS of the detections
(`batched_nms`, 20 classes x 300 boxes, 10% above the score threshold, 0.3 -> 100);
`roi_align` (sampling_ratio 2, aligned False) and `roi_pool` of 128 and 300 RoIs on a
38x63x512 map (a 600x1000 image at stride 16), 7x7 output, spatial scale 1/16, plus their
gradients with respect to the features.

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
checkout, e.g. on an accelerator machine) against the working tree's on the same inputs,
interleaved (old, new, old, new, ...) so that both see the same load, checks that their
outputs are equal, and reports the medians of wall and process-CPU milliseconds and their
ratios (new / old; the CPU-time ratio is the steadier one on a loaded machine).
"""

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import peer_torchvision  # scripts/, beside this file

from frcnn_jax.ops import nms as nms_ops
from frcnn_jax.ops import roi

IMAGE_HW = (600, 1000)
FEATURE_SHAPE = (38, 63, 512)


def rpn_like_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, 4] xyxy boxes inside the image (sides 16..512 px, aspect 1:2..2:1) and [n] scores."""
  h, w = IMAGE_HW
  size = np.exp(rng.uniform(np.log(16.0), np.log(512.0), n))
  ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
  bw, bh = size / np.sqrt(ratio), size * np.sqrt(ratio)
  cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
  boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
  boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
  return boxes, rng.uniform(size=n).astype(np.float32)


def median_ms(fn, *args, repeats: int, warmup: int = 2) -> float:
  """Median wall milliseconds of `fn(*args)` (JAX results waited for; torch's are ready)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def nms_cases(rng: np.random.Generator) -> dict:
  """name -> (function of an nms module returning the jitted call, its arguments)."""
  cases = {}
  for n in (2000, 6000, 12000):
    cases[f"nms_{n}"] = (
        lambda m, n=n: jax.jit(functools.partial(m.nms, iou_threshold=0.7, max_output_size=n)),
        tuple(map(jnp.asarray, rpn_like_boxes(rng, n))))
  pair = [rpn_like_boxes(rng, 12000) for _ in range(2)]
  cases["nms_train_2x12000_to_2000"] = (
      lambda m: jax.jit(jax.vmap(functools.partial(m.nms, iou_threshold=0.7,
                                                   max_output_size=2000))),
      tuple(jnp.asarray(np.stack(x)) for x in zip(*pair)))
  cases["nms_test_6000_to_300"] = (
      lambda m: jax.jit(functools.partial(m.nms, iou_threshold=0.7, max_output_size=300)),
      tuple(map(jnp.asarray, rpn_like_boxes(rng, 6000))))
  boxes, scores = rpn_like_boxes(rng, 6000)
  classes = np.repeat(np.arange(1, 21, dtype=np.int32), 300)
  cases["batched_nms_6000_to_100"] = (
      lambda m: jax.jit(lambda b, s, c, v: m.batched_nms(b, s, c, 0.3, 100, v)),
      tuple(map(jnp.asarray, (boxes, scores, classes, rng.uniform(size=6000) < 0.1))))
  return cases


def load_reference_nms(rev: str):
  """The `frcnn_jax/ops/nms.py` of git revision `rev` (or the file at path `rev`), as a module."""
  if os.path.isfile(rev):
    with open(rev) as f:
      source = f.read()
  else:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{rev}:frcnn_jax/ops/nms.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
  with tempfile.NamedTemporaryFile("w", suffix="_nms_ref.py", delete=False) as f:
    f.write(source)
  try:
    spec = importlib.util.spec_from_file_location("nms_reference", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    os.unlink(f.name)
  return module


def compare(old_fn, new_fn, args, repeats: int) -> dict:
  """Interleaved timing of two functions on the same arguments (equal outputs required)."""
  np.testing.assert_array_equal(np.asarray(old_fn(*args)), np.asarray(new_fn(*args)))
  median_ms(old_fn, *args, repeats=1)   # warm both up
  median_ms(new_fn, *args, repeats=1)
  times = {"old": ([], []), "new": ([], [])}
  for _ in range(repeats):
    for name, fn in (("old", old_fn), ("new", new_fn)):
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      times[name][0].append((time.perf_counter() - wall) * 1e3)
      times[name][1].append((time.process_time() - cpu) * 1e3)
  med = {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}
  return {"old_ms": round(med["old"][0], 2), "new_ms": round(med["new"][0], 2),
          "old_cpu_ms": round(med["old"][1], 2), "new_cpu_ms": round(med["new"][1], 2),
          "ratio": round(med["new"][0] / med["old"][0], 3),
          "cpu_ratio": round(med["new"][1] / med["old"][1], 3)}


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "device": str(jax.devices()[0]), "load_avg_1min": round(os.getloadavg()[0], 2)}


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
      reference = load_reference_nms(args.compare_ref)
    except (subprocess.CalledProcessError, OSError) as e:   # OSError: no git at all
      detail = (getattr(e, "stderr", None) or str(e)).strip()
      parser.error(f"--compare_ref {args.compare_ref}: no such file, and git cannot show its "
                   f"frcnn_jax/ops/nms.py ({detail})")
  info = machine()
  print(f"machine: {info}")
  try:
    torch, torchvision = peer_torchvision.import_torch()
    torch.set_num_threads(os.cpu_count() or 1)
    peer = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads()}
  except peer_torchvision.PeerUnavailable as e:
    torch = torchvision = None
    peer = {"unavailable": str(e)}
  print(f"torchvision: {peer}", flush=True)
  figures, comparison, theirs, agrees = {}, {}, {}, {}
  if args.ops in ("all", "nms"):
    cases = nms_cases(np.random.default_rng(0))
    for name, (make, fn_args) in cases.items():
      ours = make(nms_ops)
      figures[name] = median_ms(ours, *fn_args, repeats=args.repeats)
      if torch is not None:
        fn, tv_args, same = torchvision_nms(torch, torchvision, name, fn_args)
        theirs[name] = median_ms(fn, *tv_args, repeats=args.repeats)
        agrees[name] = same(np.asarray(ours(*fn_args)), fn(*tv_args))
    if reference is not None:
      for name, (make, fn_args) in cases.items():
        comparison[name] = compare(make(reference), make(nms_ops), fn_args, args.repeats)
        print(f"{name}: {args.compare_ref} vs working tree {comparison[name]}", flush=True)
  if args.ops in ("all", "roi"):
    rng = np.random.default_rng(0)
    for n in (2000, 6000, 12000):   # the RoIs drawn after the first nms inputs, as always
      rpn_like_boxes(rng, n)
    features = np.asarray(jax.random.normal(jax.random.key(0), FEATURE_SHAPE, jnp.float32))
    cases = roi_cases(rng)
    figures.update(roi_figures(features, cases, args.repeats))
    if torch is not None:
      theirs.update(torchvision_roi_figures(torch, torchvision, features, cases, args.repeats))

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


def torchvision_nms(torch, torchvision, name: str, args: tuple):
  """torchvision's counterpart of nms case `name`: (fn, its arguments, same(ours, theirs))."""
  ops = torchvision.ops
  arrays = [torch.from_numpy(np.array(a)) for a in args]   # writable copies
  if name.startswith("batched_nms"):
    boxes, scores, classes, valid = arrays
    kept = np.flatnonzero(np.asarray(args[3]))   # torchvision's postprocess drops these first
    fn = lambda b, s, c, v: ops.batched_nms(b[v], s[v], c[v], 0.3)[:100]
    same = lambda ours, tv: np.array_equal(ours[ours >= 0], kept[tv.numpy()])
    return fn, (boxes, scores, classes, valid), same
  count = {"nms_train_2x12000_to_2000": 2000, "nms_test_6000_to_300": 300}.get(name)
  if name.startswith("nms_train"):   # one call per image, as torchvision's RPN does
    fn = lambda b, s: [ops.nms(b[i], s[i], 0.7)[:count] for i in range(len(b))]
    same = lambda ours, tv: all(np.array_equal(o[o >= 0], t.numpy()) for o, t in zip(ours, tv))
  else:
    fn = lambda b, s: ops.nms(b, s, 0.7)[:count]
    same = lambda ours, tv: np.array_equal(ours[ours >= 0], tv.numpy())
  return fn, tuple(arrays), same


def roi_cases(rng: np.random.Generator) -> dict[str, tuple[str, np.ndarray]]:
  """name -> (op, rois [R, 4]): the forward at 128 and 300 RoIs, the gradient at 128."""
  cases = {}
  for r in (128, 300):
    rois = rpn_like_boxes(rng, r)[0]
    for op in ("roi_align", "roi_pool"):
      cases[f"{op}_{r}"] = (op, rois)
  rois = rpn_like_boxes(rng, 128)[0]
  for op in ("roi_align", "roi_pool"):
    cases[f"{op}_128_grad"] = (op, rois)
  return cases


def roi_figures(features: np.ndarray, cases: dict, repeats: int) -> dict[str, float]:
  """Median ms of each RoI case on the [H, W, C] `features` (gradients: of the summed output)."""
  ops = {"roi_align": functools.partial(roi.roi_align, output_size=7, spatial_scale=1 / 16,
                                        sampling_ratio=2, aligned=False),
         "roi_pool": functools.partial(roi.roi_pool, output_size=7, spatial_scale=1 / 16)}
  figures = {}
  for name, (op, rois) in cases.items():
    fn = ops[op]
    if name.endswith("_grad"):
      fn = jax.grad(lambda f, b, fn=fn: jnp.sum(fn(f, b)))
    figures[name] = median_ms(jax.jit(fn), jnp.asarray(features), jnp.asarray(rois),
                              repeats=max(3, repeats // 3) if name.endswith("_grad") else repeats)
  return figures


def torchvision_roi_figures(torch, torchvision, features: np.ndarray, cases: dict,
                            repeats: int) -> dict[str, float]:
  """`roi_figures` for torchvision's kernels on the same inputs (the map as NCHW)."""
  nchw = torch.from_numpy(np.ascontiguousarray(features.transpose(2, 0, 1))[None])
  ops = {"roi_align": lambda f, r: torchvision.ops.roi_align(f, r, 7, 1 / 16, 2, False),
         "roi_pool": lambda f, r: torchvision.ops.roi_pool(f, r, 7, 1 / 16)}

  def grad(op, f, r):
    f = f.detach().requires_grad_(True)
    op(f, r).sum().backward()
    return f.grad

  figures = {}
  for name, (op, rois) in cases.items():
    indexed = torch.from_numpy(   # [R, 5]: batch index 0, then x1, y1, x2, y2
        np.concatenate([np.zeros((len(rois), 1), np.float32), rois], 1))
    if name.endswith("_grad"):
      figures[name] = median_ms(functools.partial(grad, ops[op]), nchw, indexed,
                                repeats=max(3, repeats // 3))
    else:
      with torch.inference_mode():
        figures[name] = median_ms(ops[op], nchw, indexed, repeats=repeats)
  return figures


if __name__ == "__main__":
  main()
