"""Synthetic shapes: a deterministic procedural detection dataset (no files needed).

Each image is generated from `(seed, split, index)` alone, so `source[i]` is the same image every
time, in every process. An image holds 1..`max_objects` filled shapes of six classes
(`CLASSES`) of random colour, size (log-uniform between `min_object` and `max_object` of the
shorter image side, so small to large) and aspect ratio (triangle, diamond and cross; circle,
square and star keep 1:1), on a textured background: a two-colour gradient plus low-frequency
colour blobs, with Gaussian pixel noise over the whole image.

Shapes are drawn in order and later shapes occlude earlier ones. Occlusion rule: a placement is
rejected (and retried up to `_PLACEMENT_TRIES` times, then the object is left out) if it would
leave any earlier object with less than `min_visible` of its drawn area visible. So every object
is at least half visible by default and no object is flagged difficult.

Boxes are computed from the rendered ownership map (which object each pixel shows), never from
the parametric description, so they are exactly tight around the visible pixels of each object
in the box convention of docs/conventions.md: `x1` = first pixel column, `x2` = last pixel
column + 1.

Rendering is Python and NumPy work, a sizeable share of a core at the shapes training rate
(benchmarks/RESULTS.md, "Shapes training rate"); with `cache_bytes` the source keeps the
examples it rendered (each process its own cache, never pickled), so every later epoch reads
them back instead.
"""

import dataclasses
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw

from frcnn_jax.config.fields import setting
from frcnn_jax.data.sources import base

CLASSES = ("circle", "square", "triangle", "diamond", "star", "cross")
_SPLITS = {"train": 0, "test": 1}
_SQUARE_ONLY = ("circle", "square", "star")
_PLACEMENT_TRIES = 20
_MIN_CONTRAST = 150  # L1 distance (0..765) between an object colour and the background mean.


def _shape_polygon(cls: str, w: float, h: float, rng: np.random.Generator) -> list[tuple]:
  """Returns the outline of a polygonal shape in a [0, w] x [0, h] local frame."""
  if cls == "square":
    return [(0, 0), (w, 0), (w, h), (0, h)]
  if cls == "triangle":
    if rng.random() < 0.5:
      return [(w / 2, 0), (w, h), (0, h)]
    return [(0, 0), (w, 0), (w / 2, h)]
  if cls == "diamond":
    return [(w / 2, 0), (w, h / 2), (w / 2, h), (0, h / 2)]
  if cls == "star":
    angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * rng.uniform(0.38, 0.5))
    return list(zip(w / 2 + w * radius * np.cos(angles), h / 2 + h * radius * np.sin(angles)))
  if cls == "cross":
    tx, ty = w * rng.uniform(0.25, 0.42), h * rng.uniform(0.25, 0.42)
    x0, x1, y0, y1 = (w - tx) / 2, (w + tx) / 2, (h - ty) / 2, (h + ty) / 2
    return [(x0, 0), (x1, 0), (x1, y0), (w, y0), (w, y1), (x1, y1), (x1, h), (x0, h),
            (x0, y1), (0, y1), (0, y0), (x0, y0)]
  raise ValueError(f"unknown shape class {cls!r}")


def _shape_mask(cls: str, w: float, h: float, rng: np.random.Generator) -> np.ndarray:
  """Rasterises one shape (no anti-aliasing) into a bool mask [ceil(h), ceil(w)]."""
  canvas = Image.new("L", (int(np.ceil(w)), int(np.ceil(h))), 0)
  draw = ImageDraw.Draw(canvas)
  if cls == "circle":
    draw.ellipse((0, 0, w - 1, h - 1), fill=255)
  else:
    draw.polygon(_shape_polygon(cls, w - 1, h - 1, rng), fill=255)
  return np.asarray(canvas) > 0


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """A textured background [h, w, 3] float32: gradient plus low-frequency colour blobs."""
  c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  grad = c0 + (c1 - c0) * t[..., None] * rng.uniform(0.2, 0.8)
  cells = rng.integers(3, 9)
  blobs = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
  blobs = np.stack([np.asarray(Image.fromarray(blobs[..., c], mode="F").resize(
      (w, h), Image.BICUBIC)) for c in range(3)], axis=-1)
  return grad + blobs * rng.uniform(10, 45)


