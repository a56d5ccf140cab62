"""Stage `data`: the experiment's images.

`config.data.name` picks the source:

* ``"shapes"`` (the default): the procedural shapes dataset (TFDS builder,
  array_record). Process 0 builds it (once, into this stage's directory or
  `config.data.data_dir`); the others wait, then open it. Opening never
  writes, so processes do not race on TFDS's files.
* ``"photos"``: random crops of the photographs bundled with scikit-image
  (`data.photos`; whole photographs held out), for tokenizer training on
  real images. Nothing to build: the stage records the split's photos.
* ``"captioned"``: a real captioned dataset (webdataset, parquet, COCO,
  image folder, TFDS; `stages.captioned`, `configs/cc3m.py`). Nothing to
  build: the stage lists the train and validation shards.

`image_iterator` and `heldout_images` serve the tokenizer stages either way.

With `data.sr_image_size` set (the cascade: `configs/shapes_cascade.py`),
every shapes scene is rendered at both sizes (`data.image_size` for the
base model, `data.sr_image_size` for super-resolution); readers pick one
with `size=`.
"""

from __future__ import annotations

from typing import Any

from etils import epath
import ml_collections

import numpy as np

from muse_jax import distributed
from muse_jax.data import pipeline
from muse_jax.data import shapes
from muse_jax.stages import captioned
from muse_jax.stages import graph

SOURCES = ("shapes", "photos", "captioned")


def source_name(config: ml_collections.ConfigDict) -> str:
  return config.data.get("name", "shapes")


def data_dir(config: ml_collections.ConfigDict, stage_dir: epath.Path
             ) -> epath.Path:
  return epath.Path(config.data.data_dir) if config.data.data_dir else (
      stage_dir)


def sr_image_size(config: ml_collections.ConfigDict) -> int:
  """The super-res image side (0: no super-res stage)."""
  return int(config.data.get("sr_image_size", 0) or 0)


