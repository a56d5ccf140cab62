"""Grain input pipeline over random-access sources, with exact resume.

Every training stage reads its data through `make_iterator`: a TFDS
array_record data source (e.g. `shapes_tfds.shapes_source`), the ArrayRecord
shards of `muse_jax.data.records`, or an `ArraySource` of numpy arrays. The
pipeline is a grain `MapDataset` (index-based: source -> shuffle -> repeat
-> map -> batch -> this process's batches), so the iterator's whole position
is one integer: its state is small, JSON-serializable, checkpointed with
grain's own Orbax handler, and restores the exact next batch.

Sharding cuts every *global* batch into per-process slices: process p of P
gets examples [p*b, (p+1)*b) of each global batch of P*b. The global batch
sequence is therefore the same whatever the number of processes (a run on
two hosts trains on exactly the batches of a run on one), and all processes
see the same number of batches and stay in lock step.
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


def make_dataset(source: RandomAccessSource, *, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 transform: Callable[[Any], Any] | None = None,
                 random_transform: Callable[[Any, np.random.Generator], Any]
                 | None = None) -> grain.MapDataset:
  """The global, unbatched, index-addressable stream of examples.

  `random_transform(example, rng)` runs after `transform` with a generator
  that grain derives from `seed` and the example's position in the stream,
  so augmentations are reproducible and resume exactly.
  """
  ds = grain.MapDataset.source(source)
  if shuffle:
    # Distinct per-epoch permutations derive from (seed, epoch); shuffling
    # before repeat keeps epochs unmixed.
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if transform is not None:
    ds = ds.map(transform)
  if random_transform is not None:
    ds = ds.random_map(random_transform, seed=seed)
  return ds


def process_batches(dataset: grain.MapDataset, global_batch_size: int, *,
                    process_index: int, process_count: int,
                    drop_remainder: bool = True) -> grain.MapDataset:
  """This process's slice of every global batch of `dataset`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"bad process {process_index} of {process_count}")
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} does not split over "
                     f"{process_count} processes")
  if not drop_remainder and process_count > 1:
    # A final partial global batch has no equal per-process slices.
    raise ValueError("drop_remainder=False needs a single process")
  local = dataset.batch(global_batch_size // process_count,
                        drop_remainder=drop_remainder)
  if len(local) < process_count:
    raise ValueError(f"source of {len(dataset)} examples gives no global "
                     f"batch of {global_batch_size}")
  # Whole global batches only, so every process has the same count.
  usable = len(local) - len(local) % process_count
  return local[:usable][process_index::process_count]


def make_iterator(source: RandomAccessSource, *, batch_size: int, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None,
                  transform: Callable[[Any], Any] | None = None,
                  random_transform: Callable[[Any, np.random.Generator],
                                             Any] | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  drop_remainder: bool = True,
                  num_threads: int = 2,
                  prefetch_batches: int = 2
                  ) -> grain.DatasetIterator:
  """A checkpointable iterator of this process's numpy batches.

  Args:
    source: random-access records (dicts of arrays/scalars/bytes).
    batch_size: the global batch size (all processes together).
    seed: shuffle seed; the order is a pure function of it.
    shuffle: shuffle globally (a new permutation every epoch).
    num_epochs: passes over the data; None repeats forever.
    transform: per-example function applied before batching.
    random_transform: per-example `fn(example, rng)` after `transform`
      (augmentation; see `make_dataset`).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    drop_remainder: drop a final partial batch (only matters for finite
      `num_epochs`).
    num_threads: reader threads (batches are read in parallel, returned in
      order).
    prefetch_batches: batches read ahead.

  Returns:
    A grain `DatasetIterator` yielding dicts of stacked numpy arrays with
    `batch_size / process_count` rows. Its `get_state()` is a
    JSON-serializable dict; `set_state(state)` resumes at exactly the next
    batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  ds = make_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    transform=transform, random_transform=random_transform)
  ds = process_batches(
      ds, batch_size,
      process_index=jax.process_index() if process_index is None
      else process_index,
      process_count=jax.process_count() if process_count is None
      else process_count,
      drop_remainder=drop_remainder)
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=prefetch_batches)
  return iter(ds.to_iter_dataset(read_options))
