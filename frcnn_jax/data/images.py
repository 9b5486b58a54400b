"""Image decoding with Pillow: any stored image -> uint8 [H, W, 3] RGB.

Grayscale, palette, RGBA/LA (alpha dropped), CMYK, YCbCr and 16-bit grayscale images are
converted to RGB. EXIF orientation is deliberately NOT applied: VOC and COCO boxes refer to the
stored pixel grid. Corrupt, truncated or unreadable files raise `ImageDecodeError`, a ValueError
naming the file, so that readers can apply their bad-input policy to exactly this failure.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image

# Modes Pillow converts to RGB directly; alpha channels are dropped, not composited.
_DIRECT_MODES = frozenset({"1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK",
                           "YCbCr"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(ValueError):
  """An image that cannot be decoded: corrupt, truncated, missing or of an unsupported mode."""


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
  """Converts a loaded Pillow image to uint8 [H, W, 3] RGB."""
  if image.mode in _DIRECT_MODES:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  if image.mode in _SIXTEEN_BIT_MODES:
    gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  raise ImageDecodeError(f"{name}: unsupported image mode {image.mode!r}")


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ... anything Pillow reads) to RGB.

  Args:
    data: the encoded file content.
    name: the file name used in error messages.

  Returns:
    image: uint8 [H, W, 3] RGB.

  Raises:
    ImageDecodeError: the bytes are not a readable image (corrupt, truncated, empty).
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = _to_rgb(image, name)
  except ImageDecodeError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(f"{name}: cannot decode image ({e})") from e
  if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
    raise ImageDecodeError(f"{name}: decoded to an empty image of shape {rgb.shape}")
  return rgb


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads and decodes an image file to uint8 [H, W, 3] RGB.

  Raises:
    ImageDecodeError: the file is missing, unreadable, corrupt or truncated.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ImageDecodeError(f"{os.fspath(path)}: cannot read file ({e})") from e
  return decode_image(data, os.fspath(path))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
  """Returns (height, width) of an image file from its header only (no pixel decoding).

  Raises:
    ImageDecodeError: the file is missing or its header is not a readable image.
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageDecodeError(f"{os.fspath(path)}: cannot read image header ({e})") from e
  return height, width
