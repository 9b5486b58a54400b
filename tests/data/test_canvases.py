"""Tests for frcnn_jax/data/canvases.py against plain-loop references."""

import itertools

import numpy as np
import pytest

from frcnn_jax.data import canvases as cv
from frcnn_jax.data import images
from frcnn_jax.data import transforms

# VOC-like original sizes (height, width) and how often each occurs.
VOC_MIX = {(375, 500): 60, (500, 375): 15, (333, 500): 10, (500, 333): 4, (500, 500): 3,
           (281, 500): 4, (334, 500): 2, (366, 500): 3, (400, 500): 2, (500, 400): 1}


def _voc_sizes(n, min_size=600, max_size=1000, seed=0):
  hws = [hw for hw, c in VOC_MIX.items() for _ in range(c)]
  rng = np.random.default_rng(seed)
  return np.array([cv.resized_hw(hws[i], min_size, max_size)
                   for i in rng.integers(0, len(hws), n)])


def _ref_assign(sizes, canvases):
  out = []
  for h, w in sizes:
    best = None
    for i, (ch, cw) in enumerate(canvases):
      if h <= ch and w <= cw and (best is None or ch * cw < canvases[best][0] *
                                  canvases[best][1]):
        best = i
    out.append(best)
  return out


def _ref_optimum(sizes, k, multiple):
  """Least total canvas pixels over every set of at most k canvases on the multiple grid."""
  top_h = -(-max(h for h, _ in sizes) // multiple) * multiple
  top_w = -(-max(w for _, w in sizes) // multiple) * multiple
  grid = [(h, w) for h in range(multiple, top_h + 1, multiple)
          for w in range(multiple, top_w + 1, multiple)]
  best = None
  for n in range(1, k + 1):
    for subset in itertools.combinations(grid, n):
      total = 0
      for h, w in sizes:
        areas = [ch * cw for ch, cw in subset if h <= ch and w <= cw]
        if not areas:
          break
        total += min(areas)
      else:
        best = total if best is None else min(best, total)
  return best


def _total(sizes, canvases):
  return sum(canvases[i][0] * canvases[i][1] for i in _ref_assign(sizes, canvases))


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (333, 500), (281, 500), (100, 1000),
                                (1, 3), (599, 601), (4000, 30)])
