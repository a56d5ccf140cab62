"""Tests of the geometric shapes scorer (muse_jax.evaluation.shapes_scorer)."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from muse_jax.data import shapes
from muse_jax.evaluation import shapes_scorer as scorer

_NUM_GT = 300


@pytest.mark.parametrize("split", ["validation", "heldout"])
@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_scores_at_least_99_percent(split, size):
  scores, types = [], []
  for i in range(_NUM_GT):
    ex = shapes.example(split, i, sizes=(size,))
    scores.append(scorer.score(ex[shapes.image_key(size)], ex["caption"]))
    types.append(int(ex["scene_type"]))
  agg = scorer.aggregate(scores, types)
  assert agg["accuracy/overall"] >= 0.99, agg
  for t in shapes.SCENE_TYPES:
    assert agg[f"num/{t}"] == _NUM_GT // 3
    assert agg[f"accuracy/{t}"] >= 0.97, agg
  # Every check was exercised.
  assert {"check/present", "check/count", "check/size", "check/relation",
          "check/background"} <= set(agg)


def test_detections_match_ground_truth_scene():
  for size in (32, 128):
    for i in range(30):
      scene = shapes.sample_scene("train", i)
      dets = scorer.detect_objects(shapes.render(scene, size))
      assert len(dets) == len(scene.objects), (i, size, dets)
      for o in scene.objects:
        d = min(dets, key=lambda d: np.hypot(d.center[0] - o.center[0],
                                             d.center[1] - o.center[1]))
        assert (d.color, d.shape, d.size) == (o.color, o.shape, o.size)
        np.testing.assert_allclose(d.center, o.center, atol=0.03)


def _scene_of(split, scene_type, n, start=0):
  """The first `n` scenes of `scene_type` with their captions."""
  out, i = [], start
  while len(out) < n:
    if i % 3 == shapes.SCENE_TYPES.index(scene_type):
      out.append((shapes.sample_scene(split, i), i))
    i += 1
  return out


def _replace_obj(scene, k, **kw):
  objs = list(scene.objects)
  objs[k] = dataclasses.replace(objs[k], **kw)
  return dataclasses.replace(scene, objects=tuple(objs))


def _assert_all_wrong(pairs, size=64, key="correct"):
  for image, text in pairs:
    result = scorer.score(image, text)
    assert not result[key], (text, result, scorer.detect_objects(image))


def test_swapped_color_is_incorrect():
  pairs = []
  for scene, _ in _scene_of("validation", "single", 15) + _scene_of(
      "validation", "relation", 15):
    text = shapes.caption(scene, 0)
    obj = scene.objects[0]
    # Each colour's nearest palette neighbours are the hardest swaps.
    for other in ("orange", "yellow", "red", "purple", "blue"):
      if other != obj.color:
        pairs.append((shapes.render(_replace_obj(scene, 0, color=other), 64),
                      text))
  _assert_all_wrong(pairs)


def test_swapped_shape_is_incorrect():
  pairs = []
  for size in (32, 64):
    for scene, _ in _scene_of("validation", "single", 20):
      text = shapes.caption(scene, 1)
      for other in shapes.SHAPES:
        if other != scene.objects[0].shape:
          pairs.append((shapes.render(
              _replace_obj(scene, 0, shape=other), size), text))
  _assert_all_wrong(pairs)


def test_missing_object_is_incorrect():
  pairs = []
  for scene, _ in _scene_of("heldout", "relation", 20):
    text = shapes.caption(scene, 0)
    for keep in range(2):
      pairs.append((shapes.render(dataclasses.replace(
          scene, objects=(scene.objects[keep],)), 64), text))
  for scene, _ in _scene_of("validation", "single", 10):
    pairs.append((shapes.render(dataclasses.replace(scene, objects=()), 64),
                  shapes.caption(scene, 0)))
  _assert_all_wrong(pairs)


def test_wrong_count_is_incorrect():
  pairs = []
  for scene, _ in _scene_of("validation", "count", 20):
    n = len(scene.objects)
    text = shapes.caption(scene, 1)
    # The image lacks one object...
    pairs.append((shapes.render(dataclasses.replace(
        scene, objects=scene.objects[:-1]), 64), text))
    # ... or the prompt asks for another number.
    img = shapes.render(scene, 64)
    for m in range(2, 5):
      if m != n:
        wrong = text.replace(shapes.NUMBER_WORDS[n - 1],
                             shapes.NUMBER_WORDS[m - 1], 1)
        pairs.append((img, wrong))
  _assert_all_wrong(pairs)
  _assert_all_wrong(pairs, key="count")


_MIRROR = {"left of": "right of", "right of": "left of", "above": "below",
           "below": "above"}


def test_mirrored_relation_is_incorrect():
  pairs = []
  for scene, _ in _scene_of("heldout", "relation", 30):
    img = shapes.render(scene, 64)
    mirrored = dataclasses.replace(scene, relation=_MIRROR[scene.relation])
    pairs.append((img, shapes.caption(mirrored, 0)))
    if scene.relation in ("left of", "right of"):
      # The mirror image under the original prompt.
      pairs.append((img[:, ::-1].copy(), shapes.caption(scene, 0)))
  _assert_all_wrong(pairs)
  _assert_all_wrong(pairs, key="relation")


def test_wrong_size_and_background_are_incorrect():
  pairs = []
  for scene, _ in _scene_of("validation", "single", 20):
    img = shapes.render(scene, 64)
    obj = scene.objects[0]
    other = "small" if obj.size == "large" else "large"
    pairs.append((img, shapes.caption(_replace_obj(scene, 0, size=other), 0)))
    bg = "black" if scene.background == "gray" else "gray"
    pairs.append((img, shapes.caption(
        dataclasses.replace(scene, background=bg), 2)))
  _assert_all_wrong(pairs, key="correct_strict")


def _degrade(img, rng, blur_px, shift, noise):
  x = ndimage.gaussian_filter(img.astype(np.float32),
                              sigma=(blur_px, blur_px, 0))
  x += rng.uniform(-shift, shift, size=3) + rng.normal(0, noise, x.shape)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_robust_to_blur_color_shift_noise_and_speckles():
  rng = np.random.default_rng(0)
  scores, types = [], []
  for i in range(90):
    ex = shapes.example("heldout", i, sizes=(64,))
    img = _degrade(ex["image_64"], rng, blur_px=0.8, shift=12, noise=5)
    for _ in range(4):  # Isolated speckles of random colours.
      r, c = rng.integers(0, 62, size=2)
      img[r:r + 2, c:c + 2] = rng.integers(0, 256, size=3)
    scores.append(scorer.score(img, ex["caption"]))
    types.append(ex["scene_type"])
  assert scorer.aggregate(scores, types)["accuracy/overall"] >= 0.95


def test_faint_tinted_box_around_a_circle_keeps_it_a_circle():
  # Decoders of f=8 tokenizers leave a faint tint over the whole token patch
  # around a small object; a human still sees a circle, so must the scorer.
  scene = shapes.Scene(
      scene_type="single", background="gray",
      objects=(shapes.SceneObject("circle", "red", "small", (0.5, 0.5)),))
  img = shapes.render(scene, 64).astype(np.float32)
  bg = np.asarray(shapes.BACKGROUNDS["gray"], np.float32)
  red = np.asarray(shapes.COLORS["red"], np.float32)
  box = np.zeros((64, 64), bool)
  box[24:40, 24:40] = True
  tint = box & np.all(img == bg, axis=-1)
  img[tint] = bg + 0.2 * (red - bg)
  (det,) = scorer.detect_objects(img.astype(np.uint8))
  assert (det.color, det.shape, det.size) == ("red", "circle", "small")


def test_parse_prompt():
  req = scorer.parse_prompt("A large red circle.")
  assert req.objects == (scorer.ObjectRequest("red", "circle", "large"),)
  assert req.scene_type == "single" and req.background is None
  req = scorer.parse_prompt("an image of three small green circles on a gray "
                            "background")
  assert req.objects == (scorer.ObjectRequest("green", "circle", "small", 3),)
  assert req.background == "gray" and req.scene_type == "count"
  req = scorer.parse_prompt("a white triangle above a small cyan circle")
  assert req.relation == "above" and req.scene_type == "relation"
  assert req.objects[1] == scorer.ObjectRequest("cyan", "circle", "small")
  req = scorer.parse_prompt("a red circle to the left of a blue square")
  assert req.relation == "left of"


@pytest.mark.parametrize("prompt", [
    "a green banana", "two red circle", "a red circles", "hello world",
    "a red circle above a blue square below a green triangle", "",
    "five red circles",
])
def test_unparseable_prompt_raises_naming_it(prompt):
  with pytest.raises(ValueError) as info:
    scorer.parse_prompt(prompt)
  assert repr(prompt) in str(info.value)


def test_aggregate():
  scores = [{"present": True, "correct": True},
            {"present": False, "correct": False},
            {"present": True, "count": True, "correct": True},
            {"present": True, "relation": False, "correct": False}]
  agg = scorer.aggregate(scores, ["single", "single", 1, "relation"])
  assert agg["accuracy/single"] == 0.5
  assert agg["accuracy/count"] == 1.0
  assert agg["accuracy/relation"] == 0.0
  assert agg["accuracy/overall"] == 0.5
  assert agg["check/present"] == 0.75 and agg["check/relation"] == 0.0
  with pytest.raises(ValueError):
    scorer.aggregate(scores, ["single"])
