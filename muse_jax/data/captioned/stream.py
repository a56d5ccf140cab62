"""Streaming captioned shards through grain, with exact resume.

Tokenizers train on images, so they read raw shards (tar, parquet, ...)
directly rather than pre-tokenised records. `stream` builds that input
pipeline: this process's shards (`dataset.for_process`) in an order
reshuffled every epoch (grain's `MapDataset.shuffle`: a seed per epoch),
each shard expanded into its examples (`ShardExamples`), preprocessed to
squares, batched and, optionally, spread over grain worker processes
(`mp_prefetch`: each worker gets a slice of the shard order). The
iterator's state is the shard order's state before the current shard plus
how many examples of that shard were consumed, so a checkpointed iterator
resumes on the exact next example (the current shard's prefix is re-read
and dropped; its skips count again in that iterator's tally). Random crops
and caption choices are seeded by (seed, epoch, record key): a record gets
new ones every epoch, and the same ones after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
import zlib

from absl import flags
import grain
import numpy as np

from muse_jax.data.captioned import dataset
from muse_jax.data.captioned import preprocess
from muse_jax.data.captioned import tally as tally_lib


class _ShardExamplesIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator,
               shards: Sequence[dataset.Shard]):
    super().__init__(parent)
    self._shards = shards
    self.tally = tally_lib.Tally()
    self._before = parent.get_state()  # Parent state before this shard.
    self._offset = 0
    self._examples = None

  def _open(self, skip: int) -> None:
    epoch, index = next(self._parent)
    self._examples = ({**ex, "epoch": epoch}
                      for ex in self._shards[index].read(self.tally))
    for _ in range(skip):
      next(self._examples)

  def __next__(self) -> dict[str, Any]:
    while True:
      if self._examples is None:
        self._before = self._parent.get_state()
        self._offset = 0
        self._open(0)
      try:
        example = next(self._examples)
      except StopIteration:
        self._examples = None
        continue
      self._offset += 1
      return example

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._before, "offset": self._offset,
            "open": self._examples is not None}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._before = state["parent"]
    self._offset = state["offset"]
    self._examples = None
    if state["open"]:
      self._open(self._offset)


class ShardExamples(grain.IterDataset):
  """(epoch, shard index) pairs (from `parent`) -> the shards' examples, in
  order, each with its "epoch"."""

  def __init__(self, parent: grain.IterDataset,
               shards: Sequence[dataset.Shard]):
    super().__init__(parent)
    self._shards = list(shards)

  def __iter__(self) -> _ShardExamplesIterator:
    return _ShardExamplesIterator(self._parent.__iter__(), self._shards)

  def __str__(self) -> str:
    return f"ShardExamples({len(self._shards)} shards)"


def stream(shards: Sequence[dataset.Shard], cfg: preprocess.PreprocessConfig,
           *, batch_size: int, seed: int, process_index: int = 0,
           process_count: int = 1, num_epochs: int | None = None,
           num_workers: int = 0,
           batch_transform: Callable[[dict[str, Any]], dict[str, Any]]
           | None = None) -> grain.IterDataset:
  """Batches {"image" uint8 [B, S, S, 3], "caption" [B], "key" [B]} of
  this process's shards, epoch after epoch (`num_epochs` None: forever),
  through `batch_transform` when given (in the workers, if any)."""
  owned = [i for i, _ in dataset.for_process(shards, process_index,
                                             process_count)]
  if not owned:
    raise ValueError(f"process {process_index} of {process_count} owns no "
                     f"shard: the dataset has {len(shards)}; use fewer "
                     "processes or more shards")
  order = grain.MapDataset.source(owned).shuffle(seed=seed).repeat(
      num_epochs).map_with_index(lambda i, s: (i // len(owned), s))
  examples = ShardExamples(order.to_iter_dataset(), shards)

  def squared(ex: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(
        [seed, ex["epoch"], zlib.crc32(ex["key"].encode())])
    return preprocess.preprocess(ex, cfg, rng)

  ds = examples.map(squared).batch(batch_size, drop_remainder=True)
  if batch_transform is not None:
    ds = ds.map(batch_transform)
  if num_workers:
    # grain's workers read its absl flags; outside an absl app (tests,
    # notebooks) nothing parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds
