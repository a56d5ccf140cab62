"""seqio Tasks over captioned datasets (the `data` extra: tensorflow, seqio).

T5X-style code reads its data as registered seqio Tasks. `register` adds
one for a captioned dataset in any format `data.captioned` reads
(webdataset, parquet, COCO, image folder, TFDS): examples come from our
readers (bad records skipped and counted by reason, never a crash) through
`tf.data.Dataset.from_generator`, preprocessed to squares
(`captioned.preprocess`), and the caption is tokenised with T5's
sentencepiece vocabulary (EOS appended; `caption_pretokenized` keeps the
text). Features: `image` uint8 [S, S, 3], `caption` int32 ids, `key`.

`CaptionedSource` is the seqio `DataSource`: its shards are the dataset's
(`dataset.list_shards`), so seqio's `ShardInfo` gives host i of n the
shards i, i + n, ... -- `dataset.for_process`'s split -- and shuffling
reorders shards with the seed. `register_from_config` takes the sources of
an experiment config (`configs/cc3m.py`'s `data.train` / `data.validation`).

  from muse_jax.data import seqio_tasks
  seqio_tasks.register_from_config("cc3m", config)
  ds = seqio.get_mixture_or_task("cc3m").get_dataset(
      {"caption": 64}, split="train")
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any
import zlib

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

from muse_jax.data.captioned import dataset
from muse_jax.data.captioned import preprocess
from muse_jax.data.captioned import tally as tally_lib

# T5's public English vocabulary (the T5 and T5 v1.1 checkpoints').
T5_VOCABULARY = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"


class CaptionedSource(seqio.DataSource):
  """A captioned dataset's splits as a seqio data source, sharded by file."""

  def __init__(self, sources: Mapping[str, dataset.SourceConfig],
               cfg: preprocess.PreprocessConfig, seed: int = 0):
    super().__init__(splits=tuple(sources))
    self._sources = dict(sources)
    self._cfg = cfg
    self._seed = seed

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  @property
  def output_features(self) -> Mapping[str, seqio.Feature]:
    return {}

  def _shards(self, split: str) -> list[dataset.Shard]:
    if split not in self._sources:
      raise ValueError(f"split {split!r} not in {sorted(self._sources)}")
    return dataset.list_shards(self._sources[split])

  def list_shards(self, split: str) -> list[str]:
    return [s.name for s in self._shards(split)]

  def num_input_examples(self, split: str) -> int | None:
    del split
    return None  # Unknown until every shard is read.

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None
                  ) -> tf.data.Dataset:
    shards = self._shards(split)
    index, count = ((shard_info.index, shard_info.num_shards)
                    if shard_info else (0, 1))
    mine = [s for _, s in dataset.for_process(shards, index, count)]
    if shuffle:
      order = np.random.default_rng(
          [self._seed if seed is None else seed, index]).permutation(
              len(mine))
      mine = [mine[i] for i in order]
    size = self._cfg.image_size
    return tf.data.Dataset.from_generator(
        functools.partial(self._examples, mine, split),
        output_signature={
            "image": tf.TensorSpec([size, size, 3], tf.uint8),
            "caption": tf.TensorSpec([], tf.string),
            "key": tf.TensorSpec([], tf.string)})

  def _examples(self, shards: list[dataset.Shard], split: str):
    tally = tally_lib.Tally()
    for shard in shards:
      for ex in shard.read(tally):
        rng = np.random.default_rng([self._seed,
                                     zlib.crc32(ex["key"].encode())])
        square = preprocess.preprocess(ex, self._cfg, rng)
        yield {"image": square["image"], "caption": square["caption"],
               "key": square["key"]}
    if tally.skipped:
      logging.warning("%s: skipped %s", split, dict(tally.skipped))


def register(name: str, sources: Mapping[str, dataset.SourceConfig], *,
             image_size: int = 256, crop: str = "center",
             caption: str = "first", seed: int = 0,
             vocabulary: seqio.Vocabulary | str = T5_VOCABULARY
             ) -> seqio.Task:
  """Registers (replacing any of the same name) and returns the Task."""
  if isinstance(vocabulary, str):
    vocabulary = seqio.SentencePieceVocabulary(vocabulary)
  cfg = preprocess.PreprocessConfig(image_size=image_size, crop=crop,
                                    caption=caption)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=CaptionedSource(sources, cfg, seed),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features={
          "caption": seqio.Feature(vocabulary, add_eos=True),
          "image": seqio.ContinuousFeature(dtype=tf.uint8, rank=3),
      })


def register_from_config(name: str, config: Any, **kwargs) -> seqio.Task:
  """`register` with an experiment config's `data` sources and sizes."""
  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import captioned
  # pylint: enable=g-import-not-at-top
  d = config.data
  sources = {split: captioned.source_config(config, split)
             for split in captioned.SPLITS}
  kwargs.setdefault("image_size", d.image_size)
  kwargs.setdefault("caption", d.get("caption", "first"))
  kwargs.setdefault("seed", d.get("seed", 0))
  return register(name, sources, **kwargs)
