"""Tests of the compositional shapes dataset (muse_jax.data.shapes)."""

import dataclasses
import re

import numpy as np
import pytest

from muse_jax.data import shapes
from muse_jax.evaluation import shapes_scorer

_HELDOUT_WORDS = re.compile(
    r"\b(purple circle|orange square|cyan triangle)s?\b")


def _scenes(split, n, seed=0):
  return [shapes.sample_scene(split, i, seed) for i in range(n)]


def test_deterministic_from_split_index_seed():
  for split in shapes.SPLITS:
    for i in range(12):
      a = shapes.example(split, i, seed=5, sizes=(32,))
      b = shapes.example(split, i, seed=5, sizes=(32,))
      assert a["caption"] == b["caption"]
      np.testing.assert_array_equal(a["image_32"], b["image_32"])
      np.testing.assert_array_equal(a["centers"], b["centers"])
  # Different seeds and different splits give different streams.
  base = _scenes("train", 30, seed=0)
  assert sum(a != b for a, b in zip(base, _scenes("train", 30, seed=1))) >= 25
  assert sum(a != b for a, b in zip(base, _scenes("validation", 30))) >= 25


def test_scene_type_mix_and_structure():
  for split in shapes.SPLITS:
    scenes = _scenes(split, 90)
    for i, s in enumerate(scenes):
      assert s.scene_type == shapes.SCENE_TYPES[i % 3]
      n = len(s.objects)
      assert 1 <= n <= shapes.MAX_OBJECTS
      for o in s.objects:
        # Centres snap to the 1/GRID grid (token corners at 64 px, f=8).
        g = shapes.GRID
        assert all(abs(c * g - round(c * g)) < 1e-9 for c in o.center)
      if s.scene_type == "single":
        assert n == 1 and s.relation is None
      elif s.scene_type == "count":
        assert 2 <= n <= 4 and s.relation is None
        assert len({(o.color, o.shape) for o in s.objects}) == 1
      else:
        assert n == 2 and s.relation in shapes.RELATIONS
        a, b = s.objects
        assert (a.color, a.shape) != (b.color, b.shape)
        assert shapes.relation_holds(a.center, b.center, s.relation)
        # ... and clearly not any other relation.
        others = [r for r in shapes.RELATIONS if r != s.relation]
        assert not any(shapes.relation_holds(a.center, b.center, r)
                       for r in others)
    assert {len(s.objects) for s in scenes if s.scene_type == "count"} == {
        2, 3, 4}
    assert {s.background for s in scenes} == {"black", "gray"}


@pytest.mark.parametrize("size", [32, 64])
def test_exact_fill_colors(size):
  for split in ("train", "heldout"):
    for i in range(45):
      scene = shapes.sample_scene(split, i)
      img = shapes.render(scene, size)
      assert img.shape == (size, size, 3) and img.dtype == np.uint8
      covered = np.zeros((size, size), bool)
      for o in scene.objects:
        cov = shapes.object_coverage(o, size)
        interior = cov == 1.0
        assert interior.sum() >= 4, (split, i, o)
        np.testing.assert_array_equal(
            img[interior], np.broadcast_to(shapes.COLORS[o.color],
                                           (interior.sum(), 3)))
        covered |= cov > 0
      np.testing.assert_array_equal(
          img[~covered], np.broadcast_to(shapes.BACKGROUNDS[scene.background],
                                         ((~covered).sum(), 3)))


def _touched_box(cov):
  rows = np.nonzero(cov.any(axis=1))[0]
  cols = np.nonzero(cov.any(axis=0))[0]
  return rows[0], rows[-1], cols[0], cols[-1]


@pytest.mark.parametrize("size,n", [(32, 150), (64, 150), (128, 30), (256, 15)])
def test_no_overlap_and_margins_at_every_size(size, n):
  margin = size // 32
  scenes = [s for split in shapes.SPLITS for s in _scenes(split, n)]
  # Include the densest layouts (four large objects) explicitly.
  scenes += [s for s in _scenes("train", 600)
             if s.scene_type == "count" and len(s.objects) == 4 and
             all(o.size == "large" for o in s.objects)][:5]
  for scene in scenes:
    boxes = []
    for o in scene.objects:
      cov = shapes.object_coverage(o, size)
      assert cov.sum() > 0
      r0, r1, c0, c1 = _touched_box(cov)
      # At least `margin` untouched pixels to every border.
      assert min(r0, c0) >= margin and max(r1, c1) <= size - 1 - margin, (
          scene, size)
      boxes.append((r0, r1, c0, c1))
    for i in range(len(boxes)):
      for j in range(i + 1, len(boxes)):
        a, b = boxes[i], boxes[j]
        row_gap = max(b[0] - a[1], a[0] - b[1]) - 1
        col_gap = max(b[2] - a[3], a[2] - b[3]) - 1
        assert max(row_gap, col_gap) >= margin, (scene, size)


def _has_heldout_pair(scene):
  return any((o.color, o.shape) in shapes.HELDOUT_PAIRS for o in scene.objects)


