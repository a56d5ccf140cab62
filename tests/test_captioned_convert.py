"""Captioned datasets -> ArrayRecord shards: sources, sharding, resume.

The transform here is a cheap stand-in for the tokenizers (a centre crop
and its 4x4 block means as "tokens"), so these tests cover the shard
bookkeeping; `test_pretokenize_cli` runs the real tokenizers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest

import captioned_files as files
from muse_jax.data import records
from muse_jax.data.captioned import convert
from muse_jax.data.captioned import dataset
from muse_jax.data.captioned import preprocess
from muse_jax.data.captioned import tally as tally_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tar_dataset(root, shards=5, per=7, broken=True):
  root.mkdir(parents=True, exist_ok=True)
  for s in range(shards):
    samples = [(f"{s:05d}{i:04d}", files.valid(s * 100 + i))
               for i in range(per)]
    if broken:
      samples.insert(3, (f"{s:05d}bad", {"jpg": b"junk", "txt": b"x"}))
    files.write_tar(root / f"{s:05d}.tar", samples)
  return dataset.SourceConfig(format="webdataset", path=str(root))


def _all_records(out, name="train"):
  source = records.open_source(out, name)
  return [source[i] for i in range(len(source))]


def test_convert_writes_one_shard_per_input_and_counts_skips(tmp_path):
  cfg = _tar_dataset(tmp_path / "raw")
  shards = dataset.list_shards(cfg)
  assert [s.name for s in shards] == [f"{i:05d}.tar" for i in range(5)]
  counts = convert.convert(shards, tmp_path / "out", "train", files.fake_tokens,
                           batch_size=4)
  assert counts == {"converted": 5, "skipped_done": 0, "records": 35}
  manifest = convert.finalize(tmp_path / "out", "train", len(shards))
  assert manifest["num_records"] == 35
  assert manifest["skipped"] == {"corrupt_image": 5}
  recs = _all_records(tmp_path / "out")
  assert [r["key"] for r in recs] == [f"{s:05d}{i:04d}" for s in range(5)
                                      for i in range(7)]
  skips = json.loads((tmp_path / "out" / "train.skips.json").read_text())
  assert skips["ok"] == 35 and skips["total"] == 40
  again = convert.convert(shards, tmp_path / "out", "train", files.fake_tokens)
  assert again == {"converted": 0, "skipped_done": 5, "records": 0}


def test_two_processes_cover_the_dataset_once(tmp_path):
  cfg = _tar_dataset(tmp_path / "raw")
  shards = dataset.list_shards(cfg)
  for p in (0, 1):
    convert.convert(shards, tmp_path / "two", "train", files.fake_tokens,
                    process_index=p, process_count=2)
  convert.finalize(tmp_path / "two", "train", len(shards))
  owned = [[i for i, _ in dataset.for_process(shards, p, 2)] for p in (0, 1)]
  assert sorted(owned[0] + owned[1]) == list(range(5))
  assert not set(owned[0]) & set(owned[1])
  convert.convert(shards, tmp_path / "one", "train", files.fake_tokens)
  convert.finalize(tmp_path / "one", "train", len(shards))
  for i in range(5):
    name = convert.shard_file("train", i)
    assert (tmp_path / "two" / name).read_bytes() == (
        tmp_path / "one" / name).read_bytes()
  with pytest.raises(ValueError, match="process index 2"):
    dataset.for_process(shards, 2, 2)


def test_finalize_names_unfinished_shards(tmp_path):
  shards = dataset.list_shards(_tar_dataset(tmp_path / "raw"))
  convert.convert(shards, tmp_path / "out", "train", files.fake_tokens,
                  process_index=0, process_count=2)
  with pytest.raises(records.RecordsError, match="2 of 5 shards unfinished"):
    convert.finalize(tmp_path / "out", "train", len(shards))


_KILLABLE = r"""
import sys, time
sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
import captioned_files as t
from muse_jax.data.captioned import convert, dataset
cfg = dataset.SourceConfig(format="webdataset", path={raw!r})
def slow(batch):
  time.sleep(0.3)
  return t.fake_tokens(batch)
