"""The detection ops' cases (NMS, RoI Align, RoI pooling) and their torchvision counterparts.

NMS on 2000, 6000 and 12000 RPN-like boxes (IoU 0.7, max_output_size = N so that every kept
box is found, as torchvision's nms does), and as the detector calls it: the training proposals
of a batch of 2 (12000 -> 2000, vmapped), the test proposals (6000 -> 300) and the per-class
NMS of the detections (`batched_nms`, 20 classes x 300 boxes, 10% above the score threshold,
0.3 -> 100). `roi_align` (sampling_ratio 2, aligned False) and `roi_pool` of 128 and 300 RoIs
on a FEATURE_SHAPE map (a 600x1000 image at stride 16), 7x7 output, spatial scale 1/16, plus
their gradients with respect to the features. torchvision's kernels run on the same inputs
(the map as NCHW), and each NMS case checks that both keep the same boxes in the same order.
"""

import functools
import importlib.util
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.benchmarking import timing
from frcnn_jax.ops import roi

IMAGE_HW = (600, 1000)
FEATURE_SHAPE = (38, 63, 512)
NMS_SIZES = (2000, 6000, 12000)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def nms_cases(rng: np.random.Generator) -> dict[str, tuple[Callable[[Any], Any], tuple]]:
  """name -> (function of an nms module returning the jitted call, its arguments)."""
  cases = {}
  for n in NMS_SIZES:
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
  """The `frcnn_jax/ops/nms.py` of git revision `rev` (or the file at path `rev`), as a module.

  Raises:
    subprocess.CalledProcessError: git cannot show the file at `rev`.
    OSError: no git at all.
  """
  if os.path.isfile(rev):
    with open(rev) as f:
      source = f.read()
  else:
    source = subprocess.run(["git", "show", f"{rev}:frcnn_jax/ops/nms.py"], cwd=_ROOT,
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


def compare(old_fn, new_fn, args: tuple, repeats: int) -> dict[str, float]:
  """Interleaved timing of two functions on the same arguments.

  Returns:
    {"old_ms", "new_ms", "old_cpu_ms", "new_cpu_ms" (medians of wall and process-CPU
     milliseconds), "ratio", "cpu_ratio" (new / old)}.

  Raises:
    AssertionError: their outputs differ.
  """
  np.testing.assert_array_equal(np.asarray(old_fn(*args)), np.asarray(new_fn(*args)))
  runs = timing.interleaved_runs(
      [(name, lambda fn=fn: jax.block_until_ready(fn(*args)))
       for name, fn in (("old", old_fn), ("new", new_fn))], repeats)
  med = {name: (1e3 * statistics.median(w), 1e3 * statistics.median(c))
         for name, (w, c) in runs.items()}
  return {"old_ms": round(med["old"][0], 2), "new_ms": round(med["new"][0], 2),
          "old_cpu_ms": round(med["old"][1], 2), "new_cpu_ms": round(med["new"][1], 2),
          "ratio": round(med["new"][0] / med["old"][0], 3),
          "cpu_ratio": round(med["new"][1] / med["old"][1], 3)}


def torchvision_nms(torch, torchvision, name: str, args: tuple):
  """torchvision's counterpart of nms case `name`: (fn, its arguments, same(ours, theirs)).

  `same` is True when both keep the same boxes in the same order (ours padded with -1).
  """
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
  """Median ms of each RoI case on the [H, W, C] `features` (gradients: of the summed output,
  max(3, repeats // 3) runs)."""
  ops = {"roi_align": functools.partial(roi.roi_align, output_size=7, spatial_scale=1 / 16,
                                        sampling_ratio=2, aligned=False),
         "roi_pool": functools.partial(roi.roi_pool, output_size=7, spatial_scale=1 / 16)}
  figures = {}
  for name, (op, rois) in cases.items():
    fn = ops[op]
    if name.endswith("_grad"):
      fn = jax.grad(lambda f, b, fn=fn: jnp.sum(fn(f, b)))
    figures[name] = timing.median_ms(
        jax.jit(fn), jnp.asarray(features), jnp.asarray(rois),
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
      figures[name] = timing.median_ms(functools.partial(grad, ops[op]), nchw, indexed,
                                       repeats=max(3, repeats // 3))
    else:
      with torch.inference_mode():
        figures[name] = timing.median_ms(ops[op], nchw, indexed, repeats=repeats)
  return figures
