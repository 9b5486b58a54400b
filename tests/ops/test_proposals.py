"""Tests for frcnn_jax.ops.proposals against a plain-NumPy proposal pipeline."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import proposals


def np_decode(delta, ref, weights=(1.0, 1.0, 1.0, 1.0)):
  w, h = ref[2] - ref[0], ref[3] - ref[1]
  cx, cy = ref[0] + w / 2, ref[1] + h / 2
  tx, ty = delta[0] / weights[0], delta[1] / weights[1]
  tw = min(delta[2] / weights[2], math.log(1000 / 16))
  th = min(delta[3] / weights[3], math.log(1000 / 16))
  cx, cy, w, h = cx + tx * w, cy + ty * h, w * math.exp(tw), h * math.exp(th)
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def np_clip(box, hw):
  return np.array([min(max(box[0], 0), hw[1]), min(max(box[1], 0), hw[0]),
                   min(max(box[2], 0), hw[1]), min(max(box[3], 0), hw[0])])


def np_iou(a, b) -> float:
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
  return inter / union if union > 0 else 0.0


def np_greedy_nms(boxes, scores, threshold):
  """Indices kept by greedy NMS, visiting by descending score (ties by index)."""
  order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if all(np_iou(boxes[k], boxes[i]) <= threshold for k in kept):
      kept.append(i)
  return kept


def np_proposals(objectness, deltas, anchors, hw, min_size, pre, post, threshold):
  boxes = [np_clip(np_decode(d, a), hw) for d, a in zip(deltas, anchors)]
  ok = [b[2] - b[0] >= min_size and b[3] - b[1] >= min_size for b in boxes]
  order = sorted((i for i in range(len(boxes)) if ok[i]), key=lambda i: (-objectness[i], i))
  top = order[:pre]
  kept = np_greedy_nms([boxes[i] for i in top], [objectness[i] for i in top], threshold)
  kept = [top[k] for k in kept][:post]
  out_boxes = np.zeros((post, 4))
  out_scores = np.zeros(post)
  for slot, i in enumerate(kept):
    out_boxes[slot], out_scores[slot] = boxes[i], objectness[i]
  return out_boxes, out_scores, np.arange(post) < len(kept)


@functools.lru_cache(maxsize=None)
def proposal_fn(batched: bool = False, **kwargs):
  fn = lambda o, d, a, hw, m: proposals.generate_proposals(o, d, a, hw, min_size=m, **kwargs)
  return jax.jit(jax.vmap(fn) if batched else fn)


def random_case(rng, a=64):
  centres = rng.uniform(0, 120, size=(a, 2))
  sizes = rng.uniform(8, 64, size=(a, 2))
  anchors = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
  deltas = (rng.normal(size=(a, 4)) * 0.3).astype(np.float32)
  objectness = rng.uniform(size=a).astype(np.float32)
  hw = rng.integers(60, 120, size=2).astype(np.int32)
  min_size = np.float32(rng.choice([0.0, 8.0, 16.0]))
  return objectness, deltas, anchors, hw, min_size


def batched_random_run(pre, post, threshold):
  """150 random cases and the vmapped proposals on them (compiled once per setting)."""
  rng = np.random.default_rng(pre)
  cases = [random_case(rng) for _ in range(150)]
  fn = proposal_fn(True, pre_nms_top_n=pre, post_nms_top_n=post, nms_threshold=threshold)
  return cases, [np.asarray(x) for x in fn(*[np.stack(x) for x in zip(*cases)])]


# pre_nms_top_n > A (all anchors enter NMS), and post_nms_top_n > pre_nms_top_n (padding).
@pytest.mark.parametrize("pre,post,threshold", [(100, 30, 0.7), (8, 12, 0.3)])
def test_generate_proposals_matches_numpy_pipeline(pre, post, threshold):
  cases, (boxes, scores, valid) = batched_random_run(pre, post, threshold)
  for i, case in enumerate(cases):
    ref_boxes, ref_scores, ref_valid = np_proposals(*case, pre, post, threshold)
    np.testing.assert_array_equal(valid[i], ref_valid, err_msg=f"case {i}")
    np.testing.assert_allclose(boxes[i], ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-6)


def test_generate_proposals_golden_decode_clip_and_min_size():
  anchors = np.array([
      [250, 250, 350, 350],     # centred (300, 300), 100 x 100
      [0, 0, 20, 20],           # decodes to a box partly outside the image: clipped
      [100, 100, 105, 105],     # 5 x 5: below min_size 8
  ], np.float32)
  deltas = np.array([
      [-2.0, -1.0, math.log(0.5), math.log(1.0)],
      [-0.5, 0.0, 0.0, 0.0],
      [0.0, 0.0, 0.0, 0.0],
  ], np.float32)
  objectness = np.array([0.9, 0.8, 0.95], np.float32)
  hw = np.array([400, 500], np.int32)
  fn = proposal_fn(pre_nms_top_n=10, post_nms_top_n=4, nms_threshold=0.7)
  boxes, scores, valid = fn(objectness, deltas, anchors, hw, np.float32(8.0))
  # Centre (100, 200), size 50 x 100; then the second anchor shifted 10 px left and clipped.
  np.testing.assert_allclose(boxes, [[75, 150, 125, 250], [0, 0, 10, 20], [0] * 4, [0] * 4],
                             atol=1e-4)
  np.testing.assert_allclose(scores, [0.9, 0.8, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(valid, [True, True, False, False])
  # Clipping uses the true image size: in an image 10 px wide only the second box is left.
  boxes, _, valid = fn(objectness, deltas, anchors, np.array([400, 10], np.int32),
                       np.float32(1.0))
  np.testing.assert_array_equal(valid, [True, False, False, False])
  np.testing.assert_allclose(boxes[0], [0, 0, 10, 20], atol=1e-4)
  _, _, valid = fn(objectness, deltas, anchors, hw, np.float32(1000.0))
  assert not np.any(valid)


def test_generate_proposals_nms_suppresses_duplicates():
  anchors = np.tile(np.array([[10, 10, 60, 60]], np.float32), (5, 1))
  anchors[3:] += 100
  objectness = np.array([0.1, 0.5, 0.3, 0.2, 0.9], np.float32)
  fn = proposal_fn(pre_nms_top_n=5, post_nms_top_n=5, nms_threshold=0.7)
  boxes, scores, valid = fn(objectness, np.zeros((5, 4), np.float32), anchors,
                            np.array([300, 300]), np.float32(0.0))
  np.testing.assert_allclose(scores, [0.9, 0.5, 0, 0, 0])
  np.testing.assert_allclose(boxes[:2], anchors[[4, 1]])


def test_generate_proposals_has_no_gradient_and_vmap_equals_loop():
  cases, batched = batched_random_run(8, 12, 0.3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def one(o, d, a, hw, m):
    return proposals.generate_proposals(o, d, a, hw, min_size=m, pre_nms_top_n=8,
                                        post_nms_top_n=12, nms_threshold=0.3)

  for i in range(4):
    for got, want in zip(batched, one(*cases[i])):
      np.testing.assert_array_equal(got[i], want)
  o, d, a, hw, m = cases[0]
  grad = jax.jit(jax.grad(lambda o, d: jnp.sum(one(o, d, a, hw, m)[0])
                          + jnp.sum(one(o, d, a, hw, m)[1]), argnums=(0, 1)))(o, d)
  for g in grad:
    assert np.all(np.asarray(g) == 0.0)


def test_generate_proposals_bad_shapes_raise():
  with pytest.raises(ValueError, match="objectness"):
    proposals.generate_proposals(jnp.zeros((4, 2)), jnp.zeros((4, 4)), jnp.zeros((4, 4)),
                                 jnp.array([10, 10]), min_size=0.0, pre_nms_top_n=2,
                                 post_nms_top_n=2, nms_threshold=0.7)
