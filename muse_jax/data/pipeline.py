"""Grain input pipeline over random-access sources, with exact resume.

Every training stage reads its data through `make_iterator`: a TFDS
array_record data source (e.g. `shapes_tfds.shapes_source`) or an
`ArraySource` of pre-tokenized numpy arrays. Because the pipeline is a grain
`MapDataset` (index-based: source -> shard -> shuffle -> repeat -> map),
read in order by threads and then batched, the iterator's whole position is
one integer, so its state is small,
JSON-serializable and restores the exact next batch after preemption. The
iterator is a plain grain `DatasetIterator`, so `grain.checkpoint` handlers
(used with Orbax) work on it directly.

Sharding is per process: each process reads a disjoint, equally long strided
slice of the source (the last `len(source) % shard_count` records are dropped
so all processes see the same number of batches and stay in lock step), and
batches are per-process batches of `batch_size` examples.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import grain
import jax
import numpy as np


class RandomAccessSource(Protocol):
  """What grain needs from a source: a length and integer indexing."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Any:
    ...


class ArraySource:
  """A random-access source over a dict of equal-length numpy arrays.

  Record `i` is `{key: array[i]}`; used for pre-tokenized data held in memory.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if not arrays:
      raise ValueError("ArraySource needs at least one array.")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"Arrays must have equal lengths, got {lengths}.")
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not -self._len <= index < self._len:
      raise IndexError(f"Index {index} out of range for length {self._len}.")
    return {k: v[index] for k, v in self._arrays.items()}

  def __repr__(self) -> str:
    shapes = {k: (v.shape, str(v.dtype)) for k, v in self._arrays.items()}
    return f"ArraySource({shapes})"


def shard_dataset(dataset: grain.MapDataset, shard_index: int,
                  shard_count: int) -> grain.MapDataset:
  """The `shard_index`-th of `shard_count` disjoint, equally long shards."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"Bad shard {shard_index} of {shard_count}.")
  usable = len(dataset) - len(dataset) % shard_count
  if usable == 0:
    raise ValueError(f"Source of length {len(dataset)} is too small for "
                     f"{shard_count} shards.")
  return dataset[:usable][shard_index::shard_count]


def make_dataset(source: RandomAccessSource, *, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 transform: Callable[[Any], Any] | None = None,
                 shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.MapDataset:
  """The unbatched, index-addressable stream of `make_iterator`.

  Element `i` is the `i`-th example this process sees (arguments as in
  `make_iterator`).
  """
  if shard_index is None:
    shard_index = jax.process_index()
  if shard_count is None:
    shard_count = jax.process_count()
  ds = grain.MapDataset.source(source)
  ds = shard_dataset(ds, shard_index, shard_count)
  if shuffle:
    # Distinct per-epoch permutations derive from (seed, epoch); shuffling
    # before repeat keeps epochs unmixed.
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if transform is not None:
    ds = ds.map(transform)
  return ds


def make_iterator(source: RandomAccessSource, *, batch_size: int, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None,
                  transform: Callable[[Any], Any] | None = None,
                  shard_index: int | None = None,
                  shard_count: int | None = None,
                  drop_remainder: bool = True,
                  num_threads: int = 4,
                  prefetch_buffer_size: int | None = None
                  ) -> grain.DatasetIterator:
  """A checkpointable iterator of per-process numpy batches.

  Args:
    source: random-access records (dicts of arrays/scalars/bytes).
    batch_size: examples per batch on this process.
    seed: shuffle seed; the order is a pure function of it and the shard.
    shuffle: shuffle globally (a new permutation every epoch).
    num_epochs: passes over the data; None repeats forever.
    transform: per-example function applied before batching.
    shard_index: this process's shard (default `jax.process_index()`).
    shard_count: number of shards (default `jax.process_count()`).
    drop_remainder: drop a final partial batch (only matters for finite
      `num_epochs`).
    num_threads: reader threads (records are read and transformed in
      parallel, returned in order).
    prefetch_buffer_size: records read ahead (default two batches).

  Returns:
    A grain `DatasetIterator` yielding dicts of stacked numpy arrays. Its
    `get_state()` is a JSON-serializable dict; `set_state(state)` resumes at
    exactly the next batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  ds = make_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    transform=transform, shard_index=shard_index,
                    shard_count=shard_count)
  read_options = grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size or 2 * batch_size)
  # Batch after the threaded reader, so read-ahead is counted in records.
  ds = ds.to_iter_dataset(read_options).batch(
      batch_size, drop_remainder=drop_remainder)
  return iter(ds)