shards = dataset.list_shards(cfg)
convert.convert(shards, {out!r}, "train", slow, batch_size=2)
convert.finalize({out!r}, "train", len(shards))
"""


def test_sigkill_mid_way_then_restart_is_byte_identical(tmp_path):
  raw = tmp_path / "raw"
  cfg = _tar_dataset(raw, shards=4, per=8, broken=False)
  whole = tmp_path / "whole"
  convert.convert(dataset.list_shards(cfg), whole, "train", files.fake_tokens,
                  batch_size=2)
  convert.finalize(whole, "train", 4)
  out = tmp_path / "killed"
  code = _KILLABLE.format(repo=REPO, raw=str(raw), out=str(out))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
  deadline = time.time() + 120
  while not (out / "train-00001.done.json").exists():
    assert proc.poll() is None, "the conversion ended before the kill"
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "train.json").exists()
  assert not (out / "train-00003.done.json").exists()
  subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                 check=True, timeout=300)
  names = sorted(p.name for p in whole.iterdir())
  assert names == sorted(p.name for p in out.iterdir()
                         if not p.name.endswith(".tmp"))
  for name in names:
    assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_every_format_lists_shards(tmp_path):
  # parquet: one shard per file, in name order; a glob picks files.
  for i in (1, 0):
    rows = [{"key": f"p{i}{j}", "jpg": files.encode(
        files.rgb(j), "JPEG"), "caption": f"c{j}"} for j in range(3)]
    files.write_parquet(tmp_path / f"part-{i}.parquet", rows)
  cfg = dataset.SourceConfig(format="parquet",
                             path=str(tmp_path / "part-*.parquet"))
  shards = dataset.list_shards(cfg)
  assert [s.name for s in shards] == ["part-0.parquet", "part-1.parquet"]
  convert.convert(shards, tmp_path / "pq", "train", files.fake_tokens)
  assert [r["key"] for r in _all_records_after(tmp_path / "pq", 2)] == [
      "p00", "p01", "p02", "p10", "p11", "p12"]
  # folder: records_per_shard consecutive images per shard.
  (tmp_path / "imgs").mkdir()
  for j in range(5):
    files.rgb(j).save(tmp_path / "imgs" / f"{j}.png")
    (tmp_path / "imgs" / f"{j}.txt").write_text(f"image {j}")
  cfg = dataset.SourceConfig(format="folder", path=str(tmp_path / "imgs"),
                             records_per_shard=2)
  shards = dataset.list_shards(cfg)
  assert [s.name for s in shards] == ["folder-000000000", "folder-000000002",
                                      "folder-000000004"]
  convert.convert(shards, tmp_path / "fo", "train", files.fake_tokens)
  assert [r["key"] for r in _all_records_after(tmp_path / "fo", 3)] == [
      f"{j}.png" for j in range(5)]


def _all_records_after(out, num_shards):
  convert.finalize(out, "train", num_shards)
  return _all_records(out)


@pytest.mark.parametrize("kw,match", [
    ({"format": "lmdb", "path": "x"}, "format 'lmdb' not in"),
    ({"format": "webdataset", "path": ""}, "path is empty"),
    ({"format": "coco", "path": "a.json"}, "set images"),
    ({"format": "folder", "path": "x", "records_per_shard": 0},
     "records_per_shard"),
])
def test_source_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    dataset.SourceConfig(**kw)


def test_no_matching_files_is_named(tmp_path):
  cfg = dataset.SourceConfig(format="webdataset", path=str(tmp_path))
  with pytest.raises(ValueError, match="no files match"):
    dataset.list_shards(cfg)
  pq.write_table(pa.table({"x": [1]}), tmp_path / "a.parquet")
  cfg = dataset.SourceConfig(format="parquet", path=str(tmp_path))
  assert len(dataset.list_shards(cfg)) == 1


def test_a_shard_with_no_usable_record_still_reads(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  files.write_tar(raw / "00000.tar", [("a", files.valid(1))])
  (raw / "00001.tar").write_bytes(b"")
  files.write_tar(raw / "00002.tar", [("b", files.valid(2)),
                                      ("c", files.valid(3))])
  shards = dataset.list_shards(dataset.SourceConfig(format="webdataset",
                                                    path=str(raw)))
  convert.convert(shards, tmp_path / "out", "train", files.fake_tokens)
  manifest = convert.finalize(tmp_path / "out", "train", 3)
  assert manifest["records_in_shards"] == [1, 0, 2]
  assert manifest["skipped"] == {"empty_shard": 1}
  assert [r["key"] for r in _all_records(tmp_path / "out")] == ["a", "b", "c"]


def test_tfds_array_record_dataset_by_directory(tmp_path):
  """A prepared TFDS dataset (the shapes builder, array_record) read from
  its directory without its builder code."""
  from muse_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  builder = shapes_tfds.build_shapes(str(tmp_path / "tfds"), "s32",
                                     num_train=5, num_validation=2,
                                     num_heldout=2)
  cfg = dataset.SourceConfig(
      format="tfds", path=str(builder.data_path), split="train",
      image_feature="image_32", caption_feature="caption",
      records_per_shard=2)
  shards = dataset.list_shards(cfg)
  assert [s.name for s in shards] == [
      "tfds-000000000", "tfds-000000002", "tfds-000000004"]
  convert.convert(shards, tmp_path / "out", "train", files.fake_tokens)
  got = _all_records_after(tmp_path / "out", 3)
  direct = shapes_tfds.shapes_source(builder, "train")
  assert [r["key"] for r in got] == [f"train/{i}" for i in range(5)]
  assert [r["caption"] for r in got] == [
      direct[i]["caption"].decode() for i in range(5)]
  bad = dataset.SourceConfig(format="tfds", path=str(builder.data_path),
                             image_feature="pixels")
  tally = tally_lib.Tally()
  with pytest.raises(KeyError, match="no feature 'pixels'"):
    list(dataset.list_shards(bad)[0].read(tally))
  with pytest.raises(ValueError, match="cannot open it"):
    dataset.list_shards(dataset.SourceConfig(
        format="tfds", path="no_such_dataset_here",
        data_dir=str(tmp_path)))


# --- Streaming raw shards (the tokenizers' input pipeline). ---


def _keys(batches):
  return [k for b in batches for k in b["key"]]


def test_stream_two_processes_cover_each_epoch_once(tmp_path):
  from muse_jax.data.captioned import stream  # pylint: disable=g-import-not-at-top
  shards = dataset.list_shards(_tar_dataset(tmp_path / "raw", shards=6,
                                            per=4, broken=False))
  cfg = preprocess.PreprocessConfig(image_size=16, crop="random")
  seen = []
  for p in (0, 1):
    ds = stream.stream(shards, cfg, batch_size=2, seed=3, process_index=p,
                       process_count=2, num_epochs=1)
    seen.append(_keys(ds))
  everything = {f"{s:05d}{i:04d}" for s in range(6) for i in range(4)}
  assert sorted(seen[0] + seen[1]) == sorted(everything)
  assert not set(seen[0]) & set(seen[1])
  two = _keys(stream.stream(shards, cfg, batch_size=2, seed=3, num_epochs=2))
  assert sorted(two) == sorted(list(everything) * 2)
  assert two[:24] != two[24:]  # The shard order is reshuffled per epoch.
  batch = next(iter(stream.stream(shards, cfg, batch_size=2, seed=3)))
  assert batch["image"].shape == (2, 16, 16, 3)


def test_stream_resumes_on_the_exact_next_example_mid_epoch(tmp_path):
  from muse_jax.data.captioned import stream  # pylint: disable=g-import-not-at-top
  shards = dataset.list_shards(_tar_dataset(tmp_path / "raw", shards=5,
                                            per=5))
  cfg = preprocess.PreprocessConfig(image_size=16, crop="random")
  for p in (0, 1):
    def make(p=p):
      return stream.stream(shards, cfg, batch_size=2, seed=1,
                           process_index=p, process_count=2, num_epochs=2)
    full = list(make())
    it = iter(make())
    for _ in range(3):  # Mid-shard, mid-epoch.
      next(it)
    state = it.get_state()
    resumed = iter(make())
    resumed.set_state(json.loads(json.dumps(state)))
    rest = list(resumed)
    assert _keys(rest) == _keys(full[3:])
    for a, b in zip(rest, full[3:]):
      np.testing.assert_array_equal(a["image"], b["image"])


def test_stream_errors(tmp_path):
  from muse_jax.data.captioned import stream  # pylint: disable=g-import-not-at-top
  shards = dataset.list_shards(_tar_dataset(tmp_path / "raw", shards=1))
  with pytest.raises(ValueError, match="process 1 of 2 owns no shard"):
    stream.stream(shards, preprocess.PreprocessConfig(image_size=16),
                  batch_size=2, seed=0, process_index=1, process_count=2)


def test_stream_worker_processes_split_the_shards(tmp_path):
  from muse_jax.data.captioned import stream  # pylint: disable=g-import-not-at-top
  shards = dataset.list_shards(_tar_dataset(tmp_path / "raw", shards=4,
                                            per=4, broken=False))
  cfg = preprocess.PreprocessConfig(image_size=16)
  keys = _keys(stream.stream(shards, cfg, batch_size=2, seed=0,
                             num_epochs=1, num_workers=2))
  assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(4)
                                for i in range(4))


# --- Remote paths: the same file layer (etils.epath) as local ones. ---


@pytest.fixture
def fake_bucket():
  """`gs://` served from memory: an fsspec file system registered under
  gcsfs's names, which epath's gs:// paths then use (no network)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from fsspec.implementations import memory  # pylint: disable=g-import-not-at-top

  class FakeGcs(memory.MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=False, **kwargs):
      del finalize_on_close  # gcsfs's option.
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
      return path.rstrip("/")

  registry = sys.modules["fsspec.registry"]  # (fsspec.registry: a mapping)
  saved = {n: registry._registry.get(n) for n in ("gs", "gcs")}  # pylint: disable=protected-access
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGcs, clobber=True)
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield "gs://bucket"
  FakeGcs.store.clear()
  for name, cls in saved.items():
    if cls is None:
      registry._registry.pop(name, None)  # pylint: disable=protected-access
    else:
      fsspec.register_implementation(name, cls, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _upload(local, remote):
  from etils import epath  # pylint: disable=g-import-not-at-top
  for root, _, names in os.walk(local):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local)
      target = epath.Path(remote) / rel
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(open(os.path.join(root, name), "rb").read())


