"""Drawing boxes on images (Pillow), for `detect` and scripts/visualize.py: captioned boxes
(captions kept inside the image and apart from each other), score-coloured boxes with a colour
bar, legends, pictures side by side, and the enlargement of small images for readable
captions."""

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont


def class_colour(label: int) -> tuple[int, int, int]:
  """A stable, well-separated RGB colour per class label (golden-ratio hue steps)."""
  hue = (0.61803398875 * int(label)) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return int(r * 255), int(g * 255), int(b * 255)


def draw_boxes(image: np.ndarray | Image.Image, boxes: np.ndarray,
               labels: np.ndarray | None = None, scores: np.ndarray | None = None,
               class_names: Sequence[str] | None = None, *,
               colour: tuple[int, int, int] | None = None, width: int = 2,
               dashed: bool = False) -> Image.Image:
  """Draws boxes, each captioned "name score", on a copy of an image.

  Outlines are drawn first, then the captions on top, placed by `place_captions` so that they
  do not overlap one another where the image has room (the best-scoring box gets the first
  choice of spot).

  Args:
    image: uint8 [H, W, 3] RGB array or a Pillow image (converted to RGB).
    boxes: [N, 4] xyxy boxes in the image's pixels (continuous coordinates).
    labels: [N] int class labels (1..C), or None for uncaptioned boxes.
    scores: [N] scores shown after the name, or None.
    class_names: C names; label c is class_names[c - 1]. Without it the number is shown.
    colour: one RGB colour for every box; default: a colour per label.
    width: line width in pixels. Captions scale with the image (8 to 18 px; enlarge small
      images first, see `enlarge`, for readable captions).
    dashed: draw dashed outlines (e.g. ground truth next to detections).

  Returns:
    A new RGB Pillow image.
  """
  canvas = _rgb(image)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  draw = ImageDraw.Draw(canvas)
  caption_font = font(int(np.clip(round(min(canvas.size) / 32), 8, 18)))
  fills = []
  for k, (x1, y1, x2, y2) in enumerate(boxes):
    label = None if labels is None else int(labels[k])
    fill = colour or (class_colour(label) if label is not None else (255, 64, 64))
    fills.append(fill)
    # A continuous box [x1, x2) covers pixels x1 .. x2 - 1: draw the outline on those.
    rect = (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))
    if dashed:
      _dashed_rectangle(draw, rect, fill, width)
    else:
      draw.rectangle(rect, outline=fill, width=width)
  if labels is None or not len(boxes):
    return canvas
  texts, sizes, offsets = [], [], []
  for k in range(len(boxes)):
    label = int(labels[k])
    text = class_names[label - 1] if class_names is not None else str(label)
    if scores is not None:
      text = f"{text} {float(scores[k]):.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=caption_font)
    texts.append(text)
    sizes.append((right - left + 4, bottom - top + 4))
    offsets.append((left, top))
  order = (np.argsort(-np.asarray(scores, np.float64), kind="stable") if scores is not None
           else None)
  for k, (tx, ty) in enumerate(place_captions(boxes, sizes, canvas.size, order=order)):
    (tw, th), (left, top) = sizes[k], offsets[k]
    draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=fills[k])
    draw.text((tx + 2 - left, ty + 2 - top), texts[k], fill=(0, 0, 0), font=caption_font)
  return canvas


