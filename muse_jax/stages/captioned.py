"""Real captioned datasets in the stage graph (`data.name = "captioned"`).

The same main job that trains on shapes trains on webdataset tar shards,
parquet files, COCO captions, image folders or a prepared TFDS dataset
(`muse_jax.data.captioned`); only the `data` section changes
(`configs/cc3m.py`):

* `data.train`, `data.validation`: `dataset.SourceConfig` fields. An empty
  validation field takes the train one's value, so a validation split is
  usually just its `path` (a TFDS one just its `split`).
* `data.image_size`: the square side; `data.crop`: the tokenizer's training
  crop ("random" or "center"); `data.caption`: which caption of several
  ("first", or "random": a different one per epoch); `data.num_workers`:
  grain worker processes reading shards for the tokenizer.

What each stage does with it:

* data: lists both splits' shards, so a wrong path fails in seconds.
* tokenizer: streams the train shards (`stream.stream`: this process's
  shards, reshuffled every epoch); the stream's position is saved in the
  tokenizer's checkpoints and a resumed run continues on the exact next
  example. Held-out metrics on the first validation images.
* tokenize: pre-tokenises both splits, one ArrayRecord shard per input
  shard (`convert`): `tokens` of the centre square, `caption`, `key` and
  the frozen encoder's `text_emb`. Each process converts its own shards on
  its own devices; a killed run redoes only unfinished shards; skipped
  records are counted by reason in `<split>.skips.json`.
* transformer and evaluate read those records as they read the shapes
  ones.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import time
from typing import Any
import zlib

import jax
import ml_collections
import ml_dtypes
import numpy as np

from muse_jax import distributed
from muse_jax.data.captioned import convert
from muse_jax.data.captioned import dataset
from muse_jax.data.captioned import preprocess
from muse_jax.data.captioned import stream
from muse_jax.data.captioned import tally as tally_lib

SPLITS = ("train", "validation")
PIPELINES = ("muse", "tokenizer")
_FIELDS = tuple(f.name for f in dataclasses.fields(dataset.SourceConfig))


def source_config(config: ml_collections.ConfigDict, split: str
                  ) -> dataset.SourceConfig:
  """The `dataset.SourceConfig` of `data.<split>` (validation: its empty
  fields filled from train's)."""
  d = config.data
  if split not in SPLITS:
    raise ValueError(f"captioned data has splits {SPLITS}, not {split!r}")
  fields = {}
  for name in ("train",) + (("validation",) if split == "validation" else ()):
    section = d.get(name)
    if section is None:
      raise ValueError(f"data.name='captioned' needs a data.{name} section")
    unknown = sorted(set(section.keys()) - set(_FIELDS))
    if unknown:
      raise ValueError(f"data.{name} has unknown keys {unknown}; known: "
                       f"{list(_FIELDS)}")
    fields.update({k: v for k, v in section.items()
                   if name == "train" or v not in ("", None)})
  if split == "validation":
    own = d.validation
    if not own.get("path") and own.get("split", "") in ("", d.train.get(
        "split", "train")):
      raise ValueError("data.validation: set its path (or, for tfds, a "
                       "split other than train's); it would read the "
                       "training data")
  try:
    return dataset.SourceConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"data.{split}: {e}") from e


