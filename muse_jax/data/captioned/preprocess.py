"""Example -> the model's square image and one caption.

Muse trains at 256 px (base) and 512 px (super-res) on images of every
shape. The shorter side is resized to `image_size` (bicubic with
antialiasing: PIL's `resize` filters when shrinking) and a square is cut
from the longer side: its centre (evaluation, the default) or a uniformly
random offset (training). No padding and no stretching, so objects keep
their proportions. One caption is chosen from the example's `captions`:
the first, or one at random (COCO's five per image; a different one each
epoch). Randomness comes from the caller's generator, seeded per record
and epoch by the pipeline, so a resumed run repeats the same draws.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

CROPS = ("center", "random")
CAPTIONS = ("first", "random")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Attributes:
    image_size: the square side out.
    crop: "center" or "random" (the square's offset along the long side).
    caption: "first" or "random" (which of the example's captions).
  """

  image_size: int = 256
  crop: str = "center"
  caption: str = "first"

  def __post_init__(self):
    if self.image_size < 1:
      raise ValueError(f"preprocess.image_size must be >= 1, got "
                       f"{self.image_size}")
    if self.crop not in CROPS:
      raise ValueError(f"preprocess.crop {self.crop!r} not in {CROPS}")
    if self.caption not in CAPTIONS:
      raise ValueError(f"preprocess.caption {self.caption!r} not in "
                       f"{CAPTIONS}")


def resize_and_crop(image: np.ndarray, size: int, *, crop: str = "center",
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side to `size`,
  then a square from the longer side."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize(
        (nw, nh), Image.Resampling.BICUBIC, reducing_gap=None))
  if crop == "random":
    if rng is None:
      raise ValueError("a random crop needs an rng")
    top = int(rng.integers(nh - size + 1))
    left = int(rng.integers(nw - size + 1))
  else:
    top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def preprocess(example: dict[str, Any], cfg: PreprocessConfig,
               rng: np.random.Generator | None = None) -> dict[str, Any]:
  """A reader's example -> {"key", "image" [S, S, 3] uint8, "caption"}."""
  captions = example.get("captions") or (example["caption"],)
  if cfg.caption == "random":
    if rng is None:
      raise ValueError("a random caption needs an rng")
    caption = captions[int(rng.integers(len(captions)))]
  else:
    caption = captions[0]
  return {"key": example["key"], "caption": caption,
          "image": resize_and_crop(example["image"], cfg.image_size,
                                   crop=cfg.crop, rng=rng)}
