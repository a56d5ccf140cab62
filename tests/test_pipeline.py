"""Tests of the shapes TFDS builder and the grain input pipeline."""

import json
import os

import numpy as np
import pytest

from muse_jax.data import pipeline
from muse_jax.data import shapes
from muse_jax.data import shapes_tfds

_NUM = {"train": 48, "validation": 12, "heldout": 12}


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return shapes_tfds.build_shapes(
      data_dir, "s32_64", num_train=_NUM["train"],
      num_validation=_NUM["validation"], num_heldout=_NUM["heldout"], seed=3)


def _files(root):
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, fs in os.walk(root) for f in fs}


def test_build_is_idempotent_and_sized(builder):
  assert builder.name == "shapes_compositional"
  assert builder.builder_config.sizes == (32, 64)
  for split, n in _NUM.items():
    assert builder.info.splits[split].num_examples == n
  before = _files(builder.data_dir)
  again = shapes_tfds.build_shapes(
      os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir))),
      "s32_64", num_train=48, num_validation=12, num_heldout=12, seed=3)
  assert again.data_dir == builder.data_dir
  assert _files(builder.data_dir) == before  # Nothing rewritten.


def test_records_equal_generated_examples(builder):
  for split in shapes.SPLITS:
    src = shapes_tfds.shapes_source(builder, split)
    assert len(src) == _NUM[split]
    for i in (0, 1, 2, len(src) - 1):
      rec = src[i]
      ex = shapes.example(split, i, seed=3, sizes=(32, 64))
      assert int(rec["index"]) == i
      assert rec["caption"].decode() == ex["caption"]
      for key in ("image_32", "image_64", "shape_ids", "color_ids",
                  "size_ids", "centers"):
        np.testing.assert_array_equal(rec[key], ex[key])
      for key in ("scene_type", "num_objects", "relation", "background"):
        assert int(rec[key]) == int(ex[key])


def test_grain_batches_from_tfds(builder):
  src = shapes_tfds.shapes_source(builder, "train")
  it = pipeline.make_iterator(src, batch_size=8, seed=0, num_epochs=1,
                              process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == _NUM["train"] // 8
  b = batches[0]
  for s in (32, 64):
    assert b[f"image_{s}"].shape == (8, s, s, 3)
    assert b[f"image_{s}"].dtype == np.uint8
  assert b["centers"].shape == (8, 4, 2) and b["centers"].dtype == np.float32
  assert b["shape_ids"].shape == (8, 4) and b["shape_ids"].dtype == np.int32
  assert b["caption"].shape == (8,)
  seen = np.concatenate([b["index"] for b in batches])
  assert sorted(seen.tolist()) == list(range(_NUM["train"]))
  assert seen.tolist() != list(range(_NUM["train"]))  # Shuffled.


def test_default_process_is_this_process(builder):
  src = shapes_tfds.shapes_source(builder, "validation")
  it = pipeline.make_iterator(src, batch_size=4, seed=0, num_epochs=1,
                              shuffle=False)  # jax: process 0 of 1.
  got = np.concatenate([b["index"] for b in it])
  np.testing.assert_array_equal(got, np.arange(_NUM["validation"]))


def test_tfds_processes_are_disjoint_and_cover(builder):
  src = shapes_tfds.shapes_source(builder, "train")
  parts = []
  for k in range(3):  # Global batches of 12: four per process and epoch.
    it = pipeline.make_iterator(src, batch_size=12, seed=7, num_epochs=1,
                                process_index=k, process_count=3)
    batches = list(it)
    assert len(batches) == 4 and all(len(b["index"]) == 4 for b in batches)
    parts.append(np.concatenate([b["index"] for b in batches]).tolist())
  assert sorted(sum(parts, [])) == list(range(_NUM["train"]))


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_exact_resume_tfds(builder):
  src = shapes_tfds.shapes_source(builder, "train")
  make = lambda: pipeline.make_iterator(src, batch_size=5, seed=11,
                                        process_index=0, process_count=1)
  it = make()
  for _ in range(7):  # Crosses an epoch boundary (48 records, 5 per batch).
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(12)]
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(12)], expected)