def test_resized_hw_is_what_prepare_gives(hw):
  example = {"image": np.zeros((*hw, 3), np.uint8), "boxes": np.zeros((0, 4)),
             "labels": np.zeros(0), "difficult": np.zeros(0, bool), "image_id": 0}
  size = cv.resized_hw(hw, 600, 1000)
  scale = min(600 / min(hw), 1000 / max(hw))
  assert size == (max(round(hw[0] * scale), 1), max(round(hw[1] * scale), 1))
  canvas = tuple(-(-s // 32) * 32 for s in size)
  fields, _ = transforms.prepare(example, min_size=600, max_size=1000, pad_hw=canvas, max_gt=1,
                                 training=False)
  assert tuple(fields["image_hw"]) == size
  assert fields["scale"] == np.float32(scale)


def test_choose_is_optimal_on_small_random_cases():
  rng = np.random.default_rng(0)
  for _ in range(12):
    n, k, multiple = int(rng.integers(1, 9)), int(rng.integers(1, 4)), int(rng.choice([8, 16]))
    sizes = [tuple(int(v) for v in rng.integers(1, 50, 2)) for _ in range(n)]
    canvases = cv.choose_canvases(np.array(sizes), k, multiple)
    assert 1 <= len(canvases) <= k
    assert all(h % multiple == 0 and w % multiple == 0 for h, w in canvases)
    assert _total(sizes, canvases) == _ref_optimum(sizes, k, multiple)
    assert list(cv.assign_canvases(np.array(sizes), canvases)) == _ref_assign(sizes, canvases)
    # Every canvas is used and sorted by area.
    assert set(_ref_assign(sizes, canvases)) == set(range(len(canvases)))
    areas = [h * w for h, w in canvases]
    assert areas == sorted(areas)


def test_local_search_near_exhaustive():
  rng = np.random.default_rng(1)
  for _ in range(6):
    n = int(rng.integers(20, 200))
    sizes = np.stack([rng.integers(10, 100, n), rng.integers(10, 100, n)], 1)
    k = int(rng.integers(2, 5))
    exact = cv.choose_canvases(sizes, k, 16, exhaustive=True)
    local = cv.choose_canvases(sizes, k, 16, exhaustive=False)
    assert _total(sizes, local) <= 1.01 * _total(sizes, exact)


def test_voc_mix_four_canvases_over_90_percent_useful():
  sizes = _voc_sizes(3000)
  one = cv.choose_canvases(sizes, 1)
  assert one == ((928, 1024),)  # 600x901 portrait height, 562x1000 panorama width
  four = cv.choose_canvases(sizes, 4)
  assert len(four) == 4
  assert 1.0 - cv.padded_fraction(sizes, four) >= 0.90
  assert cv.choose_canvases(sizes, 4, exhaustive=False) == four
  assert cv.padded_fraction(sizes, one) > 0.45


def test_fewer_canvases_than_asked_when_more_do_not_help():
  sizes = np.array([[600, 800]] * 5 + [[800, 600]] * 3)
  assert cv.choose_canvases(sizes, 4) == ((608, 800), (800, 608))


def test_assign_smallest_area_none_shrunk_ties_lower_index():
  rng = np.random.default_rng(2)
  canvases = [(64, 96), (96, 64), (96, 96), (64, 64), (128, 48)]
  sizes = np.stack([rng.integers(1, 97, 200), rng.integers(1, 97, 200)], 1)
  sizes = sizes[[any(h <= ch and w <= cw for ch, cw in canvases) for h, w in sizes]]
  got = cv.assign_canvases(sizes, canvases)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, _ref_assign(sizes.tolist(), canvases))
  for (h, w), i in zip(sizes, got):
    assert h <= canvases[i][0] and w <= canvases[i][1]
  assert list(cv.assign_canvases([[10, 10]], [(32, 64), (64, 32)])) == [0]
  assert list(cv.assign_canvases([[10, 10]], [(64, 32), (32, 64)])) == [0]


def test_assign_names_the_size_nothing_holds():
  with pytest.raises(ValueError, match="70x20"):
    cv.assign_canvases([[10, 10], [70, 20]], [(64, 64)])


@pytest.mark.parametrize("sizes,k,match", [
    (np.zeros((0, 2)), 2, "no image sizes"), ([[0, 5]], 2, "positive"),
    ([[5, 5]], 0, "num_canvases"), (np.ones((3, 3)), 1, r"\[N, 2\]")])
def test_choose_rejects_bad_input(sizes, k, match):
  with pytest.raises(ValueError, match=match):
    cv.choose_canvases(sizes, k)


class _Source:
  """Annotation-only source: record 2's image header is unreadable."""
  name = "fake"

  def __init__(self, hws):
    self._hws = hws

  def __len__(self):
    return len(self._hws)

  def annotation(self, i):
    if i == 2:
      raise images.ImageDecodeError("bad header")
    return {"orig_hw": np.array(self._hws[i], np.int32)}

  def __getitem__(self, i):
    raise AssertionError("canvases must not decode images")


def test_canvases_for_source_from_annotations():
  hws = [(375, 500), (500, 375), (9000, 10), (375, 500), (333, 500)]
  source = _Source(hws)
  sizes = cv.source_sizes(source, min_size=600, max_size=1000)
  np.testing.assert_array_equal(sizes, [[600, 800], [800, 600], [0, 0], [600, 800],
                                        [600, 901]])
  got = cv.canvases_for_source(source, min_size=600, max_size=1000, num_canvases=2)
  assert got == cv.choose_canvases(sizes[[0, 1, 3, 4]], 2)
  assert got == ((800, 608), (608, 928))


def test_canvases_from_config_keys():
  from frcnn_jax.config import build as builders  # pylint: disable=g-import-not-at-top
  from frcnn_jax.config import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.get_config()
  assert config.data.pad_hw == () and config.data.canvases == ()
  source = _Source([(375, 500), (500, 375), (375, 500), (333, 500), (500, 333)])
  assert builders.canvases_from_config(config, source) == cv.choose_canvases(
      cv.source_sizes(source, min_size=600, max_size=1000)[[0, 1, 3, 4]], 4)
  generic = builders.canvases_from_config(config)
  assert 1 <= len(generic) <= 4 and all(h % 32 == 0 and w % 32 == 0 for h, w in generic)
  for hw in builders.GENERIC_ASPECTS:   # common photo shapes are never shrunk
    size = cv.resized_hw((hw[0] * 100, hw[1] * 100), 600, 1000)
    cv.assign_canvases([size], generic)
  config.data.canvases = ((608, 800), (800, 608))
  assert builders.canvases_from_config(config, source) == ((608, 800), (800, 608))
  config.data.canvases = ((600, 800),)
  with pytest.raises(ValueError, match=r"data\.canvases.*stride 16 \(model\.vgg16\)"):
    builders.canvases_from_config(config)
  config.data.canvases = ()
  config.data.pad_hw = (1000, 1000)
  assert builders.canvases_from_config(config, source) == ((1000, 1000),)
  config.data.canvases = ((608, 800),)
  with pytest.raises(ValueError, match="not both"):
    builders.canvases_from_config(config)
  config.data.canvases, config.data.canvas_multiple = (), 24
  with pytest.raises(ValueError, match="data.canvas_multiple"):
    builders.canvases_from_config(config)
