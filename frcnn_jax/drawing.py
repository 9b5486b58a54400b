"""Drawing boxes with labelled scores on images (Pillow), for `detect` and scripts/visualize.py."""

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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

  Args:
    image: uint8 [H, W, 3] RGB array or a Pillow image (converted to RGB).
    boxes: [N, 4] xyxy boxes in the image's pixels (continuous coordinates).
    labels: [N] int class labels (1..C), or None for uncaptioned boxes.
    scores: [N] scores shown after the name, or None.
    class_names: C names; label c is class_names[c - 1]. Without it the number is shown.
    colour: one RGB colour for every box; default: a colour per label.
    width: line width in pixels. Captions scale with the image (8 to 18 px).
    dashed: draw dashed outlines (e.g. ground truth next to detections).

  Returns:
    A new RGB Pillow image.
  """
  if isinstance(image, Image.Image):
    canvas = image.convert("RGB")
  else:
    canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=int(np.clip(round(min(canvas.size) / 32), 8, 18)))
  for k, (x1, y1, x2, y2) in enumerate(boxes):
    label = None if labels is None else int(labels[k])
    fill = colour or (class_colour(label) if label is not None else (255, 64, 64))
    # A continuous box [x1, x2) covers pixels x1 .. x2 - 1: draw the outline on those.
    rect = (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))
    if dashed:
      _dashed_rectangle(draw, rect, fill, width)
    else:
      draw.rectangle(rect, outline=fill, width=width)
    if label is None:
      continue
    text = class_names[label - 1] if class_names is not None else str(label)
    if scores is not None:
      text = f"{text} {float(scores[k]):.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    ty = y1 - th if y1 - th >= 0 else y1
    draw.rectangle((x1, ty, x1 + tw, ty + th), fill=fill)
    draw.text((x1 + 2 - left, ty + 2 - top), text, fill=(0, 0, 0), font=font)
  return canvas


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
