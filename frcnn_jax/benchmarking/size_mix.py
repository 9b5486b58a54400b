"""A dataset's size mix laid out on one fixed canvas or on K chosen canvases.

A mix is a set of original image sizes with counts: the VOC2007 test images ("voc07", from
benchmarks/voc2007_test_sizes.txt), every record of a config's dataset split ("train" /
"eval", sizes from `annotation(i)` without decoding), or a listed "HxW:count,...". Each size
is resized by `data.min_size` / `data.max_size` (`canvases.resized_hw`); a layout places
every resized size on the smallest of its canvases that holds it
(`canvases.assign_canvases`); the K chosen canvases are `canvases.choose_canvases`.
"""

import collections
import dataclasses
import os

import ml_collections
import numpy as np

from frcnn_jax.benchmarking import cases
from frcnn_jax.config import build as builders
from frcnn_jax.data import canvases
from frcnn_jax.data import images

VOC07_SIZES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks", "voc2007_test_sizes.txt")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a size mix is laid out on canvases.

  Attributes:
    name: "single HxW" (the one fixed canvas) or "K=k" (`canvases.choose_canvases`).
    canvases: the (height, width) canvases, ascending by area for chosen ones.
    shares: fraction of the mix's images on each canvas (each on the smallest that holds it).
    useful: image pixels / canvas pixels over the mix.
  """
  name: str
  canvases: tuple[tuple[int, int], ...]
  shares: tuple[float, ...]
  useful: float


@dataclasses.dataclass(frozen=True)
class MixPlan:
  """A size mix and its layouts.

  Attributes:
    description: where the sizes come from.
    sizes: int64 [V, 2] distinct resized (height, width), most frequent first.
    counts: int64 [V] images of each.
    layouts: the single canvas, then one Layout per K.
    multiple: the canvas multiple.
  """
  description: str
  sizes: np.ndarray
  counts: np.ndarray
  layouts: list[Layout]
  multiple: int


def parse_mix_list(text: str) -> tuple[np.ndarray, np.ndarray]:
  """Parses "375x500:3,500x375" (original HxW, optional :count) into (hw [U, 2], counts [U]).

  Raises:
    ValueError: naming the bad entry.
  """
  hws, counts = [], []
  for entry in text.split(","):
    size, _, count = entry.strip().partition(":")
    hws.append(cases.parse_size(size))
    try:
      counts.append(int(count) if count else 1)
    except ValueError:
      raise ValueError(f"--mix entry {entry!r}: the count after ':' must be an integer"
                       ) from None
    if counts[-1] < 1:
      raise ValueError(f"--mix entry {entry!r}: the count must be >= 1")
  return np.asarray(hws, np.int64).reshape(-1, 2), np.asarray(counts, np.int64)


def read_size_table(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(hw [U, 2], counts [U]) from a "height width count" table ('#' lines are comments).

  Raises:
    ValueError: a line is not three positive integers.
  """
  rows = np.loadtxt(path, dtype=np.int64, comments="#", ndmin=2)
  if rows.shape[1] != 3 or rows.min() < 1:
    raise ValueError(f"{path}: expected lines 'height width count' of positive integers")
  return rows[:, :2], rows[:, 2]


def source_size_mix(source) -> tuple[np.ndarray, np.ndarray, int]:
  """Original sizes of a source's records from `annotation(i)["orig_hw"]` (no decoding).

  Returns:
    (hw [U, 2], counts [U], unreadable): distinct sizes, how many records have each, and how
    many records were left out because their image header is unreadable (tfds source).

  Raises:
    ValueError: no record is readable.
  """
  sizes, unreadable = [], 0
  for i in range(len(source)):
    try:
      sizes.append(tuple(int(v) for v in source.annotation(i)["orig_hw"]))
    except images.ImageDecodeError:
      unreadable += 1
  if not sizes:
    raise ValueError(f"{getattr(source, 'name', 'source')}: no readable records")
  hw, counts = np.unique(np.asarray(sizes, np.int64), axis=0, return_counts=True)
  return hw, counts.astype(np.int64), unreadable


def mix_sizes(spec: str, config: ml_collections.ConfigDict
              ) -> tuple[np.ndarray, np.ndarray, str]:
  """The original sizes of the mix `spec` names, with counts, and a description.

  Args:
    spec: "voc07" (VOC07_SIZES: the VOC2007 test images), "train" or "eval" (every record of
      the config's dataset split, e.g. a VOCdevkit folder with
      `--config.data.name=voc_folder --config.data.voc_folder.data_dir=...`), or a list
      "HxW:count,...".
    config: the loaded config (data source, for "train" / "eval").

  Returns:
    (hw int64 [U, 2] original (height, width), counts int64 [U], description).

  Raises:
    ValueError / FileNotFoundError: a bad list, or missing data.
  """
  if spec == "voc07":
    hw, counts = read_size_table(VOC07_SIZES)
    return hw, counts, (f"VOC2007 test sizes ({int(counts.sum())} images, "
                        f"{os.path.relpath(VOC07_SIZES)})")
  if spec in ("train", "eval"):
    source = builders.source_from_config(config, spec)
    hw, counts, unreadable = source_size_mix(source)
    note = f", {unreadable} with unreadable headers left out" if unreadable else ""
    data_dir = getattr(builders.source_settings(config), "data_dir", "") or "-"
    return hw, counts, (f"{config.data.name} {spec} split of {data_dir} "
                        f"({int(counts.sum())} records{note})")
  hw, counts = parse_mix_list(spec)
  return hw, counts, f"listed sizes {spec}"