def test_heldout_pairs_absent_from_train_and_validation():
  assert {("purple", "circle"), ("orange", "square"),
          ("cyan", "triangle")} <= shapes.HELDOUT_PAIRS
  for split in ("train", "validation"):
    for i in range(300):
      ex = shapes.example(split, i, sizes=(32,))
      scene = shapes.scene_from_arrays(ex)
      assert not _has_heldout_pair(scene), (split, i)
      assert not _HELDOUT_WORDS.search(ex["caption"]), ex["caption"]
      if i < 60:  # The image itself, as the scorer sees it.
        dets = shapes_scorer.detect_objects(ex["image_32"])
        assert not any((d.color, d.shape) in shapes.HELDOUT_PAIRS
                       for d in dets), (split, i)
  # All training pairs are actually used.
  seen = {(o.color, o.shape) for s in _scenes("train", 300) for o in s.objects}
  assert seen == set(shapes.TRAIN_PAIRS)


def test_every_heldout_example_has_a_heldout_pair():
  for i in range(300):
    ex = shapes.example("heldout", i, sizes=(32,))
    assert _has_heldout_pair(shapes.scene_from_arrays(ex)), i
    assert _HELDOUT_WORDS.search(ex["caption"]), ex["caption"]


def _check_caption(scene, text):
  assert text == text.lower() and text.strip() == text
  req = shapes_scorer.parse_prompt(text)
  bg = req.background or "black"
  assert bg == scene.background, text
  if scene.background == "gray":
    assert "gray background" in text
  objs = scene.objects
  if scene.scene_type == "relation":
    assert req.relation == scene.relation
    assert len(req.objects) == 2
    for r, o in zip(req.objects, objs):
      assert (r.color, r.shape) == (o.color, o.shape), text
      assert r.size in (None, o.size) and r.count is None
  elif scene.scene_type == "count":
    (r,) = req.objects
    assert r.count == len(objs) and req.relation is None
    assert all((r.color, r.shape) == (o.color, o.shape) for o in objs)
    assert r.size is None or all(o.size == r.size for o in objs), text
  else:
    (r,) = req.objects
    assert (r.color, r.shape) == (objs[0].color, objs[0].shape)
    assert r.size in (None, objs[0].size) and r.count is None


def test_captions_match_scenes():
  for split in shapes.SPLITS:
    for i, scene in enumerate(_scenes(split, 60)):
      for t in range(shapes.num_templates(scene.scene_type)):
        _check_caption(scene, shapes.caption(scene, t))
    for i in range(150):
      ex = shapes.example(split, i, sizes=(32,))
      _check_caption(shapes.sample_scene(split, i), ex["caption"])


def test_caption_examples_and_variety():
  scene = shapes.Scene("single", "gray", (
      shapes.SceneObject("circle", "red", "large", (0.5, 0.5)),))
  texts = {shapes.caption(scene, t) for t in range(6)}
  assert "a large red circle on a gray background" in texts
  assert "a red circle on a gray background" in texts
  rel = shapes.Scene("relation", "black", (
      shapes.SceneObject("triangle", "white", "large", (0.5, 0.25)),
      shapes.SceneObject("circle", "cyan", "small", (0.5, 0.75))), "above")
  texts = {shapes.caption(rel, t) for t in range(6)}
  assert "a white triangle above a cyan circle" in texts
  assert "a large white triangle above a small cyan circle" in texts
  # Captions vary across examples: sizes and backgrounds named sometimes.
  caps = [shapes.example("train", i, sizes=(32,))["caption"] for i in range(90)]
  assert len(set(caps)) > 80
  assert any("small" in c or "large" in c for c in caps)
  assert any(not ("small" in c or "large" in c) for c in caps)
  assert any("black background" in c for c in caps)


def _box_downsample(img, f):
  s = img.shape[0] // f
  return img.astype(np.float64).reshape(s, f, s, f, 3).mean(axis=(1, 3))


def test_same_scene_renders_at_two_sizes():
  for i in range(30):
    ex = shapes.example("validation", i, sizes=(32, 64, 256))
    # Supersampled coverage is a box filter, so box-downsampling the larger
    # rendering reproduces the smaller one up to rounding.
    for big, small, f in (("image_64", "image_32", 2),
                          ("image_256", "image_64", 4)):
      diff = np.abs(_box_downsample(ex[big], f) - ex[small])
      assert diff.max() <= 2 and diff.mean() <= 0.1, (i, diff.max())


def test_scene_arrays_round_trip_and_padding():
  for i in range(30):
    scene = shapes.sample_scene("train", i)
    arr = shapes.scene_arrays(scene)
    n = len(scene.objects)
    assert int(arr["num_objects"]) == n
    for k in ("shape_ids", "color_ids", "size_ids"):
      assert arr[k].shape == (4,) and arr[k].dtype == np.int32
      assert (arr[k][n:] == -1).all() and (arr[k][:n] >= 0).all()
    assert arr["centers"].shape == (4, 2) and (arr["centers"][n:] == -1).all()
    assert shapes.scene_from_arrays(arr) == scene


def test_rejects_bad_inputs():
  with pytest.raises(ValueError, match="split"):
    shapes.sample_scene("test", 0)
  with pytest.raises(ValueError, match="size"):
    shapes.render(shapes.sample_scene("train", 0), 48)
  bad = dataclasses.replace(shapes.sample_scene("train", 0).objects[0],
                            shape="star")
  with pytest.raises(ValueError, match="star"):
    shapes.render(shapes.Scene("single", "black", (bad,)), 32)
