"""Resize, flip and pad decoded images on the device, as the host path does with Pillow.

The host pipeline (`frcnn_jax.data.transforms`) resizes each image with Pillow's bilinear
filter (antialiased when shrinking), mirrors it when flipped and pads it into the training
canvas. `resize_flip_pad` does the same for a batch on the device, so that the host only
decodes: each decoded image is shipped at the top-left of a fixed zero *source* canvas (e.g.
500 x 500 for VOC) with its true size, plus its resized size and flip flag (computed on the
host from the sizes alone: `transforms.fit_scale` and `transforms.scaled_hw`).

Pillow's resampling (libImaging/Resample.c, 8-bit images), reproduced exactly: per axis,
output pixel i of an input of n pixels resized to m samples the input around centre
c = (i + 0.5) * n / m with a triangle of half-width s = max(n / m, 1) (antialiasing when
shrinking): w_ij = max(0, 1 - |j + 0.5 - c| / s) for 0 <= j < n, normalised to sum 1, then
rounded to 22-bit fixed point; a pass sums pixel * weight in integers and rounds half up to
uint8. The horizontal pass runs first, its uint8 result feeds the vertical pass. Here the
weights come from integer arithmetic (the distance is ((2j + 1) m - (2i + 1) n) / (2 max(n, m)))
and each pass is two float32 matrix products with [canvas, source] matrices (the fixed-point
weights' high and low 11 bits: every partial sum is an integer below 2^24, so exact), built
from the traced sizes (static shapes; tensor-core / MXU friendly). Rows past the resized size
are zero: the padding. Exact for shrink factors up to 16 (at most 32 nonzero weights per row).

Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels
as the width (H - h > 2 (W - w), python-pillow/Pillow#9549); there the two orders' uint8
intermediates differ, and pixels may differ from Pillow's by one step. Earlier Pillow versions
always go horizontal first.

Flipping mirrors the resized image within its own width (as `transforms.hflip` after
`transforms.resize`): the horizontal weight matrix's first w rows are reversed.
"""

import functools

import jax
import jax.numpy as jnp

Array = jnp.ndarray


PRECISION_BITS = 22      # Pillow's fixed-point weights (32 - 8 - 2 bits)
_SPLIT = 11              # weights are applied as high * 2^11 + low, each below 2^11


def resize_weights(in_size: Array, out_size: Array, in_canvas: int, out_canvas: int) -> Array:
  """Pillow's bilinear (antialiased) resampling weights of one axis, in fixed point.

  Args:
    in_size: int scalar n, the true input length (<= in_canvas).
    out_size: int scalar m, the resized length (<= out_canvas).
    in_canvas: static input length N.
    out_canvas: static output length M.

  Returns:
    int32 [M, N]: round(w_ij * 2^22) (half up) for output pixels i < m and input pixels j < n,
    each row summing to about 2^22; zero elsewhere. Divide by 2^22 for the real weights.
  """
  n = jnp.asarray(in_size, jnp.int32)
  m = jnp.maximum(jnp.asarray(out_size, jnp.int32), 1)
  i = 2 * jnp.arange(out_canvas, dtype=jnp.int32)[:, None] + 1
  j = 2 * jnp.arange(in_canvas, dtype=jnp.int32)[None, :] + 1
  d = 2 * jnp.maximum(n, m)
  # Triangle value times d, an integer: 1 - |j + 0.5 - c| / s = (d - |(2j+1) m - (2i+1) n|) / d.
  a = jnp.maximum(0, d - jnp.abs(j * m - i * n))
  a = jnp.where((j < 2 * n) & (i < 2 * jnp.asarray(out_size, jnp.int32)), a, 0)
  total = jnp.maximum(a.sum(axis=1, keepdims=True), 1)
  # round(a * 2^22 / total) in int32, in two steps of 2^11 (a * 2^22 would overflow).
  t = a << _SPLIT
  q1, r1 = t // total, t % total
  t = r1 << _SPLIT
  q2, r2 = t // total, t % total
  return (q1 << _SPLIT) + q2 + (2 * r2 >= total).astype(jnp.int32)