# ---------------------------------------------------------------------------
# Per-process slices of global batches, on an in-memory source.
# ---------------------------------------------------------------------------

_N = 48  # Records; global batches of 8: six per epoch.
_GLOBAL = 8


@pytest.fixture(scope="module")
def source():
  return pipeline.ArraySource({
      "i": np.arange(_N),
      "tokens": np.arange(_N * 3).reshape(_N, 3).astype(np.int32)})


def _iterator(src, p, count, **kw):
  kw = {"batch_size": _GLOBAL, "seed": 5, "num_epochs": 1, **kw}
  return pipeline.make_iterator(src, process_index=p, process_count=count,
                                **kw)


def _concat_rows(per_process):
  """Per-process lists of batches -> global batches (rows in process order)."""
  return [{k: np.concatenate([b[k] for b in group]) for k in group[0]}
          for group in zip(*per_process)]


@pytest.mark.parametrize("count", [2, 4])
def test_processes_concatenate_to_single_process_batches(source, count):
  single = list(_iterator(source, 0, 1))
  assert len(single) == _N // _GLOBAL
  per_process = [list(_iterator(source, p, count)) for p in range(count)]
  for batches in per_process:  # Lock step: equally many, equally big.
    assert len(batches) == len(single)
    assert all(b["i"].shape == (_GLOBAL // count,) for b in batches)
    assert all(b["tokens"].shape == (_GLOBAL // count, 3) for b in batches)
  _assert_batches_equal(_concat_rows(per_process), single)
  # Process p holds rows [p*b, (p+1)*b) of every global batch.
  b = _GLOBAL // count
  for p, batches in enumerate(per_process):
    for got, whole in zip(batches, single):
      np.testing.assert_array_equal(got["i"], whole["i"][p * b:(p + 1) * b])
  # The union over an epoch is the dataset, with no overlap.
  seen = np.concatenate([x["i"] for batches in per_process for x in batches])
  assert len(seen) == _N and sorted(seen.tolist()) == list(range(_N))
  assert seen.tolist() != list(range(_N))  # Shuffled.


@pytest.mark.parametrize("count", [2, 4])
def test_processes_resume_exactly_mid_epoch(source, count):
  per_process = [list(_iterator(source, p, count)) for p in range(count)]
  consumed = 2  # Of the six batches in the epoch.
  resumed_batches = []
  for p in range(count):
    it = _iterator(source, p, count)
    before = [next(it) for _ in range(consumed)]
    state = json.loads(json.dumps(it.get_state()))
    fresh = _iterator(source, p, count)
    fresh.set_state(state)
    after = list(fresh)
    _assert_batches_equal(before + after, per_process[p])
    resumed_batches.append(before + after)
  seen = np.concatenate([x["i"] for bs in resumed_batches for x in bs])
  assert len(seen) == _N and sorted(seen.tolist()) == list(range(_N))


def test_infinite_stream_matches_over_processes(source):
  """Without num_epochs, global batches cross epochs the same way."""
  take = lambda it, n: [next(it) for _ in range(n)]
  single = take(_iterator(source, 0, 1, num_epochs=None, batch_size=10), 12)
  parts = [take(_iterator(source, p, 2, num_epochs=None, batch_size=10), 12)
           for p in range(2)]
  _assert_batches_equal(_concat_rows(parts), single)
  first = np.concatenate([b["i"] for b in single])[:2 * _N]
  assert sorted(first[:_N].tolist()) == list(range(_N))  # Epoch 0 ...
  assert sorted(first[_N:].tolist()) == list(range(_N))  # ... then epoch 1.
  assert first[:_N].tolist() != first[_N:].tolist()


def test_batch_must_split_over_processes(source):
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    _iterator(source, 0, 3)
  with pytest.raises(ValueError, match="bad process 2 of 2"):
    _iterator(source, 2, 2)
  with pytest.raises(ValueError, match="batch_size must be positive"):
    _iterator(source, 0, 1, batch_size=0)
  with pytest.raises(ValueError, match="no global batch"):
    _iterator(pipeline.ArraySource({"i": np.arange(5)}), 0, 2)
  with pytest.raises(ValueError, match="drop_remainder=False"):
    pipeline.make_iterator(source, batch_size=8, seed=0, num_epochs=1,
                           drop_remainder=False, process_index=0,
                           process_count=2)


def test_uneven_sources_give_equal_processes():
  src = pipeline.ArraySource({"i": np.arange(11)})
  ds = pipeline.make_dataset(src, seed=0, num_epochs=1)
  assert len(ds) == 11  # The global stream, unbatched.
  lens = [len(pipeline.process_batches(ds, 4, process_index=k,
                                       process_count=4)) for k in range(4)]
  assert lens == [2, 2, 2, 2]  # Two whole global batches; 3 records left.
  lens = [len(pipeline.process_batches(ds, 4, process_index=k,
                                       process_count=2)) for k in range(2)]
  assert lens == [2, 2]


def test_exact_resume_array_source_with_transform():
  arrays = {"tokens": np.arange(40 * 3).reshape(40, 3).astype(np.int32),
            "label": np.arange(40)}
  src = pipeline.ArraySource(arrays)
  add = lambda r: {**r, "twice": r["label"] * 2}
  make = lambda: pipeline.make_iterator(src, batch_size=12, seed=2,
                                        transform=add, process_index=1,
                                        process_count=2, num_threads=2)
  it = make()
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state
  expected = [next(it) for _ in range(10)]  # Crosses epoch boundaries.
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(10)], expected)
  # A fresh iterator replays the same order from the start.
  _assert_batches_equal([next(make()) for _ in range(1)], first[:1])
  b = first[0]
  assert b["tokens"].shape == (6, 3) and b["tokens"].dtype == np.int32
  np.testing.assert_array_equal(b["twice"], b["label"] * 2)
  np.testing.assert_array_equal(b["tokens"][:, 0], b["label"] * 3)
  # Process 1 of 2: the second half of the global batch.
  whole = next(pipeline.make_iterator(src, batch_size=12, seed=2,
                                      transform=add, process_index=0,
                                      process_count=1))
  np.testing.assert_array_equal(b["label"], whole["label"][6:])


def test_each_epoch_is_a_new_permutation():
  src = pipeline.ArraySource({"i": np.arange(12)})
  it = pipeline.make_iterator(src, batch_size=12, seed=0, num_epochs=3,
                              process_index=0, process_count=1)
  epochs = [b["i"].tolist() for b in it]
  assert len(epochs) == 3
  assert all(sorted(e) == list(range(12)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3


def test_array_source_validation():
  with pytest.raises(ValueError, match="equal lengths"):
    pipeline.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})
  src = pipeline.ArraySource({"a": np.arange(3)})
  assert len(src) == 3 and int(src[2]["a"]) == 2
  with pytest.raises(IndexError):
    src[3]


def test_random_transform_is_reproducible_and_resumes_exactly():
  """Augmentations (e.g. the tokenizers' random crops) are a function of
  the seed and the example's position: replayed and resumed exactly, and
  different in every epoch."""
  src = pipeline.ArraySource({"label": np.arange(10)})
  jitter = lambda r, rng: {**r, "u": rng.uniform()}
  make = lambda: pipeline.make_iterator(src, batch_size=5, seed=4,
                                        random_transform=jitter,
                                        num_threads=1)
  it = make()
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(4)], expected)
  again = make()
  _assert_batches_equal([next(again) for _ in range(2)], first)
  draws = {}
  for batch in first + expected[:2]:  # Two epochs.
    for label, u in zip(batch["label"], batch["u"]):
      draws.setdefault(int(label), []).append(float(u))
  assert all(len(set(v)) == 2 for v in draws.values())
