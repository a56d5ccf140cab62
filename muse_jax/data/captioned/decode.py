"""Raw bytes -> RGB image and clean caption, or a named reason to skip.

Web-scale caption datasets (img2dataset shards of CC3M, CC12M, LAION) hold
every kind of image a browser accepts: grayscale, palette, CMYK, alpha,
16-bit, EXIF-rotated, truncated downloads. A pipeline that stops at the
first odd file wastes a pod-day; one that drops records silently biases
the data. So every decoder here either converts (`decode_image`: any PIL
mode to uint8 RGB, alpha composited on white, 16-bit scaled down, EXIF
orientation applied) or raises `Skip` with one of `REASONS`, which the
readers count (`captioned.Tally`) and never let escape.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

# Why a record was skipped; `Tally` counts each.
REASONS = (
    "corrupt_image",        # Not decodable (truncated, garbage, empty).
    "too_large",            # Past PIL's decompression-bomb limit.
    "too_small",            # Shorter side below the minimum resolution.
    "missing_image",        # The record has no image (or a missing file).
    "missing_caption",      # The record has no caption.
    "empty_caption",        # Only whitespace after cleaning.
    "caption_not_utf8",     # Caption bytes that are not UTF-8.
    "bad_metadata",         # A caption JSON that does not parse.
    "truncated_shard",      # A tar shard cut off mid-file (rest unread).
    "empty_shard",          # A zero-byte shard file.
    "unreadable_shard",     # A shard that cannot be opened at all.
    "null_row",             # A parquet row whose image column is null.
)

_SPACES = re.compile(r"\s+")


class Skip(Exception):
  """A record that cannot be used, and why (`reason` in `REASONS`)."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; one of {REASONS}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB: alpha over white, 16/32-bit scaled to 8 bits."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(a, mode="L")
  if img.mode == "P":  # Palette: its transparency becomes an alpha channel.
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def decode_image(data: bytes | None, *, min_size: int = 0) -> np.ndarray:
  """Image file bytes -> uint8 [H, W, 3], upright, or `Skip`.

  Args:
    data: the encoded image (JPEG, PNG, WebP, GIF, TIFF, BMP...).
    min_size: the shortest side accepted (smaller images are skipped as
      "too_small": upscaling them would only teach blur).
  """
  if data is None:
    raise Skip("missing_image")
  if not data:
    raise Skip("corrupt_image", "empty file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as img:
        img.load()  # Decodes everything: a truncated file fails here.
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise Skip("too_large", str(e)) from e
  except Exception as e:  # PIL raises many types for bad bytes.
    raise Skip("corrupt_image", repr(e)) from e
  if min(rgb.size) < min_size:
    raise Skip("too_small", f"{rgb.size[0]}x{rgb.size[1]} < {min_size}")
  return np.asarray(rgb, dtype=np.uint8)


def clean_caption(raw: bytes | str | None) -> str:
  """Caption bytes or text -> one line of text, or `Skip`: UTF-8 (a BOM
  dropped), whitespace runs collapsed to one space, ends stripped."""
  if raw is None:
    raise Skip("missing_caption")
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      raise Skip("caption_not_utf8", repr(e)) from e
  text = _SPACES.sub(" ", raw).strip()
  if not text:
    raise Skip("empty_caption")
  return text


def clean_captions(raws, what: str) -> tuple[str, ...]:
  """Every caption of a record that cleans (`clean_caption`), in order;
  `Skip` when none does (the first one's reason, or "missing_caption"
  when there is none at all; `what` names the record)."""
  captions, error = [], Skip("missing_caption", what)
  for raw in raws:
    try:
      captions.append(clean_caption(raw))
    except Skip as e:
      if error.reason == "missing_caption" and not captions:
        error = e
  if not captions:
    raise error
  return tuple(captions)
