"""Edit cases with checkable goals (evaluation.edit_scores)."""

import dataclasses

import numpy as np
import pytest

from muse_jax.data import shapes
from muse_jax.evaluation import edit_scores


@pytest.fixture(scope="module")
def scenes():
  out = []
  for i in range(60):
    ex = shapes.example("validation", i, 0, (128,))
    out.append((i, shapes.scene_from_arrays(ex), str(ex["caption"]),
                ex[shapes.image_key(128)]))
  return out


def _cases(mode, scenes, num=8):
  return edit_scores.make_cases(mode, [s[:3] for s in scenes], size=128,
                                cell=16, num=num, seed=0)


def test_replace_object_fixes_the_article():
  old = shapes.SceneObject("circle", "red", "small", (0.5, 0.5))
  assert edit_scores.replace_object(
      "a picture of a small red circle on a gray background", old,
      "orange", "square") == (
          "a picture of a small orange square on a gray background")
  assert edit_scores.replace_object("a red circle", old, "orange",
                                    "circle") == "an orange circle"
  with pytest.raises(ValueError, match="does not name"):
    edit_scores.replace_object("a blue square", old, "green", "circle")


def test_object_box_follows_the_token_grid():
  obj = shapes.SceneObject("square", "red", "small", (0.5, 0.5))
  box = edit_scores.object_box(obj, 128, 16)
  covered = shapes.object_coverage(obj, 128) > 0
  assert box[covered].all()
  cells = box.reshape(8, 16, 8, 16)
  assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()
  wide = edit_scores.object_box(obj, 128, 16, margin=1)
  assert wide.sum() > box.sum() and wide[box].all()


@pytest.mark.parametrize("mode", ["maskfree", "inpaint"])
def test_sources_fail_and_true_targets_pass(scenes, mode):
  """The unedited image never counts; a rendering of the goal always does,
  and a goal moved by more than 1/16 of the side fails the mask-free
  check."""
  images = {s[0]: s[3] for s in scenes}
  cases = _cases(mode, scenes)
  assert len(cases) == 8
  for case in cases:
    assert case.source.scene_type == "single"
    assert case.target.color != case.source.objects[0].color
    assert (case.target.shape == case.source.objects[0].shape) == (
        mode == "maskfree")
    assert not edit_scores.score_case(case, images[case.index])["success"]
    goal = dataclasses.replace(case.source, objects=(case.target,))
    assert edit_scores.score_case(case, shapes.render(goal, 128))["success"]
    if mode == "maskfree":
      x, y = case.target.center
      moved = dataclasses.replace(case.target, center=(
          x + (0.1 if x < 0.5 else -0.1), y))
      scores = edit_scores.score_case(
          case, shapes.render(dataclasses.replace(
              case.source, objects=(moved,)), 128))
      assert scores["prompt"] and not scores["in_place"]


def test_outpainting_keeps_the_first_object_and_asks_for_the_caption(scenes):
  images = {s[0]: s[3] for s in scenes}
  cases = _cases("outpaint", scenes)
  for case in cases:
    assert case.source.scene_type == "relation"
    assert case.prompt == case.caption
    covered = shapes.object_coverage(case.source.objects[0], 128) > 0
    assert case.region[covered].all() and not case.region.all()
    assert edit_scores.score_case(case, images[case.index])["success"]
    blank = np.where(case.region[..., None], images[case.index],
                     images[case.index][0, 0])
    assert not edit_scores.score_case(case, blank)["success"]


def test_cases_are_stable_and_named():
  scenes = [(i, shapes.sample_scene("validation", i), "") for i in range(3)]
  with pytest.raises(ValueError, match="edit mode"):
    edit_scores.make_cases("recolor", scenes, size=128, cell=16, num=1)
  assert edit_scores.aggregate([]) == {"num": 0.0}
