"""Tests for frcnn_jax.ops.nms against a straightforward NumPy greedy NMS."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import boxes as box_ops
from frcnn_jax.ops import nms as nms_ops


def _np_area(b):
  return np.maximum(b[..., 2] - b[..., 0], 0.0) * np.maximum(b[..., 3] - b[..., 1], 0.0)


def _np_iou_row(box, boxes):
  """IoU of one box against each of boxes [N, 4]."""
  iw = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0)
  ih = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0)
  inter = iw * ih
  union = _np_area(box) + _np_area(boxes) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _np_nms(boxes, scores, threshold, max_output_size, valid=None, classes=None):
  """Greedy NMS: visit by descending score (ties by index), keep unless suppressed."""
  boxes = boxes.astype(np.float64)
  n = len(boxes)
  valid = np.ones(n, bool) if valid is None else valid & ~np.isnan(scores)
  classes = np.zeros(n, int) if classes is None else classes
  order = sorted(range(n), key=lambda i: (-scores[i], i))
  suppressed = ~valid
  kept = []
  for i in order:
    if suppressed[i]:
      continue
    kept.append(i)
    suppressed = suppressed | ((_np_iou_row(boxes[i], boxes) > threshold)
                               & (classes == classes[i]))
  kept = kept[:max_output_size]
  return np.array(kept + [-1] * (max_output_size - len(kept)), np.int32)


def _clustered_boxes(rng, n, num_clusters=4, degenerate=0.05):
  """Boxes jittered around a few centres (like proposals), some zero-area or inverted."""
  centres = rng.uniform(0, 200, (num_clusters, 2))
  sizes = rng.uniform(10, 80, (num_clusters, 2))
  k = rng.integers(0, num_clusters, n)
  c = centres[k] + rng.normal(0, 0.2, (n, 2)) * sizes[k]
  wh = sizes[k] * np.exp(rng.normal(0, 0.3, (n, 2)))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], -1)
  kind = rng.uniform(size=n)
  boxes[kind < degenerate, 2] = boxes[kind < degenerate, 0]
  flip = (kind >= degenerate) & (kind < 2 * degenerate)
  boxes[flip] = boxes[flip][:, [2, 3, 0, 1]]
  return boxes.astype(np.float32)


def _safe_threshold(boxes, threshold, margin=1e-5):
  """The nearest threshold at least `margin` from every pairwise IoU, so that float32
  rounding cannot flip a comparison against the float64 reference."""
  b = boxes.astype(np.float64)
  ious = np.unique(np.concatenate([[-1.0, 2.0]] + [_np_iou_row(box, b) for box in b]))
  mids = (ious[1:] + ious[:-1]) / 2
  ok = np.abs(ious[1:] - ious[:-1]) > 2 * margin
  i = np.searchsorted(ious, threshold)
  if min(threshold - ious[i - 1], ious[i] - threshold) > margin:
    return threshold
  return float(mids[ok][np.argmin(np.abs(mids[ok] - threshold))])


@functools.partial(jax.jit, static_argnames=("max_output_size", "tile_size"))
def _jit_nms(boxes, scores, threshold, valid, *, max_output_size, tile_size):
  return nms_ops.nms(boxes, scores, threshold, max_output_size, valid, tile_size=tile_size)


@functools.partial(jax.jit, static_argnames=("max_output_size", "tile_size"))
def _jit_batched_nms(boxes, scores, classes, threshold, valid, *, max_output_size, tile_size):
  return nms_ops.batched_nms(boxes, scores, classes, threshold, max_output_size, valid,
                             tile_size=tile_size)


def test_golden():
  boxes = np.array([
      [0, 0, 10, 10],      # 0: score 0.9, kept
      [1, 0, 11, 10],      # 1: IoU 9/11 with 0, suppressed
      [0, 0, 20, 10],      # 2: IoU exactly 0.5 with 0: not > 0.5, kept
      [50, 50, 60, 60],    # 3: disjoint, kept
      [50, 50, 60, 61],    # 4: IoU 10/11 with 3 but invalid: neither kept nor suppressing
      [50, 50, 61, 60],    # 5: IoU 10/11 with 3: suppressed
  ], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.5], np.float32)
  valid = np.array([True, True, True, True, False, True])
  out = nms_ops.nms(boxes, scores, 0.5, 6, valid)
  np.testing.assert_array_equal(out, [0, 2, 3, -1, -1, -1])
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(nms_ops.nms(boxes, scores, 0.5, 2, valid), [0, 2])
  np.testing.assert_array_equal(nms_ops.nms(boxes, scores, 0.95, 6), [4, 0, 1, 2, 3, 5])
  classes = np.array([1, 2, 1, 3, 3, 3])
  np.testing.assert_array_equal(nms_ops.batched_nms(boxes, scores, classes, 0.5, 6, valid),
                                [0, 1, 2, 3, -1, -1])


@pytest.mark.parametrize("n,max_output_size,tile_size", [
    (48, 48, 8),       # several tiles, kept-buffer chunks of 8
    (61, 5, 16),       # max_output_size below the number kept; padded last tile
    (40, 100, 512),    # one tile, more slots than boxes
])
def test_nms_matches_numpy_reference(n, max_output_size, tile_size):
  rng = np.random.default_rng(n)
  for case in range(70):
    boxes = _clustered_boxes(rng, n, num_clusters=int(rng.integers(1, 6)))
    if case % 3 == 0:
      scores = (rng.integers(0, 4, n) / 4).astype(np.float32)        # many ties
    else:
      scores = rng.normal(size=n).astype(np.float32)
    valid = rng.uniform(size=n) < rng.choice([0.0, 0.5, 1.0])
    threshold = _safe_threshold(boxes, float(rng.choice([0.3, 0.5, 0.7])))
    out = _jit_nms(boxes, scores, threshold, valid, max_output_size=max_output_size,
                   tile_size=tile_size)
    ref = _np_nms(boxes, scores, threshold, max_output_size, valid)
    np.testing.assert_array_equal(out, ref, err_msg=f"case {case}")


@pytest.mark.parametrize("n,max_output_size,tile_size", [(56, 56, 8), (64, 10, 512)])
def test_batched_nms_matches_numpy_reference(n, max_output_size, tile_size):
  rng = np.random.default_rng(100 + n)
  for case in range(60):
    boxes = _clustered_boxes(rng, n, num_clusters=int(rng.integers(1, 4)))
    scores = rng.uniform(size=n).astype(np.float32)
    classes = rng.integers(0, int(rng.integers(1, 5)), n).astype(np.int32)
    valid = rng.uniform(size=n) < 0.8
    threshold = _safe_threshold(boxes, float(rng.choice([0.3, 0.5])))
    out = _jit_batched_nms(boxes, scores, classes, threshold, valid,
                           max_output_size=max_output_size, tile_size=tile_size)
    ref = _np_nms(boxes, scores, threshold, max_output_size, valid, classes)
    np.testing.assert_array_equal(out, ref, err_msg=f"case {case}")


def test_batched_nms_equals_per_class_nms_merged():
  rng = np.random.default_rng(3)
  boxes = _clustered_boxes(rng, 60, degenerate=0.0)
  scores = rng.uniform(size=60).astype(np.float32)
  classes = rng.integers(0, 3, 60)
  threshold = _safe_threshold(boxes, 0.4)
  kept = []
  for c in range(3):
    out = np.asarray(nms_ops.nms(boxes, scores, threshold, 60, classes == c))
    kept += list(out[out >= 0])
  kept = sorted(kept, key=lambda i: (-scores[i], i))
  np.testing.assert_array_equal(
      nms_ops.batched_nms(boxes, scores, classes, threshold, len(kept)), kept)


def test_rpn_sized_input_matches_reference():
  rng = np.random.default_rng(4)
  centres = rng.uniform(0, [1000, 600], (30, 2))
  sizes = rng.uniform(30, 400, (30, 2))
  k = rng.integers(0, 30, 2000)
  c = centres[k] + rng.normal(0, 0.15, (2000, 2)) * sizes[k]
  wh = sizes[k] * np.exp(rng.normal(0, 0.25, (2000, 2)))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], -1).astype(np.float32)
  scores = rng.uniform(size=2000).astype(np.float32)
  threshold = _safe_threshold(boxes, 0.7)
  out = jax.jit(lambda b, s: nms_ops.nms(b, s, threshold, 600))(boxes, scores)
  np.testing.assert_array_equal(out, _np_nms(boxes, scores, threshold, 600))
  assert (out >= 0).sum() == 600


def test_edge_cases():
  boxes = _clustered_boxes(np.random.default_rng(5), 10)
  scores = np.linspace(1, 0, 10).astype(np.float32)
  np.testing.assert_array_equal(nms_ops.nms(boxes, scores, 0.5, 4, np.zeros(10, bool)),
                                [-1, -1, -1, -1])
  np.testing.assert_array_equal(nms_ops.nms(np.zeros((0, 4)), np.zeros(0), 0.5, 3), [-1] * 3)
  assert nms_ops.nms(boxes, scores, 0.5, 0).shape == (0,)
  # A NaN score makes a box invalid; -0.0 and 0.0 tie and keep index order.
  far = np.array([[0, 0, 1, 1], [5, 5, 6, 6], [10, 10, 11, 11], [20, 20, 21, 21]], np.float32)
  np.testing.assert_array_equal(
      nms_ops.nms(far, np.array([0.0, np.nan, -0.0, 0.0], np.float32), 0.5, 4), [0, 2, 3, -1])
  # Identical boxes with equal scores: the lowest index wins.
  same = np.tile(np.array([[1.0, 1.0, 5.0, 5.0]], np.float32), (5, 1))
  np.testing.assert_array_equal(nms_ops.nms(same, np.ones(5), 0.5, 2), [0, -1])
  # Zero-area boxes overlap nothing, so they are all kept.
  points = np.array([[3, 3, 3, 3]] * 3, np.float32)
  np.testing.assert_array_equal(nms_ops.nms(points, np.ones(3), 0.1, 3), [0, 1, 2])


def test_vmap_matches_loop_and_traced_threshold():
  rng = np.random.default_rng(6)
  boxes = np.stack([_clustered_boxes(rng, 30) for _ in range(3)])
  scores = rng.uniform(size=(3, 30)).astype(np.float32)
  valid = rng.uniform(size=(3, 30)) < 0.7
  thresholds = np.array([_safe_threshold(b, 0.5) for b in boxes], np.float32)
  fn = jax.jit(jax.vmap(lambda b, s, t, v: nms_ops.nms(b, s, t, 12, v, tile_size=8)))
  out = fn(boxes, scores, thresholds, valid)
  for i in range(3):
    np.testing.assert_array_equal(out[i], _np_nms(boxes[i], scores[i], thresholds[i], 12,
                                                  valid[i]))
  classes = rng.integers(0, 2, (3, 30))
  fn = jax.jit(jax.vmap(lambda b, s, c: nms_ops.batched_nms(b, s, c, 0.5, 7)))
  out = fn(boxes, scores, classes)
  for i in range(3):
    np.testing.assert_array_equal(out[i], nms_ops.batched_nms(boxes[i], scores[i], classes[i],
                                                              0.5, 7))


def test_jit_traces_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(boxes, scores, valid):
    return nms_ops.nms(boxes, scores, 0.6, 10, valid, tile_size=8)

  rng = np.random.default_rng(7)
  for _ in range(3):
    fn(_clustered_boxes(rng, 20), rng.uniform(size=20), rng.uniform(size=20) < 0.5)


def test_bad_arguments_raise():
  boxes, scores = np.zeros((5, 4), np.float32), np.zeros(5, np.float32)
  with pytest.raises(ValueError, match="boxes"):
    nms_ops.nms(np.zeros((5, 5)), scores, 0.5, 3)
  with pytest.raises(ValueError, match="scores"):
    nms_ops.nms(boxes, np.zeros(4), 0.5, 3)
  with pytest.raises(ValueError, match="valid"):
    nms_ops.nms(boxes, scores, 0.5, 3, np.ones(3, bool))
  with pytest.raises(ValueError, match="classes"):
    nms_ops.batched_nms(boxes, scores, np.zeros(6, np.int32), 0.5, 3)
  with pytest.raises(ValueError, match="max_output_size"):
    nms_ops.nms(boxes, scores, 0.5, 2.5)
  with pytest.raises(ValueError, match="tile_size"):
    nms_ops.nms(boxes, scores, 0.5, 3, tile_size=0)


# The two schedules of the tiled loop (ops/nms.py): "cpu" skips finished work with lax.cond,
# "accelerator" has no data-dependent control flow. nms() on this machine runs "cpu"; these
# tests run both on the same inputs.
SCHEDULES = ("cpu", "accelerator")


def _run(boxes, scores, threshold, max_output_size, valid=None, classes=None, *,
         tile_size=512, schedule):
  n = len(boxes)
  valid = np.ones(n, bool) if valid is None else valid
  return nms_ops._tiled_nms(jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32),
                            None if classes is None else jnp.asarray(classes, jnp.int32),
                            jnp.float32(threshold), jnp.asarray(valid),
                            max_output_size=max_output_size, tile_size=tile_size,
                            schedule=schedule)


def _chain(n, step=1.0):
  """Unit-height boxes of width 3 shifted by `step`: each overlaps its neighbours only
  (IoU 0.5 with the next at step 1, 0.2 two apart)."""
  x = np.arange(n, dtype=np.float32) * step
  return np.stack([x, np.zeros(n), x + 3, np.ones(n)], 1).astype(np.float32)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("n,tile_size", [(5, 512), (70, 32), (37, 8)])
def test_worst_cases_match_reference(schedule, n, tile_size):
  """Chains (every kept box suppresses the next, across tile boundaries), identical boxes,
  all invalid, the output filled early, N smaller than or not a multiple of the tile."""
  rng = np.random.default_rng(n)
  descending = np.linspace(1, 0, n).astype(np.float32)
  cases = {
      "chain": (_chain(n), descending, 0.4, n, None, None),
      "chain, reversed scores": (_chain(n), descending[::-1].copy(), 0.4, n, None, None),
      "chain, every box suppresses the next 3": (_chain(n, 0.5), descending, 0.3, n, None, None),
      "identical": (np.tile(_chain(1), (n, 1)), np.ones(n, np.float32), 0.5, n, None, None),
      "all invalid": (_chain(n), descending, 0.4, n, np.zeros(n, bool), None),
      "full after 3": (_chain(n, 5.0), descending, 0.4, 3, None, None),
      "chain, alternating classes": (_chain(n, 0.5), descending, 0.3, n, None,
                                     np.arange(n) % 2),
      "random valid, ties": (_chain(n, 0.7), (rng.integers(0, 3, n) / 3).astype(np.float32),
                             0.3, n, rng.uniform(size=n) < 0.7, None),
  }
  for name, (boxes, scores, threshold, k, valid, classes) in cases.items():
    threshold = _safe_threshold(boxes, threshold)
    out = _run(boxes, scores, threshold, k, valid, classes, tile_size=tile_size,
               schedule=schedule)
    ref = _np_nms(boxes, scores, threshold, k, valid, classes)
    np.testing.assert_array_equal(out, ref, err_msg=name)
  # The chain keeps every other box: the worst case for any bounded in-tile pass.
  chain = _run(_chain(n), descending, 0.4, n, tile_size=tile_size, schedule=schedule)
  np.testing.assert_array_equal(chain[:(n + 1) // 2], np.arange(0, n, 2))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_match_reference_on_random_inputs(schedule):
  """61 boxes in tiles of 16 (the last one partial), 25 output slots; half the cases
  class-aware."""
  rng = np.random.default_rng(11)
  for case in range(30):
    boxes = _clustered_boxes(rng, 61, num_clusters=int(rng.integers(1, 5)))
    scores = ((rng.integers(0, 5, 61) / 4).astype(np.float32) if case % 2 else
              rng.normal(size=61).astype(np.float32))
    valid = rng.uniform(size=61) < rng.choice([0.3, 0.8, 1.0])
    classes = rng.integers(0, 3, 61) if case % 4 < 2 else None
    threshold = _safe_threshold(boxes, float(rng.choice([0.3, 0.5, 0.7])))
    out = _run(boxes, scores, threshold, 25, valid, classes, tile_size=16, schedule=schedule)
    np.testing.assert_array_equal(out, _np_nms(boxes, scores, threshold, 25, valid, classes),
                                  err_msg=f"case {case}")


def test_in_tile_resolvers_agree():
  """_resolve_blocks (32-box bit masks) == _resolve_rows (one box a trip) on dense, sparse,
  chain and empty overlap matrices, for tiles of 8, 16 (partial blocks) and 64."""
  rng = np.random.default_rng(12)
  rows, blocks = jax.jit(nms_ops._resolve_rows), jax.jit(nms_ops._resolve_blocks)
  for t in (8, 16, 64):
    upper = np.triu(np.ones((t, t), bool), 1)
    chain = np.eye(t, k=1, dtype=bool)
    for density in (0.0, 0.05, 0.3, 1.0):
      for within in ((rng.uniform(size=(t, t)) < density) & upper, chain):
        blocked = rng.uniform(size=t) < 0.2
        keep = np.asarray(rows(blocked, within))
        np.testing.assert_array_equal(blocks(blocked, within), keep)
        expected = ~blocked.copy()       # the greedy definition, row by row
        for j in range(t):
          if expected[j]:
            expected[within[j]] = False
        np.testing.assert_array_equal(keep, expected)


def _np_iou_float32(a, b):
  """boxes.iou's formula evaluated in float32, one rounding per operation (torchvision's
  kernel: areas first, then inter / (area_a + area_b - inter))."""
  f = np.float32
  area = lambda x: np.maximum(x[:, 2] - x[:, 0], f(0)) * np.maximum(x[:, 3] - x[:, 1], f(0))
  p, q = a[:, None, :], b[None, :, :]
  iw = np.maximum(np.minimum(p[..., 2], q[..., 2]) - np.maximum(p[..., 0], q[..., 0]), f(0))
  ih = np.maximum(np.minimum(p[..., 3], q[..., 3]) - np.maximum(p[..., 1], q[..., 1]), f(0))
  inter = iw * ih
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, f(1)), f(0))


def test_iou_is_float32_exact():
  """The IoU inside NMS is boxes.iou's value rounded once per operation, bit for bit (inside
  one fused jit; jitted boxes.iou itself may differ by an ulp where XLA fuses a
  multiply-add)."""
  rng = np.random.default_rng(13)
  a, b = _clustered_boxes(rng, 300), _clustered_boxes(rng, 200)
  a[:5] = [[1, 1, 1, 1], [2, 2, 1, 1], [0, 0, 0, 5], [3, 3, 9, 9], [3, 3, 9, 9]]
  fast = jax.jit(lambda a, b: nms_ops._iou(nms_ops._columns(a), nms_ops._columns(b)))(a, b)
  np.testing.assert_array_equal(fast, _np_iou_float32(a, b))
  np.testing.assert_allclose(fast, box_ops.iou(a, b), rtol=1e-6, atol=1e-7)


def test_numpy_inputs_eager_and_jit():
  rng = np.random.default_rng(14)
  boxes = _clustered_boxes(rng, 40).astype(np.float64)    # float64 NumPy, converted
  scores, valid = rng.uniform(size=40), rng.uniform(size=40) < 0.9
  classes = rng.integers(0, 3, 40)
  threshold = _safe_threshold(boxes, 0.5)
  ref = _np_nms(boxes, scores, threshold, 12, valid)
  ref_classes = _np_nms(boxes, scores, threshold, 12, valid, classes)
  np.testing.assert_array_equal(nms_ops.nms(boxes, scores, threshold, 12, valid), ref)
  np.testing.assert_array_equal(
      jax.jit(lambda: nms_ops.nms(boxes, scores, threshold, 12, valid))(), ref)
  np.testing.assert_array_equal(
      nms_ops.batched_nms(boxes, scores, classes, threshold, 12, valid), ref_classes)
  np.testing.assert_array_equal(
      jax.jit(lambda: nms_ops.batched_nms(boxes, scores, classes, threshold, 12, valid))(),
      ref_classes)


def test_batching_rule_nested_vmap_unbatched_arguments_and_grad():
  """The CPU schedule's custom vmap rule: arguments without a batch axis are broadcast, a
  vmap inside a vmap still matches the loop, and gradients flow around NMS."""
  rng = np.random.default_rng(15)
  boxes = np.stack([np.stack([_clustered_boxes(rng, 24) for _ in range(3)]) for _ in range(2)])
  scores = rng.uniform(size=(2, 3, 24)).astype(np.float32)
  valid = rng.uniform(size=24) < 0.8
  fn = lambda b, s: nms_ops.nms(b, s, 0.45, 9, valid, tile_size=8)
  nested = jax.jit(jax.vmap(jax.vmap(fn)))(boxes, scores)
  shared_boxes = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(boxes[0, 0], scores[0])
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(nested[i, j],
                                    _np_nms(boxes[i, j], scores[i, j], 0.45, 9, valid))
    np.testing.assert_array_equal(shared_boxes[i],
                                  _np_nms(boxes[0, 0], scores[0, i], 0.45, 9, valid))

  def loss(scale, b, s):
    keep = jax.vmap(lambda b, s: nms_ops.nms(b * scale, s, 0.45, 9, tile_size=8))(b, s)
    return jnp.sum(jnp.where(keep >= 0, jnp.take_along_axis(s, jnp.maximum(keep, 0), 1), 0.0)
                   * scale)
  grad = jax.jit(jax.grad(loss))(1.0, boxes[0], scores[0])
  assert np.isfinite(grad) and grad > 0


def test_equals_torchvision():
  """torchvision.ops.nms (float32 CPU kernel) on the same boxes, ties included; batched_nms
  against torchvision's nms per class merged by score (skipped without torchvision)."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  rng = np.random.default_rng(16)
  for case in range(12):
    n = 300
    boxes = _clustered_boxes(rng, n, num_clusters=int(rng.integers(1, 6)), degenerate=0.0)
    scores = ((rng.integers(0, 6, n) / 5).astype(np.float32) if case % 2 else
              rng.uniform(size=n).astype(np.float32))
    threshold = float(rng.choice([0.3, 0.5, 0.7]))
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                   threshold).numpy()
    out = np.asarray(nms_ops.nms(boxes, scores, threshold, n, tile_size=64))
    np.testing.assert_array_equal(out[out >= 0], expected, err_msg=f"case {case}")
    classes = rng.integers(0, 4, n)
    per_class = [i for c in range(4) for i in np.flatnonzero(classes == c)[
        torchvision.ops.nms(torch.from_numpy(boxes[classes == c]),
                            torch.from_numpy(scores[classes == c]), threshold).numpy()]]
    per_class = sorted(per_class, key=lambda i: (-scores[i], i))
    out = np.asarray(nms_ops.batched_nms(boxes, scores, classes, threshold, n, tile_size=64))
    np.testing.assert_array_equal(out[out >= 0], per_class, err_msg=f"case {case}")