@pytest.mark.parametrize("fmt", ("webdataset", "parquet", "coco"))
def test_gs_paths_read_and_convert_like_local_ones(tmp_path, fake_bucket,
                                                   fmt):
  examples = files.shapes_examples("train", 10)
  local = files.write_format(tmp_path / "raw", fmt, examples, per_shard=4)
  _upload(tmp_path / "raw", f"{fake_bucket}/raw")
  remote = {k: (v.replace(str(tmp_path / "raw"), f"{fake_bucket}/raw")
                if isinstance(v, str) else v) for k, v in local.items()}
  outs = []
  for where, kw in (("local", local), ("remote", remote)):
    cfg = dataset.SourceConfig(format=fmt, **kw)
    shards = dataset.list_shards(cfg)
    out = (str(tmp_path / "out") if where == "local"
           else f"{fake_bucket}/out")
    convert.convert(shards, out, "train", files.fake_tokens, batch_size=3)
    outs.append(convert.finalize(out, "train", len(shards)))
    if where == "remote":
      from etils import epath  # pylint: disable=g-import-not-at-top
      names = sorted(p.name for p in epath.Path(out).iterdir())
      local_names = sorted(os.listdir(tmp_path / "out"))
      assert names == local_names
      for name in names:
        assert (epath.Path(out) / name).read_bytes() == open(
            tmp_path / "out" / name, "rb").read(), name
  assert outs[0]["num_records"] == outs[1]["num_records"] == 10
