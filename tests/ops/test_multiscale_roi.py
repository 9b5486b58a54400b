"""Tests for frcnn_jax.ops.multiscale_roi against NumPy loops and torchvision's pooler."""

import collections
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.ops import multiscale_roi as msr
from frcnn_jax.ops import roi
from tests.ops.test_roi import random_rois
from tests.ops.test_roi import ref_roi_align

F32 = np.float32
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)          # P2..P5: k_min 2, k_max 5
SIZES = ((24, 40), (12, 20), (6, 10), (3, 5))    # a 96x160 image at strides 4..32
CANONICAL = 28.0   # sqrt(area) 14 / 28 / 56 px start P3 / P4 / P5: all levels in 96x160

# Jitted entry points (static configuration), so each test compiles once.
pool = jax.jit(msr.multiscale_roi_align, static_argnums=(2, 3, 4, 5, 6, 7))
levels = jax.jit(msr.roi_levels, static_argnums=(1, 2, 3, 4))


def ref_level(box, k_min, k_max, canonical_scale=224, canonical_level=4):
  """torchvision's LevelMapper for one box, float32 scalars with a correctly rounded log2.

  A negative area (torchvision: NaN, matching no level) or NaN coordinate gives k_min.
  """
  x1, y1, x2, y2 = np.asarray(box, F32)
  area = (x2 - x1) * (y2 - y1)
  if not area >= 0:
    return 0
  q = np.sqrt(area) / F32(canonical_scale)
  log2 = F32(math.log2(float(q))) if q > 0 else F32(-np.inf)
  level = (F32(canonical_level) + log2) + F32(1e-6)
  return int(min(max(np.floor(level), k_min), k_max)) - k_min


def ref_multiscale(features, rois, oh, ow, scales, sampling_ratio, aligned, canonical_scale):
  """Each RoI through the NumPy roi_align loop (tests/ops/test_roi.py) on its level."""
  k_min, k_max = -round(math.log2(scales[0])), -round(math.log2(scales[-1]))
  out = np.zeros((len(rois), oh, ow, features[0].shape[-1]), F32)
  for r, box in enumerate(np.asarray(rois, F32)):
    l = ref_level(box, k_min, k_max, canonical_scale)
    out[r] = ref_roi_align(features[l], box[None], oh, ow, scales[l], sampling_ratio,
                           aligned)[0][0]
  return out


def pyramid(rng, c, sizes=SIZES, lead=()):
  """Features in [0, 1): roi_align's sample positions may be an ulp off torchvision's (XLA
  contracts start + p * bin into an FMA), which moves a bin by up to ulp(y) * |dF| (< 1e-5 for
  maps under 128 cells and |dF| < 1)."""
  return [rng.uniform(0, 1, lead + (h, w, c)).astype(F32) for h, w in sizes]


def spread_rois(rng, n, img_h, img_w, lo, hi):
  """RoIs with sqrt(area) log-uniform in [lo, hi), aspect ratios 1:3..3:1, centres anywhere
  on the image and a little beyond."""
  side = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
  aspect = np.exp(rng.uniform(-np.log(3), np.log(3), n))
  bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
  cx, cy = rng.uniform(-0.1, 1.1, n) * img_w, rng.uniform(-0.1, 1.1, n) * img_h
  return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(F32)