def image_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The sides every scene is rendered at: base, then super-res."""
  sr = sr_image_size(config)
  return (config.data.image_size,) + ((sr,) if sr else ())


def open_builder(config: ml_collections.ConfigDict, stage_dir: epath.Path,
                 *, build: bool = False):
  """The shapes TFDS builder of a (finished) data stage directory."""
  from muse_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  d = config.data
  name = "s" + "_".join(str(s) for s in image_sizes(config))
  return shapes_tfds.build_shapes(
      str(data_dir(config, stage_dir)), config_name=name,
      num_train=d.num_train, num_validation=d.num_validation,
      num_heldout=d.num_heldout, seed=d.seed, prepare=build)


def split_source(config, stage_dir: epath.Path, split: str):
  """A random-access source over one split of the built dataset."""
  from muse_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  return shapes_tfds.shapes_source(open_builder(config, stage_dir), split)


def split_captions(config, stage_dir: epath.Path, split: str) -> list[str]:
  """Every caption of one shapes split, in example order."""
  if source_name(config) != "shapes":
    raise ValueError(f"data.name={source_name(config)!r}: caption caches "
                     "cover the shapes splits only")
  source = split_source(config, stage_dir, split)
  out = []
  for i in range(len(source)):
    c = source[i]["caption"]
    out.append(c.decode() if isinstance(c, bytes) else str(c))
  return out


def image_iterator(config, stage_dir: epath.Path, split: str, *,
                   batch_size: int, seed: int, size: int | None = None,
                   crop: int = 0):
  """A checkpointable grain iterator of {"images": float [-1, 1]} batches
  (shapes: rendered at side `size`, default `data.image_size`; with `crop`
  > 0, a random `crop` x `crop` window of each, drawn per example)."""
  from muse_jax.models import vqgan  # pylint: disable=g-import-not-at-top
  if source_name(config) == "captioned":
    return captioned.image_iterator(config, batch_size=batch_size, seed=seed,
                                    crop=crop)
  if source_name(config) == "photos":
    from muse_jax.data import photos  # pylint: disable=g-import-not-at-top
    d = config.data
    return photos.make_iterator(
        d.num_train, batch_size=batch_size, size=d.image_size, seed=d.seed,
        transform=lambda r: {"images": vqgan.to_unit_range(
            r[photos.IMAGE_KEY])})
  size = size or config.data.image_size
  key = shapes.image_key(size)
  if not 0 <= crop <= size:
    raise ValueError(f"crop {crop} must be in [0, {size}] (the image side; "
                     "0 = whole images)")
  random_crop = None
  if crop and crop < size:
    def random_crop(example, rng: np.random.Generator):
      top, left = rng.integers(size - crop + 1, size=2)
      return {"images": example["images"][top:top + crop, left:left + crop]}
  return pipeline.make_iterator(
      split_source(config, stage_dir, split), batch_size=batch_size,
      seed=seed, transform=lambda r: {"images": vqgan.to_unit_range(r[key])},
      random_transform=random_crop)


def heldout_images(config, stage_dir: epath.Path, n: int,
                   size: int | None = None) -> np.ndarray:
  """Up to `n` fixed held-out images, uint8 [n, S, S, 3]: the validation
  split (shapes, at side `size`; captioned data: its centre squares) or
  crops of the held-out photographs."""
  if source_name(config) == "captioned":
    return captioned.first_images(config, "validation", n)
  if source_name(config) == "photos":
    from muse_jax.data import photos  # pylint: disable=g-import-not-at-top
    d = config.data
    # Prefix-stable: the first n of the split's crops.
    return photos.heldout_crops(min(n, d.get("num_heldout", n)),
                                size=d.image_size, seed=d.seed)
  source = split_source(config, stage_dir, "validation")
  key = shapes.image_key(size or config.data.image_size)
  return np.stack([source[i][key] for i in range(min(n, len(source)))])


def split_images(config, stage_dir: epath.Path, split: str, n: int,
                 size: int | None = None) -> np.ndarray:
  """The first `n` real images of a split, uint8 [n, S, S, 3] (shapes:
  rendered at side `size`; captioned data: centre squares): what FID
  compares samples with."""
  if source_name(config) == "captioned":
    return captioned.first_images(config, split, n)
  if source_name(config) == "photos":
    raise ValueError("data.name='photos' has no caption splits")
  source = split_source(config, stage_dir, split)
  key = shapes.image_key(size or config.data.image_size)
  return np.stack([source[i][key] for i in range(min(n, len(source)))])


def training_images(config, stage_dir: epath.Path, n: int) -> np.ndarray:
  """The first `n` training images, uint8 [n, S, S, 3] (for photos: the
  crops the tokenizer's iterator serves, before shuffling)."""
  if source_name(config) == "captioned":
    return captioned.first_images(config, "train", n)
  if source_name(config) == "photos":
    from muse_jax.data import photos  # pylint: disable=g-import-not-at-top
    d = config.data
    return photos.training_crops(d.num_train, size=d.image_size,
                                 seed=d.seed)[:n]
  source = split_source(config, stage_dir, "train")
  key = shapes.image_key(config.data.image_size)
  return np.stack([source[i][key] for i in range(min(n, len(source)))])


class Data(graph.Stage):
  name = "data"
  config_keys = ("data",)

  def check(self, config) -> None:
    d = config.data
    if source_name(config) not in SOURCES:
      raise ValueError(f"data.name={source_name(config)!r} not in {SOURCES}")
    if source_name(config) == "captioned":
      captioned.check(config)
      return
    if source_name(config) == "photos":
      if d.image_size % 8 or d.image_size < 8:
        raise ValueError(f"data.image_size={d.image_size}: photo crops must "
                         "be a positive multiple of 8")
      if d.num_train < 1:
        raise ValueError(f"data.num_train must be >= 1, got {d.num_train}")
      return
    if d.image_size not in shapes.SUPPORTED_SIZES:
      raise ValueError(f"data.image_size={d.image_size} not in "
                       f"{shapes.SUPPORTED_SIZES}")
    sr = sr_image_size(config)
    if sr and (sr not in shapes.SUPPORTED_SIZES or sr <= d.image_size):
      raise ValueError(f"data.sr_image_size={sr} must be one of "
                       f"{shapes.SUPPORTED_SIZES} above data.image_size="
                       f"{d.image_size}")
    for key in ("num_train", "num_validation", "num_heldout"):
      if d[key] < 0:
        raise ValueError(f"data.{key} must be >= 0, got {d[key]}")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    if source_name(run.config) == "captioned":
      return captioned.summary(run.config)
    if source_name(run.config) == "photos":
      from muse_jax.data import photos  # pylint: disable=g-import-not-at-top
      return {"photos": {s: photos.list_photos(s) for s in photos.SPLITS}}
    if distributed.is_leader():
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      tfds.disable_progress_bar()  # The console shows the stage's lines.
      open_builder(run.config, run.dir, build=True)
    distributed.barrier("data-built")
    return {"splits": {s: len(split_source(run.config, run.dir, s))
                       for s in shapes.SPLITS},
            "data_dir": str(data_dir(run.config, run.dir))}
