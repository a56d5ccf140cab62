"""seqio Tasks over captioned shards (needs the `data` extra: runs where
tensorflow and seqio are installed, `pip install -e .[data]`)."""

from __future__ import annotations

import os

import pytest

seqio = pytest.importorskip("seqio")

import captioned_files as cf  # pylint: disable=g-import-not-at-top,wrong-import-position
from muse_jax.data import seqio_tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
from muse_jax.data.captioned import dataset  # pylint: disable=g-import-not-at-top,wrong-import-position

SPM = os.path.join(os.path.dirname(__file__), "golden", "t5_tiny",
                   "spiece.model")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  root = tmp_path_factory.mktemp("seqio")
  examples = {split: cf.shapes_examples(split, n)
              for split, n in (("train", 20), ("validation", 6))}
  sources = {}
  for split, ex in examples.items():
    cf.write_format(root / split, "webdataset", ex, per_shard=4)
    sources[split] = dataset.SourceConfig(format="webdataset",
                                          path=str(root / split))
  # One corrupt record among the valid ones: skipped and counted.
  cf.write_tar(root / "train" / "99999.tar",
               [("broken", {"jpg": b"not a jpeg", "txt": b"caption"})])
  t = seqio_tasks.register("test_captioned", sources, image_size=32,
                           vocabulary=SPM)
  return t, examples


def _read(task, split, length=256, **kw):
  ds = task.get_dataset({"caption": length}, split=split, **kw)
  return [{k: v for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def test_every_valid_record_once_with_t5_ids(task):
  t, examples = task
  vocab = seqio.SentencePieceVocabulary(SPM)
  got = _read(t, "train", shuffle=False)
  assert sorted(e["key"].decode() for e in got) == sorted(
      k for k, _, _ in examples["train"])
  captions = {k: c[0] for k, _, c in examples["train"]}
  for e in got:
    text = e["caption_pretokenized"].decode()
    assert text == captions[e["key"].decode()]
    assert e["caption"][-1] == vocab.eos_id  # EOS appended.
    assert vocab.decode(e["caption"].tolist()) == text
    assert e["image"].shape == (32, 32, 3) and e["image"].dtype.name == "uint8"
  assert len(_read(t, "validation", shuffle=False)) == 6
  short = _read(t, "train", length=8, shuffle=False)
  assert all(len(e["caption"]) == 8 and e["caption"][-1] == vocab.eos_id
             for e in short)  # Trimmed to the length, EOS kept.


def test_hosts_split_the_shards(task):
  t, examples = task
  keys = []
  for i in range(2):
    got = _read(t, "train", shuffle=True, seed=3,
                shard_info=seqio.ShardInfo(index=i, num_shards=2))
    keys.append([e["key"].decode() for e in got])
  assert not set(keys[0]) & set(keys[1])
  assert sorted(keys[0] + keys[1]) == sorted(k for k, _, _ in
                                             examples["train"])


def test_an_unknown_split_is_named(task):
  t, _ = task
  with pytest.raises(ValueError, match="'test'"):
    _read(t, "test")
