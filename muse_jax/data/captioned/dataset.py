"""A captioned dataset as an ordered list of shards, whatever its format.

`SourceConfig` names the format and where the data is; `list_shards` turns
it into `Shard`s, each a name and a reader over its examples (counting its
skips in the caller's `Tally`): one per tar or parquet file (sorted by
name), or one per `records_per_shard` consecutive records of a COCO split,
an image folder or a TFDS split. The order is the same on every process, so shard i
can be given to process i % n (`for_process`) and the union over the
processes is the dataset, with no overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
from typing import Any

from etils import epath

from muse_jax.data.captioned import coco
from muse_jax.data.captioned import folder
from muse_jax.data.captioned import parquet_files
from muse_jax.data.captioned import tally as tally_lib
from muse_jax.data.captioned import tar_shards
from muse_jax.data.captioned import tfds_source

FORMATS = ("webdataset", "parquet", "coco", "folder", "tfds")
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """Where a captioned dataset is and how to read it.

  Attributes:
    format: one of `FORMATS`.
    path: webdataset / parquet: a folder of `.tar` / `.parquet` files or a
      glob of them (`/data/cc3m/*.tar`, `gs://bucket/laion/part-*.parquet`);
      coco: the captions annotations JSON; folder: the image folder;
      tfds: a prepared dataset's name (with `data_dir`) or its version
      directory.
    images: coco only: the split's image folder.
    split, data_dir, image_feature, caption_feature: tfds only (a nested
      feature by a "/" path, e.g. "captions/text").
    min_size: images with a shorter side below this are skipped.
    image_column, path_column, caption_column, key_column: parquet only
      (`parquet_files.Columns`; set path_column and image_column="" for a
      table of image paths).
    records_per_shard: coco / folder / tfds: consecutive records per
      shard.
  """

  format: str
  path: str
  images: str = ""
  min_size: int = 0
  image_column: str = "jpg"
  path_column: str = ""
  caption_column: str = "caption"
  key_column: str = "key"
  records_per_shard: int = 1000
  split: str = "train"
  data_dir: str = ""
  image_feature: str = "image"
  caption_feature: str = "caption"

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"data source format {self.format!r} not in "
                       f"{FORMATS}")
    if not self.path:
      raise ValueError(f"data source ({self.format}): path is empty")
    if self.format == "coco" and not self.images:
      raise ValueError("data source coco: set images (the image folder) "
                       "beside path (the annotations JSON)")
    if self.records_per_shard < 1:
      raise ValueError("data source records_per_shard must be >= 1")

  @property
  def columns(self) -> parquet_files.Columns:
    return parquet_files.Columns(
        image=self.image_column or None, path=self.path_column or None,
        caption=self.caption_column, key=self.key_column)


@dataclasses.dataclass(frozen=True)
class Shard:
  """One unit of work: `read(tally)` yields its usable examples in order."""

  name: str
  read: Callable[[tally_lib.Tally], Iterator[dict[str, Any]]]


def _files(cfg: SourceConfig) -> list[epath.Path]:
  path = epath.Path(cfg.path)
  if path.is_dir():
    files = path.glob(f"*{_SUFFIX[cfg.format]}")
  else:
    files = path.parent.glob(path.name)
  files = sorted(files, key=lambda p: p.name)
  if not files:
    raise ValueError(f"data source {cfg.format}: no files match {cfg.path}")
  return files


def _ranges(n: int, per: int) -> list[range]:
  return [range(lo, min(n, lo + per)) for lo in range(0, n, per)]


def list_shards(cfg: SourceConfig) -> list[Shard]:
  """The dataset's shards, in the same order on every process."""
  if cfg.format == "webdataset":
    return [Shard(p.name, functools.partial(
        _read_tar, p, min_size=cfg.min_size)) for p in _files(cfg)]
  if cfg.format == "parquet":
    return [Shard(p.name, functools.partial(
        _read_parquet, p, columns=cfg.columns, min_size=cfg.min_size))
            for p in _files(cfg)]
  if cfg.format == "coco":
    source = coco.Coco(cfg.path, cfg.images, min_size=cfg.min_size)
  elif cfg.format == "folder":
    source = folder.ImageFolder(cfg.path, min_size=cfg.min_size)
  else:
    source = tfds_source.TfdsSource(
        cfg.path, cfg.split, data_dir=cfg.data_dir,
        image_key=cfg.image_feature, caption_key=cfg.caption_feature,
        min_size=cfg.min_size)
  return [Shard(f"{cfg.format}-{r.start:09d}",
                functools.partial(_read_indexed, source, r))
          for r in _ranges(len(source), cfg.records_per_shard)]


def _read_tar(path, tally, *, min_size):
  return tar_shards.read_shard(path, tally, min_size=min_size)


def _read_parquet(path, tally, *, columns, min_size):
  return parquet_files.read_file(path, tally, columns=columns,
                                 min_size=min_size)


def _read_indexed(source, indices, tally):
  return source.read(tally, indices)


def for_process(shards: Sequence[Shard], index: int, count: int
                ) -> list[tuple[int, Shard]]:
  """(shard number, shard) of the shards process `index` of `count` owns:
  every `count`-th from `index`."""
  if not 0 <= index < count:
    raise ValueError(f"process index {index} not in [0, {count})")
  return [(i, s) for i, s in enumerate(shards) if i % count == index]
