"""Captioned image grids (samples.png) for looking at what a model draws."""

from __future__ import annotations

from collections.abc import Sequence
import textwrap

from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_grid(path: str, images: Sequence[np.ndarray], captions: Sequence[str],
              *, columns: int = 6, scale: int = 2) -> None:
  """Writes uint8 HWC `images` in a grid, each with its wrapped caption."""
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  if not images:
    raise ValueError("save_grid needs at least one image")
  h, w = images[0].shape[:2]
  cell_w = max(w * scale, 128)
  font = ImageFont.load_default()
  chars = max(cell_w // 6, 10)
  wrapped = [textwrap.wrap(c, chars)[:4] for c in captions]
  text_h = 12 * max(len(t) for t in wrapped) + 4
  cell_h = h * scale + text_h
  rows = -(-len(images) // columns)
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (img, lines) in enumerate(zip(images, wrapped)):
    r, c = divmod(i, columns)
    x0, y0 = c * cell_w, r * cell_h
    tile = Image.fromarray(np.asarray(img, np.uint8)).resize(
        (w * scale, h * scale), Image.NEAREST)
    canvas.paste(tile, (x0 + (cell_w - w * scale) // 2, y0))
    for j, line in enumerate(lines):
      draw.text((x0 + 2, y0 + h * scale + 2 + 12 * j), line, fill=(0, 0, 0),
                font=font)
  with epath.Path(path).open("wb") as f:
    canvas.save(f, format="PNG")