def level_rois(rng, n=60):
  """Spread over the four levels of the 96x160 image at CANONICAL, plus test_roi's edge cases
  (zero-size, inverted, tiny, on the cell grid)."""
  return np.concatenate([spread_rois(rng, n, 96, 160, 3, 150), random_rois(rng, n // 3, 96, 160)])


def reference_formulation(features, rois, output_size, scales, sampling_ratio=2, aligned=False,
                          canonical_scale=224):
  """L full roi_aligns, each RoI's row selected by its level."""
  k_min = -round(math.log2(scales[0]))
  level = msr.roi_levels(rois, k_min, k_min + len(scales) - 1, canonical_scale)
  out = 0
  for l, (f, s) in enumerate(zip(features, scales)):
    one = roi.roi_align(f, rois, output_size, s, sampling_ratio, aligned)
    out = out + jnp.where((level == l)[:, None, None, None], one, 0)
  return out


# --------------------------------------------------------------------------- level mapping


def _wide(areas):
  """Boxes 0..area x 0..1: (x2 - x1) * (y2 - y1) is the float32 area exactly."""
  areas = np.asarray(areas, F32)
  return np.stack([np.zeros_like(areas), np.zeros_like(areas), areas, np.ones_like(areas)], 1)


def test_roi_levels_golden():
  boxes = np.array([
      [0, 0, 224, 224],       # canonical: P4
      [10, 20, 122, 132],     # 112: P3
      [0, 0, 448, 448],       # P5
      [0, 0, 2, 3],           # tiny: P2
      [0, 0, 5000, 5000],     # huge: clamped to P5
      [0, 0, 112, 448],       # sqrt(area) = 224 exactly, not square: P4
      [0, 0, 111.99, 112],    # just below 112 (beyond eps): P2
      [0, 0, 896, 896],       # level 6 before the clamp: P5
      [0, 0, 56, 56],         # level 2 exactly
      [0, 0, 55.9, 56],       # level 1 before the clamp: P2
      [5, 5, 5, 40],          # zero area: log2(0) = -inf -> P2
      [0, 0, np.inf, 10],     # infinite area -> P5
      [0, 0, 300, 300],       # between P4 and P5: P4
  ], F32)
  want = [2, 1, 3, 0, 3, 2, 0, 3, 0, 0, 0, 3, 2]
  np.testing.assert_array_equal(np.asarray(levels(boxes, 2, 5, 224, 4)), want)
  assert levels(boxes, 2, 5, 224, 4).dtype == jnp.int32
  assert [ref_level(b, 2, 5) for b in boxes] == want


def test_roi_levels_eps_edge():
  # The smallest float32 areas of levels 3, 4, 5 under torchvision's float32 arithmetic
  # (LevelMapper on torch 2.x CPU switches exactly there): eps = 1e-6 lifts areas up to
  # ~1.4e-6 relative below 112^2, 224^2 and 448^2 onto the next level.
  edges = np.array([12543.98046875, 50175.9296875, 200703.671875], F32)
  below = np.nextafter(edges, F32(0))
  assert np.all(edges < F32([112**2, 224**2, 448**2]))
  got = np.asarray(levels(_wide(np.concatenate([below, edges])), 2, 5, 224, 4))
  np.testing.assert_array_equal(got, [0, 1, 2, 1, 2, 3])
  # Exactly on a power of 2 (log2 is an integer): that level, also for other canonicals.
  exact = np.array([112.0**2, 224.0**2, 448.0**2, 14.0**2, 28.0**2, 56.0**2], F32)
  np.testing.assert_array_equal(np.asarray(levels(_wide(exact), 2, 5, 224, 4)),
                                [1, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(levels(_wide(exact), 2, 5, CANONICAL, 4)),
                                [3, 3, 3, 1, 2, 3])
  np.testing.assert_array_equal(np.asarray(levels(_wide(exact), 0, 4, 56, 3)),
                                [4, 4, 4, 1, 2, 3])


def test_roi_levels_degenerate_and_single_level():
  boxes = np.array([[10, 10, 0, 20], [np.nan, 0, 5, 5], [0, 0, 1000, 1000], [10, 10, 0, 0]],
                   F32)
  # Negative area (torchvision: NaN) and NaN -> the finest level; both axes inverted: > 0.
  np.testing.assert_array_equal(np.asarray(levels(boxes, 2, 5, 224, 4)), [0, 0, 3, 0])
  np.testing.assert_array_equal(np.asarray(levels(boxes, 3, 3, 224, 4)), [0, 0, 0, 0])
  assert levels(np.zeros((0, 4), F32), 2, 5, 224, 4).shape == (0,)


def test_roi_levels_match_torchvision_level_mapper():
  torch = pytest.importorskip("torch")
  poolers = pytest.importorskip("torchvision.ops.poolers")
  rng = np.random.default_rng(0)
  near = []
  for edge in msr._area_thresholds(-3, 8, 224, 4):   # every float32 within 64 ulps
    bits = np.array(edge, F32).view(np.int32)
    near.append(np.arange(bits - 64, bits + 64, dtype=np.int32).view(F32))
  areas = np.concatenate(near + [np.exp(rng.uniform(-2, 30, 20000)).astype(F32)])
  boxes = _wide(areas)
  boxes = np.concatenate([boxes, spread_rois(rng, 2000, 600, 1000, 1, 1500)])
  for k_min, k_max in ((2, 5), (-3, 8)):
    want = poolers.LevelMapper(k_min, k_max)([torch.from_numpy(boxes)]).numpy()
    np.testing.assert_array_equal(np.asarray(levels(boxes, k_min, k_max, 224, 4)), want)


# --------------------------------------------------------------------------------- forward

CASES = [  # (sampling_ratio, aligned, output_size)
    (2, False, 7), (1, True, (3, 5)), (3, False, (2, 1)),
]


@pytest.mark.parametrize("sampling_ratio,aligned,output_size", CASES)
def test_matches_numpy_reference(sampling_ratio, aligned, output_size):
  rng = np.random.default_rng(sampling_ratio * 2 + aligned)
  feats = pyramid(rng, 3)
  rois = level_rois(rng)
  oh, ow = (output_size,) * 2 if isinstance(output_size, int) else output_size
  got = np.asarray(pool(feats, rois, output_size, SCALES, sampling_ratio, aligned, CANONICAL, 4))
  level = np.asarray(levels(rois, 2, 5, CANONICAL, 4))
  assert np.all(np.bincount(level, minlength=4) >= 8), np.bincount(level)
  want = ref_multiscale(feats, rois, oh, ow, SCALES, sampling_ratio, aligned, CANONICAL)
  assert got.shape == (len(rois), oh, ow, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gradient", msr.GRADIENTS)
def test_equals_reference_formulation_and_its_gradient(gradient):
  rng = np.random.default_rng(3)
  feats = [jnp.asarray(f) for f in pyramid(rng, 4)]
  rois = np.concatenate([level_rois(rng, 45),
                         [[np.nan, 0, 8, 8], [0, 0, np.inf, 40], [-np.inf, 0, 8, 8]]]).astype(F32)
  cot = rng.standard_normal((len(rois), 3, 2, 4)).astype(F32)
  ours = lambda f, b: msr.multiscale_roi_align(f, b, (3, 2), SCALES, 2, False, CANONICAL,
                                               gradient=gradient)
  ref = lambda f, b: reference_formulation(f, b, (3, 2), SCALES, canonical_scale=CANONICAL)

  def vjp(fn):
    def run(f, b, g):
      out, back = jax.vjp(fn, f, b)
      return out, back(g)
    return jax.jit(run)

  ours_vjp, ref_vjp = vjp(ours), vjp(ref)
  (out, (got, rois_grad)), (want_out, (want, _)) = ours_vjp(feats, rois, cot), ref_vjp(
      feats, rois, cot)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))    # NaN rows too
  assert np.all(np.isnan(out[-3:])) and np.all(np.isfinite(out[:-3]))
  assert not np.any(np.asarray(rois_grad))
  for l, (g, w) in enumerate(zip(got, want)):
    assert g.shape == feats[l].shape and np.any(np.asarray(g)), l
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
  # A NaN cotangent on one RoI's rows reaches its level's gradient only (as in the reference).
  cot[0] = np.nan
  level = int(levels(rois[:1], 2, 5, CANONICAL, 4)[0])
  _, (grads, _) = ours_vjp(feats, rois, cot)
  assert [bool(np.any(np.isnan(np.asarray(g)))) for g in grads] == [l == level for l in range(4)]


def test_matches_torchvision_multiscale_roi_align():
  torch = pytest.importorskip("torch")
  ops = pytest.importorskip("torchvision.ops")
  # Two images (384x480, 416x448) batched as torchvision's transform pads them, to 416x480.
  # MultiScaleRoIAlign infers each level's scale as 2^round(log2(H_l / max image height))
  # (heights only; the widths are ignored): 104/416 .. 13/416 = 1/4 .. 1/32 here.
  image_shapes = [(384, 480), (416, 448)]
  rng = np.random.default_rng(4)
  c = 5
  feats = pyramid(rng, c, [(416 >> k, 480 >> k) for k in range(2, 6)], lead=(2,))
  boxes = [spread_rois(rng, n, h, w, 8, 800) for n, (h, w) in zip((70, 50), image_shapes)]
  # torchvision requires x1 < x2, y1 < y2: its LevelMapper gives a box of negative area NaN,
  # which matches no level, so that box's row stays 0 (ours pools it on P2).
  for b in boxes:
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 0.5)
  x = collections.OrderedDict(
      (str(k), torch.from_numpy(f.transpose(0, 3, 1, 2).copy())) for k, f in enumerate(feats))
  x["pool"] = torch.zeros((2, c, 7, 8))   # FPN's extra level: not in featmap_names
  pooler = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
  want = pooler(x, [torch.from_numpy(b) for b in boxes], image_shapes).numpy()
  assert pooler.scales == list(SCALES)
  want = want.transpose(0, 2, 3, 1)
  got = np.concatenate([np.asarray(pool([f[i] for f in feats], b, 7, SCALES, 2, False, 224, 4))
                        for i, b in enumerate(boxes)])
  level = np.asarray(levels(np.concatenate(boxes), 2, 5, 224, 4))
  assert np.all(np.bincount(level, minlength=4) >= 10), np.bincount(level)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_single_level_is_roi_align():
  rng = np.random.default_rng(5)
  f = rng.standard_normal((9, 12, 2)).astype(F32)
  rois = random_rois(rng, 40, 9 * 16, 12 * 16)
  got = pool([f], rois, (2, 3), (1 / 16,), 2, False, 224, 4)
  want = jax.jit(roi.roi_align, static_argnums=(2, 3))(f, rois, (2, 3), 1 / 16)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_one_gather_pass_and_no_scatter():
  # As many gathers as one roi_align (one per bilinear tap), not one roi_align per level.
  rng = np.random.default_rng(6)
  feats, rois = pyramid(rng, 2), jnp.zeros((10, 4))
  fn = lambda f, r: msr.multiscale_roi_align(f, r, 7, SCALES)
  ours = jax.jit(fn).lower(feats, rois).as_text()
  one = jax.jit(lambda f, r: roi.roi_align(f, r, 7, 1 / 4)).lower(feats[0], rois).as_text()
  assert ours.count("stablehlo.gather") == one.count("stablehlo.gather") > 0
  grad = jax.jit(jax.grad(lambda f: jnp.sum(fn(f, rois)))).lower(feats).as_text()
  assert "scatter" not in grad


def test_vmap_equals_loop_and_jit_traces_once():
  chex.clear_trace_counter()
  rng = np.random.default_rng(7)
  feats = [jnp.asarray(f) for f in pyramid(rng, 3, lead=(3,))]
  rois = jnp.asarray(np.stack([level_rois(rng, 24) for _ in range(3)]))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def batched(f, b):
    return jax.vmap(lambda x, y: msr.multiscale_roi_align(x, y, (3, 2), SCALES, 2, True,
                                                          CANONICAL))(f, b)

  out = batched(feats, rois)
  batched([f + 1.0 for f in feats], rois * 0.9)
  for i in range(3):
    one = pool([f[i] for f in feats], rois[i], (3, 2), SCALES, 2, True, CANONICAL, 4)
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(one), rtol=1e-6, atol=1e-6)


def test_empty_roi_set_and_dtype():
  feats = [jnp.ones((8 >> k, 6 >> k, 2), jnp.bfloat16) for k in range(3)]
  out = pool(feats, jnp.zeros((0, 4)), (2, 3), (1 / 8, 1 / 16, 1 / 32), 2, False, 224, 4)
  assert out.shape == (0, 2, 3, 2) and out.dtype == jnp.bfloat16
  out = pool(feats, np.array([[0, 0, 40, 40]], F32), 2, (1 / 8, 1 / 16, 1 / 32), 2, False,
             224, 4)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, F32), 1.0)