def _object_colour(bg_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random colour [3] that stands out from the background mean colour."""
  for _ in range(50):
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
    if np.abs(colour - bg_mean).sum() >= _MIN_CONTRAST:
      return colour
  return np.where(bg_mean > 127, 0.0, 255.0).astype(np.float32)


class ShapesSource:
  """Random-access synthetic detection dataset (`len(s)`, `s[i]`, `s.annotation(i)`).

  Attributes:
    classes: the class names; label c (1..C) is `classes[c - 1]`.
    name: `shapes_<split>`.
  """

  classes = CLASSES

  def __init__(self, num_images: int, *, split: str = "train", image_size: int | tuple[int, int]
               = 128, seed: int = 0, max_objects: int = 6, min_object: float = 0.08,
               max_object: float = 0.6, min_visible: float = 0.5, noise_std: float = 8.0,
               texture: bool = True, cache_bytes: int = 0):
    """Configures the dataset.

    Args:
      num_images: number of images in this split.
      split: `train` or `test`; the two draw from disjoint random streams.
      image_size: image side, or (height, width).
      seed: dataset seed; with the split and the index it determines each image.
      max_objects: each image holds 1..max_objects shapes (fewer when a placement keeps failing
        the occlusion rule).
      min_object: smallest object size (geometric mean of the sides), fraction of the shorter
        image side.
      max_object: largest object size, fraction of the shorter image side.
      min_visible: an object must keep at least this fraction of its drawn area visible.
      noise_std: standard deviation of the Gaussian pixel noise (0 disables).
      texture: textured background (gradient and blobs); False gives a flat grey background.
      cache_bytes: keep rendered examples (`self[i]`) up to this many bytes of images; 0: no
        cache. Returned examples are copies, so callers may modify them.
    """
    if split not in _SPLITS:
      raise ValueError(f"shapes split must be one of {tuple(_SPLITS)}, got {split!r}")
    if num_images <= 0 or max_objects <= 0:
      raise ValueError(f"shapes num_images and max_objects must be positive, got {num_images}, "
                       f"{max_objects}")
    if not 0 < min_object <= max_object <= 0.9:
      raise ValueError(f"shapes object sizes need 0 < min_object <= max_object <= 0.9, got "
                       f"{min_object}, {max_object}")
    self.num_images = num_images
    self.split = split
    self.hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    self.seed = seed
    self.max_objects = max_objects
    self.min_object = min_object
    self.max_object = max_object
    self.min_visible = min_visible
    self.noise_std = noise_std
    self.texture = texture
    self.name = f"shapes_{split}"
    self.cache_bytes = cache_bytes
    self._cache_images = cache_bytes // (self.hw[0] * self.hw[1] * 3)
    self._cache: dict[int, dict[str, Any]] = {}

  def __len__(self) -> int:
    return self.num_images

  def __repr__(self) -> str:
    return (f"ShapesSource(num_images={self.num_images}, split={self.split!r}, hw={self.hw}, "
            f"seed={self.seed}, max_objects={self.max_objects}, min_object={self.min_object}, "
            f"max_object={self.max_object}, min_visible={self.min_visible}, "
            f"noise_std={self.noise_std}, texture={self.texture})")

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._cache.get(index)
    if example is None:
      example = self.render(index)[0]
      if len(self._cache) < self._cache_images:
        self._cache[index] = example
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in example.items()}

  def __getstate__(self) -> dict[str, Any]:
    """Pickles the configuration only: each process fills its own cache."""
    return {**self.__dict__, "_cache": {}}

  def annotation(self, index: int) -> dict[str, Any]:
    """The annotation fields of `self[index]` (base.ANNOTATION_KEYS).

    The boxes come from the rendered pixels, so this renders the image (deterministically:
    the same boxes as `self[index]`, in every process).
    """
    example = self[index]
    return {k: example[k] for k in base.ANNOTATION_KEYS}

  def _place(self, rng: np.random.Generator) -> tuple[int, np.ndarray, int, int]:
    """Draws a random shape: label (1..C), local mask [h, w], top-left (y, x)."""
    img_h, img_w = self.hw
    label = int(rng.integers(len(CLASSES))) + 1
    cls = CLASSES[label - 1]
    side = min(img_h, img_w) * np.exp(rng.uniform(np.log(self.min_object),
                                                   np.log(self.max_object)))
    ratio = 1.0 if cls in _SQUARE_ONLY else np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    w = float(np.clip(side * np.sqrt(ratio), 4, img_w - 1))
    h = float(np.clip(side / np.sqrt(ratio), 4, img_h - 1))
    mask = _shape_mask(cls, w, h, rng)
    y = int(rng.integers(0, img_h - mask.shape[0] + 1))
    x = int(rng.integers(0, img_w - mask.shape[1] + 1))
    return label, mask, y, x

  def render(self, index: int) -> tuple[dict[str, Any], np.ndarray]:
    """Generates image `index`.

    Args:
      index: image index in [0, len(self)).

    Returns:
      The Example dict and the visible masks [N, H, W] bool of its N objects (the pixels that
      show each object; disjoint).
    """
    if not 0 <= index < self.num_images:
      raise IndexError(f"shapes index {index} out of range [0, {self.num_images})")
    rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
    img_h, img_w = self.hw
    if self.texture:
      bg = _background(img_h, img_w, rng)
    else:
      bg = np.full((img_h, img_w, 3), 127.0, np.float32)
    bg_mean = bg.reshape(-1, 3).mean(0)
    owner = np.full((img_h, img_w), -1, np.int32)
    labels, areas, visible, regions = [], [], [], []
    for _ in range(int(rng.integers(1, self.max_objects + 1))):
      for _ in range(_PLACEMENT_TRIES):
        label, mask, y, x = self._place(rng)
        window = owner[y:y + mask.shape[0], x:x + mask.shape[1]]
        covered = np.bincount(window[mask] + 1, minlength=len(labels) + 1)[1:]
        remaining = np.asarray(visible, np.int64) - covered
        if np.all(remaining >= self.min_visible * np.asarray(areas)):
          break
      else:
        continue
      k = len(labels)
      window[mask] = k
      visible = list(remaining) + [int(mask.sum())]
      areas.append(int(mask.sum()))
      labels.append(label)
      regions.append((y, x, mask.shape[0], mask.shape[1]))

    colours = np.stack([_object_colour(bg_mean, rng) for _ in labels])
    image = np.where(owner[..., None] >= 0, colours[owner], bg)
    if self.noise_std > 0:
      image = image + rng.normal(0, self.noise_std, size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    boxes = np.zeros((len(labels), 4), np.float32)
    masks = np.zeros((len(labels), img_h, img_w), bool)
    for k, (y, x, h, w) in enumerate(regions):
      local = owner[y:y + h, x:x + w] == k
      rows, cols = np.flatnonzero(local.any(1)), np.flatnonzero(local.any(0))
      boxes[k] = (x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1)
      masks[k, y:y + h, x:x + w] = local
    ann = base.annotation(boxes, labels, np.zeros(len(labels), bool),
                             f"{self.name}_{index:06d}", self.hw)
    example = base.example(image, ann, index)
    return example, masks


@base.SOURCES.register("shapes")
@dataclasses.dataclass(frozen=True)
class Shapes:
  """`data.shapes`: the built-in synthetic dataset (`ShapesSource`), drawn from `seed`."""
  num_train: int = setting(512, "images of the train split", role="training", minimum=1)
  num_test: int = setting(128, "images of the test split", role="test", minimum=1)
  image_size: int = setting(128, "side of the square images", minimum=1)
  cache_mb: float = setting(512.0, "rendered images kept per process (0: render every time)",
                            role="local", minimum=0)
  always_has_objects = True   # 1..max_objects shapes per image

  def make(self, split: str, *, bad_input: str, seed: int) -> ShapesSource:
    del bad_input   # rendered images are never bad
    return ShapesSource(self.num_train if split == "train" else self.num_test,
                        split="train" if split == "train" else "test",
                        image_size=self.image_size, seed=seed,
                        cache_bytes=int(self.cache_mb * 2**20))

  def class_names(self) -> tuple[str, ...]:
    return CLASSES