def resized_mix(hw: np.ndarray, counts: np.ndarray, min_size: int, max_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Distinct resized sizes (py-faster-rcnn's rule, `canvases.resized_hw`) and their counts.

  Returns:
    (sizes int64 [V, 2], counts int64 [V]), most frequent first (ties: by size).
  """
  resized = np.asarray([canvases.resized_hw(s, min_size, max_size) for s in hw], np.int64)
  sizes, inverse = np.unique(resized.reshape(-1, 2), axis=0, return_inverse=True)
  merged = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(sizes))
  merged = merged.astype(np.int64)
  order = np.lexsort((sizes[:, 1], sizes[:, 0], -merged))
  return sizes[order], merged[order]


def make_layout(name: str, canvas_list, sizes: np.ndarray, counts: np.ndarray) -> Layout:
  """Places every size on the smallest canvas that holds it (`canvases.assign_canvases`).

  Raises:
    ValueError: no canvas holds some size (named).
  """
  canvas_list = tuple((int(h), int(w)) for h, w in canvas_list)
  index = canvases.assign_canvases(sizes, canvas_list)
  areas = np.asarray([h * w for h, w in canvas_list], np.float64)
  content = float((counts * sizes[:, 0] * sizes[:, 1]).sum())
  shares = np.bincount(index, weights=counts, minlength=len(canvas_list)) / counts.sum()
  return Layout(name, canvas_list, tuple(float(s) for s in shares),
                content / float((counts * areas[index]).sum()))


def plan_layouts(sizes: np.ndarray, counts: np.ndarray, single_hw: tuple[int, int],
                 num_canvases: list[int], multiple: int) -> list[Layout]:
  """The single fixed canvas, then the K chosen canvases for each K of `num_canvases`.

  Raises:
    ValueError: the single canvas does not hold some resized size (named).
  """
  try:
    layouts = [make_layout(f"single {single_hw[0]}x{single_hw[1]}", [single_hw], sizes,
                           counts)]
  except ValueError as e:
    raise ValueError(f"--mix_single {single_hw[0]}x{single_hw[1]}: {e}") from None
  expanded = np.repeat(sizes, counts, axis=0)
  for k in num_canvases:
    layouts.append(make_layout(f"K={k}", canvases.choose_canvases(expanded, k, multiple),
                               sizes, counts))
  return layouts


def plan_mix(config: ml_collections.ConfigDict, spec: str, num_canvases: list[int],
             single_hw: tuple[int, int], multiple: int) -> MixPlan:
  """Reads the mix `spec` names (`mix_sizes`), resizes it and plans its layouts.

  Raises:
    ValueError / FileNotFoundError: a bad spec, missing data, or a single canvas too small.
  """
  hw, orig_counts, description = mix_sizes(spec, config)
  sizes, counts = resized_mix(hw, orig_counts, config.data.min_size, config.data.max_size)
  return MixPlan(description, sizes, counts,
                 plan_layouts(sizes, counts, single_hw, num_canvases, multiple), multiple)


def canvas_contents(layouts: list[Layout], sizes: np.ndarray, counts: np.ndarray
                    ) -> dict[tuple[int, int], tuple[int, int]]:
  """Each distinct canvas (first-seen order) -> the most frequent size placed on it."""
  weight: dict[tuple[int, int], collections.Counter] = {}
  for layout in layouts:
    index = canvases.assign_canvases(sizes, layout.canvases)
    for i, canvas in enumerate(layout.canvases):
      tally = weight.setdefault(canvas, collections.Counter())
      for size, n in zip(sizes[index == i], counts[index == i]):
        tally[(int(size[0]), int(size[1]))] += int(n)
  return {canvas: tally.most_common(1)[0][0] for canvas, tally in weight.items()}


def exact_flop_sizes(sizes: np.ndarray, counts: np.ndarray, top: int
                     ) -> list[tuple[int, int]]:
  """Content sizes whose FLOPs XLA counts: the `top` most frequent, the fewest and the most
  pixels (`sizes` come most frequent first, so `counts` is not needed)."""
  del counts
  pixels = sizes[:, 0] * sizes[:, 1]
  picks = list(range(min(top, len(sizes)))) + [int(np.argmin(pixels)), int(np.argmax(pixels))]
  return list(dict.fromkeys((int(sizes[i, 0]), int(sizes[i, 1])) for i in picks))


def pixel_line(known: dict[tuple[int, int], float], sizes: np.ndarray
               ) -> tuple[np.ndarray, float]:
  """Values at `sizes`: the known ones exactly, the others on a line in the pixel count.

  The line is the least-squares a + b * pixels through the known sizes (proportional to the
  pixels when they all have the same pixel count).

  Returns:
    (values float64 [V], largest relative deviation of a known value from the line).

  Raises:
    ValueError: nothing is known.
  """
  if not known:
    raise ValueError("no known values to fit")
  px = np.asarray([h * w for h, w in known], np.float64)
  y = np.asarray(list(known.values()), np.float64)
  if len(np.unique(px)) >= 2:
    b, a = np.polyfit(px, y, 1)
  else:
    a, b = 0.0, float(np.mean(y / px))
  line = lambda p: a + b * p
  residual = float(np.max(np.abs(line(px) - y) / y))
  values = np.asarray([known.get((int(h), int(w)), line(float(h * w))) for h, w in sizes])
  return values, residual


def mix_mean(values: np.ndarray, counts: np.ndarray, mask: np.ndarray | None = None) -> float:
  """The count-weighted mean of per-size values (over `mask` when given)."""
  weights = counts if mask is None else counts * mask
  return float((values * weights).sum() / weights.sum())


def layout_per_image(layout: Layout, canvas_seconds: dict[tuple[int, int], float]) -> float:
  """Per-image seconds over the mix: sum over canvases of share x seconds per image there."""
  return sum(share * canvas_seconds[canvas]
             for canvas, share in zip(layout.canvases, layout.shares) if share > 0)
