"""Captioned shards -> ArrayRecord shards, one for one, resumable.

Pre-tokenisation reads every image once (decode, crop, VQ-encode, embed
the caption) and writes what the transformers train on. Input shard i
becomes `<out>/<name>-<i:05d>.array_record` (records in the input's
order), written whole and renamed into place, then its marker
`<name>-<i:05d>.done.json` (record count and skips by reason). A killed
run restarts where it stopped: shards with a marker are not redone, a
shard without one is redone from its start, so the output is byte-
identical to an uninterrupted run. Process p of n converts shards
p, p + n, ... (`dataset.for_process`); once every marker is there,
`finalize` writes `<name>.json` (a `records` manifest, read by
`records.open_source`) and `<name>.skips.json` (every process's skips).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import json
from typing import Any

from absl import logging
from etils import epath

from muse_jax.data import records
from muse_jax.data.captioned import dataset
from muse_jax.data.captioned import tally as tally_lib

Transform = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def shard_file(name: str, index: int) -> str:
  return f"{name}-{index:05d}{records.SUFFIX}"


def _marker(out: epath.Path, name: str, index: int) -> epath.Path:
  return out / f"{name}-{index:05d}.done.json"


def _batches(examples: Iterator[dict[str, Any]], size: int
             ) -> Iterator[list[dict[str, Any]]]:
  batch = []
  for ex in examples:
    batch.append(ex)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def convert(shards: Sequence[dataset.Shard], out: epath.PathLike, name: str,
            transform: Transform, *, batch_size: int = 64,
            process_index: int = 0, process_count: int = 1
            ) -> dict[str, int]:
  """Converts this process's unfinished shards; returns counts
  {"converted", "skipped_done", "records"}.

  `transform` maps a batch of reader examples to the records to store
  (same length and order: e.g. preprocess + tokenize + embed).
  """
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  counts = {"converted": 0, "skipped_done": 0, "records": 0}
  for index, shard in dataset.for_process(shards, process_index,
                                          process_count):
    marker = _marker(out, name, index)
    if marker.exists():
      counts["skipped_done"] += 1
      continue
    tally = tally_lib.Tally()
    encoded = []
    for batch in _batches(shard.read(tally), batch_size):
      stored = transform(batch)
      if len(stored) != len(batch):
        raise ValueError(f"transform returned {len(stored)} records for a "
                         f"batch of {len(batch)}")
      encoded += [records.encode(r) for r in stored]
    records.write_shard(out / shard_file(name, index), encoded)
    tmp = out / (marker.name + ".tmp")
    tmp.write_text(json.dumps({"shard": shard.name, "records": len(encoded),
                               "tally": tally.summary()}))
    tmp.replace(marker)
    counts["converted"] += 1
    counts["records"] += len(encoded)
    logging.info("converted %s -> %s: %d records, skipped %s", shard.name,
                 shard_file(name, index), len(encoded),
                 dict(tally.skipped) or "none")
  return counts


def finalize(out: epath.PathLike, name: str, num_shards: int,
             info: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the manifest and the skip summary once all shards are done."""
  out = epath.Path(out)
  missing = [i for i in range(num_shards)
             if not _marker(out, name, i).exists()]
  if missing:
    raise records.RecordsError(
        f"{out}: {len(missing)} of {num_shards} shards unfinished (first "
        f"{missing[:5]}); re-run the conversion")
  total, skipped, per_shard = 0, tally_lib.Tally(), []
  for i in range(num_shards):
    done = json.loads(_marker(out, name, i).read_text())
    total += done["records"]
    per_shard.append(done["records"])
    skipped.merge(tally_lib.Tally.from_summary(done["tally"]))
  skipped.write(out / f"{name}.skips.json")
  manifest = {"name": name, "num_records": total,
              "shards": [shard_file(name, i) for i in range(num_shards)],
              "records_per_shard": None, "records_in_shards": per_shard,
              "skipped": dict(skipped.skipped), **dict(info or {})}
  tmp = out / f"{name}.json.tmp"
  tmp.write_text(json.dumps(manifest, indent=2))
  tmp.replace(out / f"{name}.json")
  return manifest
