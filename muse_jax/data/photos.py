"""Real photographs for the tokenizer benchmark: scikit-image's bundled images.

The shapes dataset says nothing about how a tokenizer copes with natural
images, and the project has no network access at training time, so the
tokenizer's real-image benchmark uses the photographs that ship inside the
scikit-image wheel (`skimage.data`; no download). This module picks which of
them count as photographs, splits them *by photograph* into train and
held-out sets, and serves random crops: as arrays (`random_crops`,
`training_crops`, `heldout_crops`) and as a grain random-access source
(`PhotoCropSource`, `make_iterator`) for the project's training loop.

Choices made here:

* Photographs: camera captures of real scenes, microscopy, fundus and
  telescope images. Excluded: synthetic images (colorwheel, checkerboard,
  logo, phantom), binary or document images (horse, text, page), duplicates
  (`cat` is `chelsea`) and images too small for 64 px crops in any number
  (microaneurysms, 102 px; the lfw_subset faces, 25 px).
* Grayscale photographs become 3-channel by repeating the channel, so every
  image is uint8 [H, W, 3] at its native resolution (no resizing).
* Split: four whole photographs are held out, three colour and one gray
  (`HELDOUT`): a natural scene, an indoor still life, a microscopy image and
  a gray natural scene. Every held-out crop comes from a photograph never
  seen in training. The stereo pair motorcycle_left/right (two views of one
  scene) is kept together in train.
* Crop sampling: a photograph uniformly at random (each photograph weighs the
  same, whatever its size; otherwise the 1411 px retina would dominate; 7 of
  the 13 training photographs are gray, so about half the crops are), then
  a top-left corner uniformly over all positions that fit, then (training
  only, optional) a horizontal flip with probability 1/2. Held-out crops
  cycle through the held-out photographs, so each gets n/4 crops, and are
  never flipped.
* Determinism: a set of crops is a `CropTable` (photo index, top, left, flip
  per crop) drawn once from a seed. `training_crops(n, size, seed)` and
  record i of `PhotoCropSource(n, size, seed)` are the same crops, so a
  baseline fitted to `training_crops` sees exactly what the tokenizer trains
  on, and a resumed grain iterator reproduces the exact next batch. Tables
  are prefix-stable: `heldout_crops(256)` is `heldout_crops(1024)[:256]`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

from muse_jax.data import pipeline

# name -> (skimage.data loader, kind): "colour" images are RGB, "gray" ones
# are repeated to 3 channels.
PHOTOS: dict[str, tuple[str, str]] = {
    # Colour.
    "astronaut": ("astronaut", "colour"),
    "chelsea": ("chelsea", "colour"),
    "coffee": ("coffee", "colour"),
    "rocket": ("rocket", "colour"),
    "motorcycle_left": ("stereo_motorcycle", "colour"),
    "motorcycle_right": ("stereo_motorcycle", "colour"),
    "retina": ("retina", "colour"),
    "immunohistochemistry": ("immunohistochemistry", "colour"),
    "hubble_deep_field": ("hubble_deep_field", "colour"),
    # Gray.
    "camera": ("camera", "gray"),
    "moon": ("moon", "gray"),
    "brick": ("brick", "gray"),
    "grass": ("grass", "gray"),
    "gravel": ("gravel", "gray"),
    "coins": ("coins", "gray"),
    "clock": ("clock", "gray"),
    "cell": ("cell", "gray"),
}
HELDOUT: tuple[str, ...] = ("chelsea", "coffee", "immunohistochemistry",
                            "camera")
SPLITS: tuple[str, ...] = ("train", "heldout")
IMAGE_KEY = "image"  # Default record key; see `PhotoCropSource`.


def list_photos(split: str) -> list[str]:
  """The photographs of `split` ("train" or "heldout"), in a fixed order."""
  if split == "train":
    return [n for n in PHOTOS if n not in HELDOUT]
  if split == "heldout":
    return list(HELDOUT)
  raise ValueError(f"Unknown photo split {split!r}; expected one of {SPLITS}.")


@functools.lru_cache(maxsize=None)
def _load(name: str) -> np.ndarray:
  from skimage import data as skdata  # Imported lazily: only photos need it.
  loader, kind = PHOTOS[name]
  image = getattr(skdata, loader)()
  if loader == "stereo_motorcycle":
    image = image[0] if name == "motorcycle_left" else image[1]
  image = np.asarray(image)
  if kind == "gray":
    if image.ndim != 2:
      raise ValueError(f"Photo {name!r} should be gray, got {image.shape}.")
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[-1] != 3 or image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f"Photo {name!r} loaded as {image.shape} {image.dtype}; "
                     "expected uint8 [H, W, 3].")
  image = np.ascontiguousarray(image)
  image.setflags(write=False)  # Cached and shared: nobody may edit it.
  return image


def load_photo(name: str) -> np.ndarray:
  """Photograph `name` as a read-only uint8 [H, W, 3] array (cached)."""
  if name not in PHOTOS:
    raise ValueError(f"Unknown photo {name!r}; expected one of "
                     f"{sorted(PHOTOS)}.")
  return _load(name)


def load_split(split: str) -> list[np.ndarray]:
  """All photographs of `split`, in `list_photos(split)` order."""
  return [load_photo(n) for n in list_photos(split)]


@dataclasses.dataclass(frozen=True)
class CropTable:
  """Where each of n crops lies: image index, top-left corner and flip."""
  size: int
  image: np.ndarray  # int32 [n], index into the image list.
  top: np.ndarray  # int32 [n]
  left: np.ndarray  # int32 [n]
  flip: np.ndarray  # bool [n], flip horizontally.

  def __len__(self) -> int:
    return len(self.image)

  def crop(self, images: Sequence[np.ndarray], i: int) -> np.ndarray:
    """Crop `i` of `images` (the list the table was sampled for)."""
    y, x, s = int(self.top[i]), int(self.left[i]), self.size
    out = images[int(self.image[i])][y:y + s, x:x + s]
    return np.ascontiguousarray(out[:, ::-1] if self.flip[i] else out)

  def crops(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """All crops, uint8 [n, size, size, 3]."""
    out = np.empty((len(self), self.size, self.size, 3), np.uint8)
    for i in range(len(self)):
      out[i] = self.crop(images, i)
    return out


def sample_crop_table(image_shapes: Sequence[tuple[int, ...]], n: int,
                      size: int, rng: np.random.Generator, *,
                      flip: bool = False, balanced: bool = False
                      ) -> CropTable:
  """Samples n crop positions over images of the given [H, W, ...] shapes.

  The image is uniform over the list (or, with `balanced`, crop i comes from
  image i % len), the corner uniform over the positions that fit, the flip a
  fair coin when `flip`. Prefix-stable: the first m rows of a table of n
  crops are the table of m crops from the same generator state.
  """
  if n < 0:
    raise ValueError(f"Number of crops must be >= 0, got {n}.")
  if size < 1:
    raise ValueError(f"Crop size must be positive, got {size}.")
  if not image_shapes:
    raise ValueError("No images to crop from.")
  heights = np.array([s[0] for s in image_shapes])
  widths = np.array([s[1] for s in image_shapes])
  small = [i for i, (h, w) in enumerate(zip(heights, widths))
           if h < size or w < size]
  if small:
    raise ValueError(f"Images {small} (shapes "
                     f"{[tuple(image_shapes[i]) for i in small]}) are smaller "
                     f"than the crop size {size}.")
  # One row of uniforms per crop, so the first m crops of a table of n > m
  # are the table of m (more crops extend a set, never reshuffle it).
  u = rng.random((n, 4))
  if balanced:
    image = np.arange(n) % len(image_shapes)
  else:
    image = np.minimum(np.floor(u[:, 0] * len(image_shapes)).astype(int),
                       len(image_shapes) - 1)
  # Corners: uniform integers in [0, H - size] and [0, W - size].
  top = np.floor(u[:, 1] * (heights[image] - size + 1))
  left = np.floor(u[:, 2] * (widths[image] - size + 1))
  flips = u[:, 3] < 0.5 if flip else np.zeros(n, bool)
  return CropTable(size=size, image=image.astype(np.int32),
                   top=top.astype(np.int32), left=left.astype(np.int32),
                   flip=flips)


def random_crops(images: Sequence[np.ndarray], n: int, size: int,
                 rng: np.random.Generator, *, flip: bool = False
                 ) -> np.ndarray:
  """n uniform random crops of `images` (uint8 [H, W, 3] each).

  Returns uint8 [n, size, size, 3]; see the module docstring for the
  sampling.
  """
  table = sample_crop_table([im.shape for im in images], n, size, rng,
                            flip=flip)
  return table.crops(images)


def _table_rng(split: str, seed: int) -> np.random.Generator:
  # The split is part of the stream so the two splits' tables differ.
  return np.random.default_rng([int(seed), SPLITS.index(split)])


def crop_table(split: str, n: int, size: int = 64, seed: int = 0, *,
               flip: bool | None = None) -> CropTable:
  """The fixed crop table of `split`: what the sources and arrays serve.

  `flip` defaults to True for train and False for heldout (held-out crops
  are balanced over the photographs and never flipped).
  """
  shapes = [im.shape for im in load_split(split)]
  if flip is None:
    flip = split == "train"
  return sample_crop_table(shapes, n, size, _table_rng(split, seed),
                           flip=flip, balanced=split == "heldout")


def training_crops(n: int, size: int = 64, seed: int = 0, *,
                   flip: bool = True) -> np.ndarray:
  """The n training crops, uint8 [n, size, size, 3].

  Identical to the records of `PhotoCropSource(n, size, seed, flip=flip)`.
  """
  return crop_table("train", n, size, seed, flip=flip).crops(
      load_split("train"))


def heldout_crops(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
  """n deterministic crops of the held-out photographs, uint8 [n, s, s, 3]."""
  return crop_table("heldout", n, size, seed).crops(load_split("heldout"))


class PhotoCropSource:
  """A grain random-access source of fixed photo crops.

  Record i is `{key: crop_i}` with crop_i uint8 [size, size, 3], crop i of
  `crop_table(split, num_records, size, seed)`. Records are cut on demand
  from the photographs held in memory, so a large `num_records` costs only
  the table (13 bytes a record). `key` defaults to "image"; pass e.g.
  `shapes.image_key(64)` to serve records under the key a stage expects.
  """

  def __init__(self, num_records: int, size: int = 64, seed: int = 0, *,
               split: str = "train", flip: bool | None = None,
               key: str = IMAGE_KEY):
    if num_records < 1:
      raise ValueError(f"num_records must be >= 1, got {num_records}.")
    self._images = load_split(split)
    self._table = crop_table(split, num_records, size, seed, flip=flip)
    self._key = key
    self._desc = (f"PhotoCropSource(split={split!r}, n={num_records}, "
                  f"size={size}, seed={seed}, key={key!r})")

  @property
  def table(self) -> CropTable:
    return self._table

  def __len__(self) -> int:
    return len(self._table)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    n = len(self._table)
    if not -n <= index < n:
      raise IndexError(f"Index {index} out of range for {self._desc}.")
    return {self._key: self._table.crop(self._images, index % n)}

  def crops(self) -> np.ndarray:
    """All records' crops at once, uint8 [n, size, size, 3]."""
    return self._table.crops(self._images)

  def __repr__(self) -> str:
    return self._desc


def make_iterator(num_records: int, *, batch_size: int, size: int = 64,
                  seed: int = 0, key: str = IMAGE_KEY,
                  transform: Callable[[Any], Any] | None = None,
                  **kwargs) -> Any:
  """A checkpointable grain iterator of training-crop batches.

  `pipeline.make_iterator` over `PhotoCropSource(num_records, size, seed)`:
  shuffled with `seed`, repeated forever, batches of `{key: uint8
  [b, size, size, 3]}` unless `transform` maps each record (e.g. to float
  images). Extra keyword arguments go to `pipeline.make_iterator`.
  """
  source = PhotoCropSource(num_records, size, seed, key=key)
  return pipeline.make_iterator(source, batch_size=batch_size, seed=seed,
                                transform=transform, **kwargs)
