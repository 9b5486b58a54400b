"""Tests for frcnn_jax/data/images.py: every stored mode -> uint8 RGB, bad files -> one error."""

import io

import numpy as np
import pytest
from PIL import Image

from frcnn_jax.data import images


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _rgb(h=6, w=5, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_rgb_exact():
  rgb = _rgb()
  out = images.decode_image(_encode(Image.fromarray(rgb), "PNG"))
  assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
  np.testing.assert_array_equal(out, rgb)


def test_jpeg_matches_pillow():
  data = _encode(Image.fromarray(_rgb(16, 24)), "JPEG")
  np.testing.assert_array_equal(images.decode_image(data),
                                np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_replicated(fmt):
  gray = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
  data = _encode(Image.fromarray(gray, "L"), fmt)
  out = images.decode_image(data)
  assert out.shape == (6, 5, 3)
  stored = np.asarray(Image.open(io.BytesIO(data)))
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], stored)
  if fmt == "PNG":
    np.testing.assert_array_equal(out[..., 0], gray)


def test_rgba_drops_alpha():
  rgba = np.concatenate([_rgb(), np.full((6, 5, 1), 7, np.uint8)], axis=2)
  out = images.decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
  np.testing.assert_array_equal(out, rgba[..., :3])


def test_palette_and_la():
  pal = Image.fromarray(_rgb()).convert("P")
  np.testing.assert_array_equal(images.decode_image(_encode(pal, "PNG")),
                                np.asarray(pal.convert("RGB")))
  la = Image.fromarray(np.full((4, 4, 2), 200, np.uint8), "LA")
  np.testing.assert_array_equal(images.decode_image(_encode(la, "PNG")),
                                np.full((4, 4, 3), 200, np.uint8))


def test_cmyk_jpeg_colours():
  red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
  white = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
  data = _encode(red, "JPEG", quality=95)
  assert Image.open(io.BytesIO(data)).mode == "CMYK"
  out = images.decode_image(data).astype(int)
  assert out.shape == (8, 8, 3)
  np.testing.assert_allclose(out.mean(axis=(0, 1)), [255, 0, 0], atol=3)
  np.testing.assert_allclose(images.decode_image(_encode(white, "JPEG")).mean(axis=(0, 1)),
                             [255, 255, 255], atol=3)


def test_sixteen_bit_gray_scaled():
  values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
  data = _encode(Image.fromarray(values), "PNG")
  assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
  out = images.decode_image(data)
  np.testing.assert_array_equal(out[..., 1], (values >> 8).astype(np.uint8))


def test_exif_orientation_not_applied():
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees on display
  data = _encode(Image.fromarray(_rgb(10, 20)), "JPEG", exif=exif.tobytes())
  assert images.decode_image(data).shape == (10, 20, 3)


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_jpeg_raises(cut):
  data = _encode(Image.fromarray(_rgb(32, 32)), "JPEG")
  with pytest.raises(images.ImageDecodeError, match="bad.jpg: cannot decode"):
    images.decode_image(data[:int(len(data) * cut)], "bad.jpg")


@pytest.mark.parametrize("data", [b"", b"not an image at all" * 5])
def test_garbage_raises_value_error(data):
  with pytest.raises(ValueError, match="x.png"):
    images.decode_image(data, "x.png")


def test_unsupported_mode_raises():
  data = _encode(Image.fromarray(np.ones((3, 3), np.float32), "F"), "TIFF")
  with pytest.raises(images.ImageDecodeError, match="unsupported image mode 'F'"):
    images.decode_image(data, "f.tif")


def test_read_image_and_size(tmp_path):
  path = tmp_path / "a.png"
  path.write_bytes(_encode(Image.fromarray(_rgb(7, 9)), "PNG"))
  assert images.read_image(path).shape == (7, 9, 3)
  assert images.image_size(path) == (7, 9)
  with pytest.raises(images.ImageDecodeError, match="missing.jpg: cannot read file"):
    images.read_image(tmp_path / "missing.jpg")
  (tmp_path / "junk.jpg").write_bytes(b"junk")
  with pytest.raises(images.ImageDecodeError, match="junk.jpg"):
    images.image_size(tmp_path / "junk.jpg")