def place_captions(boxes: np.ndarray, sizes: Sequence[tuple[int, int]],
                   image_size: tuple[int, int], *,
                   order: Sequence[int] | None = None) -> list[tuple[int, int]]:
  """Top-left corners of one caption per box, kept inside the image and apart from each other.

  Captions are placed one after another in `order` (default: as given). Each takes the first
  free one of: its `caption_origin` spot (above the box), just inside the box's top edge, just
  below its bottom edge, just inside its bottom edge; when all are taken, the free spot in the
  same columns nearest to the first choice (below before above on a tie). Only when the whole
  column is taken does it overlap, at its first choice.

  Args:
    boxes: [N, 4] xyxy boxes in pixels.
    sizes: N (width, height) of the captions' backgrounds.
    image_size: (width, height) of the image.
    order: the placing order (earlier captions get their preferred spot).

  Returns:
    N (x, y) integer corners, in the order of `boxes`; caption k covers pixels
    [x, x + width) x [y, y + height).
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  height = int(image_size[1])
  placed: list[tuple[int, int, int, int]] = []
  corners: list[tuple[int, int]] = [(0, 0)] * len(boxes)
  for k in (range(len(boxes)) if order is None else order):
    k = int(k)
    tw, th = int(sizes[k][0]), int(sizes[k][1])
    tx, first = caption_origin(boxes[k], (tw, th), image_size)
    lowest = max(height - th, 0)
    # Values of y at which the caption would overlap one placed before: (y1 - th, y2) each.
    blocked = sorted((py1 - th + 1, py2 - 1) for px1, py1, px2, py2 in placed
                     if px1 < tx + tw and tx < px2)
    free = lambda y, blocked=blocked: not any(lo <= y <= hi for lo, hi in blocked)
    top, bottom = boxes[k, 1], boxes[k, 3]
    options = [first] + [int(round(min(max(y, 0.0), lowest))) for y in (top, bottom, bottom - th)]
    ty = next((y for y in options if free(y)), None)
    if ty is None:
      ty = _nearest_free(first, blocked, lowest)
    corners[k] = (tx, ty)
    placed.append((tx, ty, tx + tw, ty + th))
  return corners


def _nearest_free(y: int, blocked: Sequence[tuple[int, int]], lowest: int) -> int:
  """The value in [0, lowest] nearest to `y` outside every inclusive interval of `blocked`
  (sorted by start); `y` itself when there is none."""
  merged: list[list[int]] = []
  for lo, hi in blocked:
    if merged and lo <= merged[-1][1] + 1:
      merged[-1][1] = max(merged[-1][1], hi)
    else:
      merged.append([lo, hi])
  for lo, hi in merged:
    if lo <= y <= hi:
      below, above = hi + 1, lo - 1
      choices = [c for c in (below, above) if 0 <= c <= lowest]
      return min(choices, key=lambda c: abs(c - y)) if choices else y
  return y


def caption_origin(box: Sequence[float], text_size: tuple[int, int],
                   image_size: tuple[int, int]) -> tuple[int, int]:
  """Top-left corner of a box's caption, kept inside the image.

  Above the box's top-left corner when there is room, else just inside its top edge; shifted
  left at the right edge and up at the bottom edge so the whole caption stays visible.

  Args:
    box: (x1, y1, x2, y2) in pixels.
    text_size: (width, height) of the caption's background.
    image_size: (width, height) of the image.
  """
  x1, y1 = float(box[0]), float(box[1])
  tw, th = text_size
  width, height = image_size
  ty = y1 - th if y1 - th >= 0 else y1
  tx = min(max(x1, 0.0), width - tw)
  ty = min(max(ty, 0.0), height - th)
  return int(round(max(tx, 0.0))), int(round(max(ty, 0.0)))


def display_factor(hw: Sequence[int], min_side: int = 256) -> int:
  """The integer upscaling that makes a small image's captions readable: shorter side >=
  `min_side` (1 for images that large already)."""
  return max(1, -(-int(min_side) // max(1, min(int(v) for v in hw))))


def enlarge(image: np.ndarray | Image.Image, factor: int) -> Image.Image:
  """An RGB copy of `image` enlarged `factor` times (nearest neighbour: pixels stay sharp);
  boxes drawn on it are multiplied by `factor`."""
  picture = _rgb(image)
  if factor == 1:
    return picture
  return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)


def font(size: int) -> ImageFont.ImageFont:
  """Pillow's built-in font at `size` pixels."""
  return ImageFont.load_default(size=int(size))


def score_colour(score: float, low: float, high: float) -> tuple[int, int, int]:
  """A colour ramp for scores in [low, high]: blue (low), cyan, green, yellow, red (high)."""
  t = 0.0 if high <= low else float(np.clip((score - low) / (high - low), 0.0, 1.0))
  stops = np.array([(40, 80, 255), (0, 200, 255), (40, 210, 60), (255, 220, 0), (255, 40, 20)],
                   np.float64)
  position = t * (len(stops) - 1)
  i = min(int(position), len(stops) - 2)
  rgb = stops[i] + (stops[i + 1] - stops[i]) * (position - i)
  return tuple(int(round(v)) for v in rgb)


def draw_scored_boxes(image: np.ndarray | Image.Image, boxes: np.ndarray, scores: np.ndarray,
                      low: float, high: float, width: int = 2) -> Image.Image:
  """Draws uncaptioned boxes coloured by score (`score_colour`), the highest on top."""
  canvas = _rgb(image)
  draw = ImageDraw.Draw(canvas)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  for k in np.argsort(scores, kind="stable"):
    x1, y1, x2, y2 = boxes[k]
    draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)),
                   outline=score_colour(scores[k], low, high), width=width)
  return canvas


