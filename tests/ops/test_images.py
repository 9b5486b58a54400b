"""Tests for frcnn_jax/ops/images.py: the device resize equals the host (Pillow) path."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from frcnn_jax.data import transforms
from frcnn_jax.ops import images


def _host(image: np.ndarray, scale: float, flip: bool, canvas: tuple[int, int]) -> np.ndarray:
  """The host pipeline's pixels: transforms.resize, hflip, pad_image."""
  out, boxes = transforms.resize(image, np.zeros((0, 4), np.float32), scale, canvas)
  if flip:
    out, _ = transforms.hflip(out, boxes)
  return transforms.pad_image(out, canvas)


def _source_canvas(image: np.ndarray, source: tuple[int, int]) -> np.ndarray:
  canvas = np.zeros((*source, 3), np.uint8)
  canvas[:image.shape[0], :image.shape[1]] = image
  return canvas


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Smooth colour blobs plus noise and hard edges (exercises both filters' regimes)."""
  small = rng.uniform(0, 255, (max(h // 8, 2), max(w // 8, 2), 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
  image[rng.integers(0, h):, rng.integers(0, w):] = rng.uniform(0, 255, 3)
  image += rng.normal(0, 20, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _reference_weights(n: int, m: int) -> np.ndarray:
  """Pillow's precompute_coeffs (Resample.c) for the bilinear filter, in loops."""
  scale = n / m
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale
  out = np.zeros((m, n))
  for i in range(m):
    centre = (i + 0.5) * scale
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), n)
    weights = [max(0.0, 1.0 - abs((j + lo - centre + 0.5) / filterscale)) for j in range(hi - lo)]
    total = sum(weights)
    for j, w in enumerate(weights):
      out[i, lo + j] = w / total if total else 0.0
  return out


def _reference_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """Pillow's 8-bit two-pass resampling (horizontal first) in plain loops."""
  def one_pass(rows: np.ndarray, m: int) -> np.ndarray:   # resamples axis 1 of [R, n, C]
    kk = np.floor(0.5 + _reference_weights(rows.shape[1], m) * 2**22).astype(np.int64)
    out = np.zeros((rows.shape[0], m, rows.shape[2]), np.int64)
    for r in range(rows.shape[0]):
      for i in range(m):
        for c in range(rows.shape[2]):
          acc = 2**21 + sum(int(rows[r, j, c]) * int(kk[i, j]) for j in range(rows.shape[1]))
          out[r, i, c] = min(max(acc >> 22, 0), 255)
    return out
  x = one_pass(image.astype(np.int64), w) if w != image.shape[1] else image.astype(np.int64)
  if h != image.shape[0]:
    x = one_pass(x.transpose(1, 0, 2), h).transpose(1, 0, 2)
  return x.astype(np.uint8)


def _pillow_goes_horizontal_first(hw: tuple[int, int], target: tuple[int, int]) -> bool:
  """Pillow 13's order (python-pillow/Pillow#9549): vertical first when H - h > 2 (W - w)."""
  (h0, w0), (h, w) = hw, target
  return not (h < h0 and h0 - h > 2 * (w0 - w) and w != w0)


@pytest.mark.parametrize("n, m", [(10, 10), (10, 7), (7, 10), (375, 600), (500, 333), (1, 5),
                                  (5, 1), (500, 31)])
def test_resize_weights_are_pillows_fixed_point_coefficients(n, m):
  got = np.asarray(images.resize_weights(n, m, n + 3, m + 2))
  expected = np.floor(0.5 + _reference_weights(n, m) * 2**22)
  np.testing.assert_array_equal(got[:m, :n], expected)
  assert not got[m:].any() and not got[:, n:].any()   # padding rows and columns


def test_one_pass_equals_the_loop_reference_and_pillow():
  rng = np.random.default_rng(3)
  for (h0, w0), (h, w) in [((1, 23), (1, 9)), ((1, 9), (1, 23)), ((17, 1), (40, 1)),
                           ((12, 15), (7, 31))]:
    image = rng.integers(0, 256, (h0, w0, 3), np.uint8)
    out = np.asarray(images.resize_flip_pad(image[None], [[h0, w0]], [[h, w]], [False],
                                            (h, w)))[0]
    np.testing.assert_array_equal(out, _reference_resize(image, h, w))
    pillow = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if _pillow_goes_horizontal_first((h0, w0), (h, w)):
      np.testing.assert_array_equal(out, pillow)


def test_identity_size_is_exact():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (13, 17, 3), np.uint8)
  out = images.resize_flip_pad(image[None], [[13, 17]], [[13, 17]], [False], (16, 20))
  np.testing.assert_array_equal(np.asarray(out[0]), transforms.pad_image(image, (16, 20)))


def test_hand_computed_2x_upscale_of_one_row():
  # Pillow: 2 -> 4 pixels, centres 0.25, 0.75, 1.25, 1.75 in input pixels: weights
  # (1, 0), (0.75, 0.25), (0.25, 0.75), (0, 1) -> 10, 25, 55, 70 for the row (10, 70).
  image = np.zeros((1, 2, 3), np.uint8)
  image[0, :, 0] = (10, 70)
  out = images.resize_flip_pad(image[None], [[1, 2]], [[1, 4]], [False], (1, 5))
  np.testing.assert_array_equal(np.asarray(out[0, 0, :, 0]), [10, 25, 55, 70, 0])
  flipped = images.resize_flip_pad(image[None], [[1, 2]], [[1, 4]], [True], (1, 5))
  np.testing.assert_array_equal(np.asarray(flipped[0, 0, :, 0]), [70, 55, 25, 10, 0])


CASES = [   # (source h, w), scale, flip: down- and up-scaling, both orientations
    ((37, 50), 1.6, False), ((50, 37), 1.6, True), ((48, 64), 0.55, False),
    ((64, 31), 0.47, True), ((41, 41), 1.0, True), ((30, 45), 2.3, False),
    ((45, 30), 0.8, True), ((25, 60), 1.27, False),
]


def test_batch_matches_the_host_path_within_one_step():
  rng = np.random.default_rng(1)
  source, canvas = (64, 64), (96, 112)
  raw = [_photo(rng, h, w) for (h, w), _, _ in CASES]
  target = [transforms.scaled_hw(r.shape[:2], s, canvas) for r, (_, s, _) in zip(raw, CASES)]
  batch = np.stack([_source_canvas(r, source) for r in raw])
  fn = jax.jit(chex.assert_max_traces(
      lambda *a: images.resize_flip_pad(*a, canvas_hw=canvas), n=1))
  out = np.asarray(fn(batch, np.asarray([r.shape[:2] for r in raw], np.int32),
                      np.asarray(target, np.int32), np.asarray([f for *_, f in CASES])))
  assert out.dtype == np.uint8 and out.shape == (len(CASES), *canvas, 3)
  exact = 0
  for k, (r, (_, s, flip)) in enumerate(zip(raw, CASES)):
    host = _host(r, s, flip, canvas)
    diff = np.abs(out[k].astype(int) - host.astype(int))
    assert diff.max() <= 1, (CASES[k], diff.max())
    if _pillow_goes_horizontal_first(r.shape[:2], target[k]):   # the same arithmetic: exact
      assert diff.max() == 0, CASES[k]
      exact += 1
  assert exact >= len(CASES) // 2
  # Same sizes, another batch of pixels: no retrace (the sizes are traced, not static).
  fn(batch[::-1], np.asarray([r.shape[:2] for r in raw[::-1]], np.int32),
     np.asarray(target[::-1], np.int32), np.asarray([f for *_, f in CASES][::-1]))


@pytest.mark.parametrize("seed", range(3))
def test_random_sizes_match_the_host_path(seed):
  rng = np.random.default_rng(100 + seed)
  h, w = (int(v) for v in rng.integers(8, 60, 2))
  scale = float(rng.uniform(0.3, 2.5))
  canvas = (int(np.ceil(h * scale)) + 3, int(np.ceil(w * scale)) + 5)
  flip = bool(rng.integers(2))
  image = _photo(rng, h, w)
  out = images.resize_flip_pad(_source_canvas(image, (64, 64))[None], [[h, w]],
                               [transforms.scaled_hw((h, w), scale, canvas)], [flip], canvas)
  target = transforms.scaled_hw((h, w), scale, canvas)
  diff = np.abs(np.asarray(out[0]).astype(int) - _host(image, scale, flip, canvas).astype(int))
  assert diff.max() <= (0 if _pillow_goes_horizontal_first((h, w), target) else 1)


def test_output_is_uint8_on_the_static_canvas():
  out = jax.eval_shape(lambda x: images.resize_flip_pad(
      x, jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2), jnp.int32), jnp.zeros(2, bool),
      (608, 800)), jax.ShapeDtypeStruct((2, 500, 500, 3), jnp.uint8))
  assert out.shape == (2, 608, 800, 3) and out.dtype == jnp.uint8
