"""ArrayRecord shards of examples: written once, read by random access.

Pre-tokenised images, their captions and the captions' embeddings are
written here as ArrayRecord shards (`<dir>/<name>-NNNNN.array_record`), one
msgpack record per example (numpy arrays keep their dtype, bfloat16
included; strings and ints as they are), and a manifest `<dir>/<name>.json`
with the shard files and the record count, written last: a set of shards
without its manifest is unfinished.

`open_source` gives a grain random-access source over the shards, so
training reads them through `muse_jax.data.pipeline` (per-process slices,
checkpointable position) and nothing needs the whole dataset in RAM.

Paths go through `etils.epath`. ArrayRecord's writer needs a local file, so
a shard for a remote directory (gs://...) is written to a local temporary
file and copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import json
import os
import tempfile
from typing import Any

from array_record.python import array_record_module
from etils import epath
from flax import serialization
import grain
import numpy as np

SUFFIX = ".array_record"


class RecordsError(RuntimeError):
  """Missing or unfinished shards, or a record that cannot be decoded."""


def encode(example: Mapping[str, Any]) -> bytes:
  """One example (arrays, strings, ints) -> msgpack bytes."""
  return serialization.msgpack_serialize(
      {k: (np.asarray(v) if isinstance(v, np.ndarray) else v)
       for k, v in example.items()})


def decode(record: bytes) -> dict[str, Any]:
  return serialization.msgpack_restore(record)


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def write_shard(path: epath.Path, records: list[bytes]) -> None:
  """One shard of encoded records, renamed (or copied) into place whole."""
  if _is_local(path):
    local, tmp = os.fspath(path) + ".tmp", None
  else:
    tmp = tempfile.mkdtemp()
    local = os.path.join(tmp, path.name)
  writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  if tmp is None:
    os.replace(local, os.fspath(path))
  else:
    epath.Path(local).copy(path, overwrite=True)


def write(directory: epath.PathLike, name: str,
          examples: Iterable[Mapping[str, Any]], *,
          records_per_shard: int = 4096,
          info: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes `examples` as shards of `records_per_shard`; returns the manifest.

  Call on one process (the others wait at a barrier): the shards are one
  set of files whatever the number of processes.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shards, buffer, count = [], [], 0

  def flush():
    shard = f"{name}-{len(shards):05d}{SUFFIX}"
    write_shard(directory / shard, buffer)
    shards.append(shard)

  for example in examples:
    buffer.append(encode(example))
    count += 1
    if len(buffer) == records_per_shard:
      flush()
      buffer = []
  if buffer or not shards:
    flush()
  manifest = {"name": name, "num_records": count, "shards": shards,
              "records_per_shard": records_per_shard, **dict(info or {})}
  # Renamed into place: a manifest is either whole or absent.
  tmp = directory / f"{name}.json.tmp"
  tmp.write_text(json.dumps(manifest, indent=2))
  tmp.replace(directory / f"{name}.json")
  return manifest


def manifest(directory: epath.PathLike, name: str) -> dict[str, Any]:
  path = epath.Path(directory) / f"{name}.json"
  if not path.exists():
    raise RecordsError(f"no finished record set {name!r} in {directory} "
                       f"({path.name} missing)")
  return json.loads(path.read_text())


def _unreadable_shard(paths: list[str]) -> str:
  """The first of `paths` that ArrayRecord cannot open."""
  for path in paths:
    try:
      array_record_module.ArrayRecordReader(path).close()
    except Exception:  # pylint: disable=broad-except
      return path
  return "(unknown)"


class Source:
  """Random access over a record set: `source[i]` is example i, decoded."""

  def __init__(self, directory: epath.PathLike, name: str):
    self.directory = epath.Path(directory)
    self.manifest = manifest(directory, name)
    paths = [os.fspath(self.directory / s) for s in self.manifest["shards"]]
    missing = [p for p in paths if not epath.Path(p).exists()]
    if missing:
      raise RecordsError(f"record set {name!r}: shard files missing: "
                         f"{missing}")
    try:
      self._source = grain.sources.ArrayRecordDataSource(paths)
    except Exception as e:  # The reader's errors name no file: find it.
      raise RecordsError(f"record set {name!r}: cannot read shard "
                         f"{_unreadable_shard(paths)} ({e!r})") from e
    if len(self._source) != self.manifest["num_records"]:
      raise RecordsError(
          f"record set {name!r} in {directory}: {len(self._source)} records "
          f"in its shards, the manifest says {self.manifest['num_records']}")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    index %= len(self)
    try:
      return decode(self._source[index])
    except Exception as e:  # A corrupt record: name it and its shard.
      shards = self.manifest["shards"]
      sizes = self.manifest.get("records_in_shards")
      if sizes:  # Shards of different sizes (one per converted input).
        shard = shards[int(np.searchsorted(np.cumsum(sizes), index,
                                           side="right"))]
      else:
        per_shard = self.manifest.get("records_per_shard") or 1
        shard = shards[min(index // per_shard, len(shards) - 1)]
      raise RecordsError(f"record {index} of {self.directory} ({shard}): "
                         f"cannot decode ({e!r})") from e

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"records.Source({self.directory}, {self.manifest['name']!r})"


def open_source(directory: epath.PathLike, name: str) -> Source:
  """A grain-compatible random-access source over a finished record set."""
  return Source(directory, name)