def _rgb(image: np.ndarray | Image.Image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  return Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")


def _strip(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
  strip = Image.new("RGB", (width, height), (255, 255, 255))
  return strip, ImageDraw.Draw(strip)


def _below(image: Image.Image, strip: Image.Image) -> Image.Image:
  out = Image.new("RGB", (image.width, image.height + strip.height), (255, 255, 255))
  out.paste(image, (0, 0))
  out.paste(strip, (0, image.height))
  return out


def add_legend(image: Image.Image, entries: Sequence[tuple[tuple[int, int, int], str]],
               title: str = "", size: int = 12) -> Image.Image:
  """Appends a legend below an image: an optional title line, then a colour swatch and a label
  per entry, wrapped into rows that fit the image's width."""
  text_font = font(size)
  pad, swatch = 4, size
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  items = [(colour, label, probe.textlength(label, font=text_font) + swatch + 3 * pad)
           for colour, label in entries]
  rows, row, used = [], [], pad
  for item in items:
    if row and used + item[2] > image.width:
      rows.append(row)
      row, used = [], pad
    row.append(item)
    used += item[2]
  if row:
    rows.append(row)
  line = size + 2 * pad
  title_lines = wrap(title, text_font, image.width - 2 * pad) if title else []
  strip, draw = _strip(image.width, line * (len(rows) + len(title_lines)) + pad)
  y = pad
  for text in title_lines:
    draw.text((pad, y), text, fill=(0, 0, 0), font=text_font)
    y += line
  for row in rows:
    x = pad
    for colour, label, item_width in row:
      draw.rectangle((x, y, x + swatch, y + swatch), fill=colour, outline=(0, 0, 0))
      draw.text((x + swatch + pad, y), label, fill=(0, 0, 0), font=text_font)
      x += item_width
    y += line
  return _below(image, strip)


def add_colour_bar(image: Image.Image, low: float, high: float, title: str,
                   size: int = 12) -> Image.Image:
  """Appends the `score_colour` ramp from `low` to `high` below an image, with a title."""
  text_font = font(size)
  pad = 4
  title_lines = wrap(title, text_font, image.width - 2 * pad)
  line = size + 2 * pad
  strip, draw = _strip(image.width, line * len(title_lines) + size + 3 * pad)
  for i, text in enumerate(title_lines):
    draw.text((pad, pad + i * line), text, fill=(0, 0, 0), font=text_font)
  low_text, high_text = f"{low:.3f}", f"{high:.3f}"
  left = pad + int(draw.textlength(low_text, font=text_font)) + pad
  right = image.width - pad - int(draw.textlength(high_text, font=text_font)) - pad
  top = pad + line * len(title_lines)
  for x in range(left, max(right, left + 1)):
    t = (x - left) / max(right - left - 1, 1)
    draw.line((x, top, x, top + size), fill=score_colour(low + t * (high - low), low, high))
  draw.text((pad, top), low_text, fill=(0, 0, 0), font=text_font)
  draw.text((right + pad, top), high_text, fill=(0, 0, 0), font=text_font)
  return _below(image, strip)


def wrap(text: str, text_font: ImageFont.ImageFont, width: float) -> list[str]:
  """Splits `text` into lines no wider than `width` pixels (at word boundaries)."""
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  lines, current = [], ""
  for word in text.split():
    candidate = f"{current} {word}".strip()
    if current and probe.textlength(candidate, font=text_font) > width:
      lines.append(current)
      current = word
    else:
      current = candidate
  return lines + ([current] if current else [])


def side_by_side(images: Sequence[Image.Image], titles: Sequence[str],
                 size: int = 14) -> Image.Image:
  """Places images left to right, each under its title, on one white canvas."""
  text_font = font(size)
  gap, title_height = 8, size + 8
  width = sum(im.width for im in images) + gap * (len(images) - 1)
  height = max(im.height for im in images) + title_height
  out = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  x = 0
  for im, title in zip(images, titles):
    draw.text((x + 2, 3), title, fill=(0, 0, 0), font=text_font)
    out.paste(im, (x, title_height))
    x += im.width + gap
  return out


def _dashed_rectangle(draw: ImageDraw.ImageDraw, rect: tuple[float, float, float, float],
                      fill: tuple[int, int, int], width: int, dash: float = 6.0) -> None:
  x1, y1, x2, y2 = rect
  for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)),
               ((x1, y2), (x1, y1))):
    length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
    steps = max(int(length // (2 * dash)), 1)
    for s in range(steps + 1):
      t0 = min(2 * s * dash / max(length, 1e-9), 1.0)
      t1 = min((2 * s + 1) * dash / max(length, 1e-9), 1.0)
      if t0 >= 1.0 and s > 0:
        break
      draw.line((a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0,
                 a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1), fill=fill, width=width)