def _resample(weights: Array, x: Array, spec: str) -> Array:
  """One pass: uint8-valued float32 x, int32 fixed-point weights -> uint8-valued float32."""
  hi = jax.lax.Precision.HIGHEST
  high = jnp.einsum(spec, (weights >> _SPLIT).astype(jnp.float32), x, precision=hi)
  low = jnp.einsum(spec, (weights & ((1 << _SPLIT) - 1)).astype(jnp.float32), x, precision=hi)
  total = ((high.astype(jnp.int32) << _SPLIT) + low.astype(jnp.int32)
           + (1 << (PRECISION_BITS - 1)))
  return jnp.clip(total >> PRECISION_BITS, 0, 255).astype(jnp.float32)


def resize_flip_pad_image(image: Array, source_hw: Array, target_hw: Array, flip: Array,
                          canvas_hw: tuple[int, int]) -> Array:
  """One image: resize (Pillow bilinear), mirror when `flip`, pad into the canvas.

  Args:
    image: uint8 [Hs, Ws, C], the decoded image at the top-left of a zero source canvas.
    source_hw: int32 [2], its true (height, width) (at most (Hs, Ws)).
    target_hw: int32 [2], the resized (height, width) (at most `canvas_hw`).
    flip: bool scalar, mirror left-right after resizing.
    canvas_hw: static (Hc, Wc) training canvas.

  Returns:
    uint8 [Hc, Wc, C]: the resized (and mirrored) image at the top-left, zeros elsewhere.
  """
  hs, ws = image.shape[:2]
  hc, wc = canvas_hw
  wy = resize_weights(source_hw[0], target_hw[0], hs, hc)
  wx = resize_weights(source_hw[1], target_hw[1], ws, wc)
  rows = jnp.arange(wc)
  mirrored = jnp.where(flip & (rows < target_hw[1]), target_hw[1] - 1 - rows, rows)
  wx = wx[mirrored]
  x = _resample(wx, image.astype(jnp.float32), "xj,ijc->ixc")   # horizontal pass first
  x = _resample(wy, x, "yi,ixc->yxc")
  return x.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames="canvas_hw")
def resize_flip_pad(images: Array, source_hw: Array, target_hw: Array, flip: Array,
                    canvas_hw: tuple[int, int]) -> Array:
  """A batch of `resize_flip_pad_image`: uint8 [B, Hs, Ws, C] -> uint8 [B, Hc, Wc, C].

  Args:
    images: uint8 [B, Hs, Ws, C] decoded images on zero source canvases.
    source_hw: int32 [B, 2] true sizes.
    target_hw: int32 [B, 2] resized sizes (each at most `canvas_hw`).
    flip: bool [B].
    canvas_hw: static (Hc, Wc), a tuple.

  Returns:
    uint8 [B, Hc, Wc, C].
  """
  fn = lambda i, s, t, f: resize_flip_pad_image(i, s, t, f, canvas_hw)
  return jax.vmap(fn)(images, jnp.asarray(source_hw, jnp.int32),
                      jnp.asarray(target_hw, jnp.int32), jnp.asarray(flip, bool))


# The Batch fields that replace "image" when the device resizes (`data.resize_on`): the decoded
# image on its source canvas, its true size, the flip flag, and a zero-byte array whose shape
# carries the static training canvas.
SOURCE_KEYS = ("source_image", "source_hw", "flip", "canvas")


def canvas_hw(batch: dict[str, Array]) -> tuple[int, int]:
  """The static (Hc, Wc) canvas of a Batch, whichever image fields it carries."""
  return tuple(batch["image"].shape[1:3]) if "image" in batch else tuple(
      batch["canvas"].shape[1:3])


def batch_images(batch: dict[str, Array]) -> Array:
  """The uint8 [B, Hc, Wc, 3] canvases of a Batch.

  A Batch carries either "image" (resized, flipped and padded on the host) or the
  `SOURCE_KEYS` fields: "source_image" uint8 [B, Hs, Ws, 3], "source_hw" int32 [B, 2], "flip"
  bool [B] and "canvas" uint8 [B, Hc, Wc, 0]; then the images are made here with
  `resize_flip_pad` to the Batch's "image_hw" (the resized size).
  """
  if "image" in batch:
    return batch["image"]
  with jax.named_scope("input_resize"):   # a stage of frcnn_jax/benchmarking/hlo.py
    return resize_flip_pad(batch["source_image"], batch["source_hw"], batch["image_hw"],
                           batch["flip"], canvas_hw(batch))


def input_keys(batch: dict[str, Array]) -> tuple[str, ...]:
  """The Batch fields inference reads: the image fields (either kind), "image_hw", "scale"."""
  return (("image",) if "image" in batch else SOURCE_KEYS) + ("image_hw", "scale")