def preprocess_config(config, *, crop: str) -> preprocess.PreprocessConfig:
  d = config.data
  return preprocess.PreprocessConfig(image_size=d.image_size, crop=crop,
                                     caption=d.get("caption", "first"))


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key of a bad captioned-data config."""
  d = config.data
  pipeline = config.get("pipeline", "muse")
  if pipeline not in PIPELINES:
    raise ValueError(f"data.name='captioned' runs the pipelines {PIPELINES},"
                     f" not {pipeline!r} (the cascade's high-res tokens: "
                     "python -m muse_jax.pretokenize on a cascade workdir)")
  if d.image_size < 8 or d.image_size % 8:
    raise ValueError(f"data.image_size={d.image_size} must be a positive "
                     "multiple of 8")
  for split in SPLITS:
    source_config(config, split)
  preprocess_config(config, crop=d.get("crop", "random"))
  if d.get("num_workers", 0) < 0:
    raise ValueError("data.num_workers must be >= 0")
  if "text_encoder" in config and config.text_encoder.get("cache_dir"):
    raise ValueError("text_encoder.cache_dir: caption caches cover the "
                     "shapes splits; captioned data is embedded in the "
                     "tokenize stage (set it to '')")


def list_shards(config, split: str) -> list[dataset.Shard]:
  return dataset.list_shards(source_config(config, split))


def summary(config) -> dict[str, Any]:
  """The data stage's record: each split's format and shard names."""
  out = {}
  for split in SPLITS:
    shards = list_shards(config, split)
    out[split] = {"format": source_config(config, split).format,
                  "num_shards": len(shards),
                  "shards": [s.name for s in shards]}
    if distributed.is_leader():
      print(f"[data] {split}: {len(shards)} {out[split]['format']} shards",
            flush=True)
  return out


def image_iterator(config, *, batch_size: int, seed: int, crop: int = 0
                   ) -> Any:
  """A checkpointable iterator of this process's {"images": float [-1, 1]}
  batches from the train shards (global `batch_size` split over the
  processes; with `crop` > 0, a random `crop`-pixel window of each
  square)."""
  from muse_jax.models import vqgan  # pylint: disable=g-import-not-at-top
  d = config.data
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{count} processes")
  size = d.image_size

  def to_images(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    images = batch["image"]
    if crop and crop < size:
      keys = [str(k) for k in batch["key"]]
      windows = []
      for key, image in zip(keys, images):
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        top, left = rng.integers(size - crop + 1, size=2)
        windows.append(image[top:top + crop, left:left + crop])
      images = np.stack(windows)
    return {"images": vqgan.to_unit_range(images)}

  ds = stream.stream(
      list_shards(config, "train"),
      preprocess_config(config, crop=d.get("crop", "random")),
      batch_size=batch_size // count, seed=seed, process_index=index,
      process_count=count, num_workers=d.get("num_workers", 0),
      batch_transform=to_images)
  return iter(ds)


def first_images(config, split: str, n: int) -> np.ndarray:
  """The first `n` images of a split as centre squares, uint8 [n, S, S, 3]
  (fewer if the split is smaller)."""
  cfg = preprocess.PreprocessConfig(image_size=config.data.image_size)
  out, tally = [], tally_lib.Tally()
  for shard in list_shards(config, split):
    for ex in shard.read(tally):
      if len(out) == n:
        return np.stack(out)
      out.append(preprocess.preprocess(ex, cfg)["image"])
  if not out:
    raise ValueError(f"data.{split}: no usable image (skipped: "
                     f"{dict(tally.skipped) or 'none'})")
  return np.stack(out)


def record_transform(squares_of: Callable[[list[dict[str, Any]]],
                                          list[dict[str, Any]]],
                     base_tokens: Callable[[list[dict[str, Any]]],
                                           np.ndarray],
                     *, size: int, hr_tokens=None, encoder=None,
                     stats: dict[str, float] | None = None):
  """A `convert` transform: reader examples -> token records.

  `squares_of` preprocesses a batch to {"key", "caption", "image"} squares
  (side `size` times the super-res factor when `hr_tokens` is given);
  `base_tokens` / `hr_tokens` encode [{"image": x}] lists; `encoder`
  (optional) stores each caption's `text_emb` (bfloat16, padding dropped:
  what the shapes `tokenize` stage writes).
  """
  from muse_jax.editor import downsample  # pylint: disable=g-import-not-at-top

  def transform(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    squares = squares_of(batch)
    images = np.stack([s["image"] for s in squares])
    low = (images if images.shape[1] == size
           else downsample(images, images.shape[1] // size))
    out = [{"key": s["key"], "caption": s["caption"], "tokens": t}
           for s, t in zip(squares, base_tokens([{"image": x} for x in low]))]
    if hr_tokens is not None:
      for rec, t in zip(out, hr_tokens([{"image": x} for x in images])):
        rec["hr_tokens"] = t
    if encoder is not None:
      t0 = time.perf_counter()
      text = encoder.encode([s["caption"] for s in squares])
      if stats is not None:
        stats["text_encode_s"] = stats.get("text_encode_s", 0.0) + (
            time.perf_counter() - t0)
        stats["truncated_captions"] = stats.get(
            "truncated_captions", 0) + int(text.num_truncated)
      lengths = text.mask.sum(axis=1)
      emb = text.embeddings.astype(ml_dtypes.bfloat16)
      for j, rec in enumerate(out):
        rec["text_emb"] = emb[j, :lengths[j]]
    return out

  return transform


def seeded_squares(cfg: preprocess.PreprocessConfig, seed: int):
  """Batch preprocessing with each record's draws seeded by its key (the
  same crop and caption on every run and process)."""

  def squares_of(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [preprocess.preprocess(ex, cfg, np.random.default_rng(
        [seed, zlib.crc32(ex["key"].encode())])) for ex in batch]

  return squares_of


def tokenize(run) -> dict[str, Any]:
  """The tokenize stage on captioned data (see the module docstring)."""
  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import artifacts
  from muse_jax.stages import tokenize as tokenize_lib
  # pylint: enable=g-import-not-at-top
  config = run.config
  env = run.env.local()  # Each process its own shards, on its own devices.
  base = tokenize_lib.image_tokenizer(
      config, env, artifacts.load_vq(config, run.inputs["tokenizer"], env),
      "image")
  encoder = env.text_encoder()
  info: dict[str, Any] = {"text_dim": encoder.dim, "max_len": encoder.max_len}
  for split in SPLITS:
    stats: dict[str, float] = {}
    shards = list_shards(config, split)
    transform = record_transform(
        seeded_squares(preprocess_config(config, crop="center"),
                       config.data.get("seed", 0)),
        base, size=config.data.image_size, encoder=encoder, stats=stats)
    counts = convert.convert(
        shards, run.dir, split, transform,
        batch_size=config.tokenize.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count())
    distributed.barrier(f"tokenize-{split}")
    if distributed.is_leader():
      manifest = convert.finalize(
          run.dir, split, len(shards),
          {"text_dim": encoder.dim, "max_len": encoder.max_len})
      info[split] = {"examples": manifest["num_records"],
                     "skipped": manifest["skipped"],
                     "shards": len(shards),
                     "converted_here": counts["converted"],
                     "text_encode_s": stats.get("text_encode_s", 0.0),
                     "truncated_captions": stats.get("truncated_captions",
                                                     0)}
      print(f"[tokenize] {split}: {manifest['num_records']} images from "
            f"{len(shards)} shards (skipped: "
            f"{manifest['skipped'] or 'none'})", flush=True)
    distributed.barrier(f"tokenize-{split}-manifest")
  return info
