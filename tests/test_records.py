"""Tests of the ArrayRecord shards of `muse_jax.data.records`."""

from __future__ import annotations

import json

from array_record.python import array_record_module
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.data import pipeline
from muse_jax.data import records

_N = 11
_PER_SHARD = 3  # Four shards: 3, 3, 3, 2.


def _example(i: int) -> dict:
  rng = np.random.default_rng(i)
  return {
      "tokens": np.arange(i, i + 5, dtype=np.int32),
      # bfloat16, with a first dimension that varies per example.
      "emb": rng.standard_normal((i % 4 + 1, 3)).astype(jnp.bfloat16),
      "caption": f"caption {i}: a red circle é",
      "index": i,
  }


def _assert_example_equal(got: dict, want: dict):
  assert got.keys() == want.keys()
  for k, v in want.items():
    if isinstance(v, np.ndarray):
      assert isinstance(got[k], np.ndarray), k
      assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
      np.testing.assert_array_equal(got[k], v)
    else:
      assert type(got[k]) is type(v) and got[k] == v, k


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  directory = tmp_path_factory.mktemp("records")
  manifest = records.write(directory, "train",
                           (_example(i) for i in range(_N)),  # A generator.
                           records_per_shard=_PER_SHARD,
                           info={"image_size": 32, "split": "train"})
  return directory, manifest


def test_manifest_counts_shards(written):
  directory, manifest = written
  shards = [f"train-{k:05d}.array_record" for k in range(4)]
  assert manifest == {"name": "train", "num_records": _N, "shards": shards,
                      "records_per_shard": _PER_SHARD, "image_size": 32,
                      "split": "train"}
  assert records.manifest(directory, "train") == manifest
  assert json.loads((directory / "train.json").read_text()) == manifest
  assert sorted(p.name for p in directory.iterdir()) == sorted(
      shards + ["train.json"])
  counts = []
  for shard in shards:
    reader = array_record_module.ArrayRecordReader(str(directory / shard))
    counts.append(reader.num_records())
    reader.close()
  assert counts == [3, 3, 3, 2]


def test_round_trip_in_order(written):
  directory, _ = written
  source = records.open_source(directory, "train")
  assert isinstance(source, records.Source) and len(source) == _N
  for i in range(_N):
    _assert_example_equal(source[i], _example(i))
  assert [r["index"] for r in source] == list(range(_N))  # __iter__.
  assert source[np.int64(4)]["index"] == 4
  assert source[-1]["index"] == _N - 1
  with pytest.raises(IndexError):
    source[_N]
  assert "train" in repr(source)


def test_empty_set_is_one_empty_shard(tmp_path):
  manifest = records.write(tmp_path, "empty", [], records_per_shard=4)
  assert manifest["num_records"] == 0
  assert manifest["shards"] == ["empty-00000.array_record"]
  assert (tmp_path / "empty-00000.array_record").is_file()
  source = records.open_source(tmp_path, "empty")
  assert len(source) == 0 and list(source) == []


def test_missing_manifest_names_it(tmp_path):
  with pytest.raises(records.RecordsError, match=r"nope\.json missing"):
    records.open_source(tmp_path, "nope")
  with pytest.raises(records.RecordsError, match="'nope'"):
    records.manifest(tmp_path, "nope")


def test_unfinished_write_has_no_manifest(tmp_path, monkeypatch):
  real = records.write_shard
  calls = []

  def fail_second(path, recs):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    real(path, recs)

  monkeypatch.setattr(records, "write_shard", fail_second)
  with pytest.raises(OSError, match="disk full"):
    records.write(tmp_path, "half", (_example(i) for i in range(5)),
                  records_per_shard=2)
  assert (tmp_path / "half-00000.array_record").is_file()
  assert not (tmp_path / "half.json").exists()
  with pytest.raises(records.RecordsError, match=r"half\.json missing"):
    records.open_source(tmp_path, "half")


def _copy(tmp_path, name="copy"):
  records.write(tmp_path, name, (_example(i) for i in range(_N)),
                records_per_shard=_PER_SHARD)
  return tmp_path


def test_deleted_shard_is_named(tmp_path):
  _copy(tmp_path)
  (tmp_path / "copy-00002.array_record").unlink()
  with pytest.raises(records.RecordsError,
                     match=r"missing: .*copy-00002\.array_record"):
    records.open_source(tmp_path, "copy")


def test_count_mismatch(tmp_path):
  _copy(tmp_path)
  path = tmp_path / "copy.json"
  manifest = json.loads(path.read_text())
  path.write_text(json.dumps({**manifest, "num_records": _N + 1}))
  with pytest.raises(records.RecordsError,
                     match=rf"{_N} records in its shards, the manifest says "
                           rf"{_N + 1}"):
    records.open_source(tmp_path, "copy")


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble"])
def test_corrupt_shard_is_named(tmp_path, damage):
  _copy(tmp_path)
  shard = tmp_path / "copy-00001.array_record"
  data = bytearray(shard.read_bytes())
  if damage == "truncate":
    data = data[:len(data) // 2]
  elif damage == "empty":
    data = b""
  else:  # Overwrite the block headers and the footer.
    for i in range(64, len(data), 5):
      data[i] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(records.RecordsError,
                     match=r"cannot read shard .*copy-00001\.array_record"):
    records.open_source(tmp_path, "copy")


def test_undecodable_record_is_named(tmp_path):
  _copy(tmp_path)
  # A readable shard whose second record is not msgpack.
  writer = array_record_module.ArrayRecordWriter(
      str(tmp_path / "copy-00001.array_record"), "group_size:1")
  for rec in (records.encode(_example(3)), b"\xc1\xc1\xc1",
              records.encode(_example(5))):
    writer.write(rec)
  writer.close()
  source = records.open_source(tmp_path, "copy")
  _assert_example_equal(source[3], _example(3))
  _assert_example_equal(source[5], _example(5))
  with pytest.raises(records.RecordsError,
                     match=r"record 4 of .*copy-00001\.array_record.*"
                           r"cannot decode"):
    source[4]


def test_pipeline_reads_records(tmp_path):
  n = 24
  examples = [{"tokens": np.full((4,), i, np.int32),
               "emb": np.full((2, 3), i, jnp.bfloat16),
               "caption": f"c{i}", "index": i} for i in range(n)]
  records.write(tmp_path, "fixed", examples, records_per_shard=5)
  source = records.open_source(tmp_path, "fixed")
  make = lambda p, count=2: pipeline.make_iterator(
      source, batch_size=8, seed=3, num_epochs=1, process_index=p,
      process_count=count)
  single = list(make(0, 1))
  assert len(single) == 3
  b = single[0]
  assert b["tokens"].shape == (8, 4) and b["tokens"].dtype == np.int32
  assert b["emb"].shape == (8, 2, 3) and b["emb"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(b["tokens"][:, 0], b["index"])
  assert [str(c) for c in b["caption"]] == [f"c{i}" for i in b["index"]]
  seen = np.concatenate([x["index"] for x in single])
  assert sorted(seen.tolist()) == list(range(n))
  # Two processes: halves of the same global batches, resumable.
  parts = [list(make(p)) for p in range(2)]
  for p, batches in enumerate(parts):
    for got, whole in zip(batches, single, strict=True):
      np.testing.assert_array_equal(got["index"], whole["index"][4 * p:][:4])
  it = make(1)
  next(it)
  resumed = make(1)
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  rest = list(resumed)
  assert len(rest) == 2
  for got, want in zip(rest, parts[1][1:]):
    np.testing.assert_array_equal(got["emb"], want["emb"])
    np.testing.assert_array_equal(got["index"], want["index"])