def test_bad_arguments_raise():
  feats, rois = [jnp.ones((8, 8, 2)), jnp.ones((4, 4, 2))], jnp.zeros((3, 4))
  with pytest.raises(ValueError, match="same number of channels"):
    msr.multiscale_roi_align([feats[0], jnp.ones((4, 4, 3))], rois, 2, (1 / 4, 1 / 8))
  with pytest.raises(ValueError, match="powers of 2"):
    msr.multiscale_roi_align(feats, rois, 2, (1 / 4, 0.1))
  with pytest.raises(ValueError, match="powers of 2"):
    msr.multiscale_roi_align(feats, rois, 2, (1 / 4, -1 / 8))
  with pytest.raises(ValueError, match="one scale per feature level"):
    msr.multiscale_roi_align(feats, rois, 2, (1 / 4, 1 / 8, 1 / 16))
  with pytest.raises(ValueError, match="halve"):
    msr.multiscale_roi_align(feats, rois, 2, (1 / 4, 1 / 16))
  with pytest.raises(ValueError, match="halve"):
    msr.multiscale_roi_align(feats, rois, 2, (1 / 8, 1 / 4))
  with pytest.raises(ValueError, match="rois"):
    msr.multiscale_roi_align(feats, jnp.zeros((3, 5)), 2, (1 / 4, 1 / 8))
  with pytest.raises(ValueError, match="rois"):
    msr.multiscale_roi_align(feats, jnp.zeros((2, 3, 4)), 2, (1 / 4, 1 / 8))
  with pytest.raises(ValueError, match=r"features\[1\]"):
    msr.multiscale_roi_align([feats[0], jnp.ones((4, 2))], rois, 2, (1 / 4, 1 / 8))
  with pytest.raises(TypeError, match="sequence"):
    msr.multiscale_roi_align(feats[0], rois, 2, (1 / 4,))
  with pytest.raises(ValueError, match="at least one"):
    msr.multiscale_roi_align([], rois, 2, ())
  with pytest.raises(ValueError, match="sampling_ratio"):
    msr.multiscale_roi_align(feats, rois, 2, (1 / 4, 1 / 8), sampling_ratio=0)
  with pytest.raises(ValueError, match="output_size"):
    msr.multiscale_roi_align(feats, rois, (2, 0), (1 / 4, 1 / 8))
  with pytest.raises(ValueError, match="k_min"):
    msr.roi_levels(rois, 5, 2)
  with pytest.raises(ValueError, match="canonical_scale"):
    msr.roi_levels(rois, 2, 5, canonical_scale=0)
  with pytest.raises(ValueError, match="rois"):
    msr.roi_levels(jnp.zeros((4,)), 2, 5)
