"""Zero-shot edits of shapes scenes with checkable targets, and their scores.

Every validation scene's objects are known, so an edit built from one has an
exact goal that the shapes scorer (`shapes_scorer`) can check:

* **mask-free colour edit** (`maskfree`): a one-object scene ("a red
  circle") is edited towards the same object in another colour ("a blue
  circle"), the caption otherwise unchanged. Success: the new prompt is
  satisfied, no object of the old colour and shape remains, and the new
  object's centre lies within `MAX_CENTER_SHIFT` (1/16 of the side) of the
  old one's.
* **inpainting** (`inpaint`): the region around a one-object scene's object
  (its box on the base model's token grid, widened by one token) is
  regenerated under the caption with that object replaced by another
  colour and shape. Success: the new object is found and the old one is
  not.
* **outpainting** (`outpaint`): in a two-object relation scene, only the
  first object's box (on the base token grid) is kept and everything else
  is regenerated under the scene's own caption. Success: the caption --
  both objects and their relation -- is satisfied.

New colours and shapes are drawn from the training pairs (the model has
seen them) by a generator seeded with (seed, example index), so a case
does not depend on which other cases are built.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import re

import numpy as np

from muse_jax.data import shapes
from muse_jax.evaluation import shapes_scorer

MODES = ("maskfree", "inpaint", "outpaint")
# Largest move of an edited object's centre, as a fraction of the side.
MAX_CENTER_SHIFT = 1.0 / 16.0
_SCENE_TYPE = {"maskfree": "single", "inpaint": "single",
               "outpaint": "relation"}


@dataclasses.dataclass(frozen=True)
class EditCase:
  """One edit of one validation scene.

  Attributes:
    mode: "maskfree", "inpaint" or "outpaint".
    index: the scene's index in the validation split.
    caption: the scene's caption.
    prompt: the edit's prompt.
    region: bool [S, S] pixels regenerated (inpaint) or kept (outpaint);
      None for mask-free edits.
    source: the scene.
    target: the object the prompt puts in place of `source.objects[0]`
      (mask-free and inpainting), else None.
  """

  mode: str
  index: int
  caption: str
  prompt: str
  region: np.ndarray | None
  source: shapes.Scene
  target: shapes.SceneObject | None = None


def replace_object(caption: str, old: shapes.SceneObject, color: str,
                   shape: str) -> str:
  """`caption` with its phrase for `old` ("a [size] red circle") naming
  `color` and `shape` instead, the article fixed ("an orange circle")."""
  pattern = re.compile(
      rf"\b(an?) ((?:{'|'.join(shapes.SIZES)}) )?{old.color} {old.shape}\b")
  match = pattern.search(caption)
  if match is None:
    raise ValueError(f"caption {caption!r} does not name its object "
                     f"'{old.color} {old.shape}'")
  size = match.group(2) or ""
  words = f"{size}{color} {shape}"
  article = "an" if words[0] in "aeiou" else "a"
  return caption[:match.start()] + f"{article} {words}" + caption[
      match.end():]


def object_box(obj: shapes.SceneObject, size: int, cell: int,
               margin: int = 0) -> np.ndarray:
  """bool [size, size]: the `cell`-pixel grid cells the object covers,
  widened by `margin` cells on every side (clipped to the image)."""
  if size % cell:
    raise ValueError(f"cell {cell} does not divide the side {size}")
  covered = shapes.object_coverage(obj, size) > 0
  g = size // cell
  cells = covered.reshape(g, cell, g, cell).any(axis=(1, 3))
  rows, cols = np.nonzero(cells)
  box = np.zeros((g, g), bool)
  box[max(0, rows.min() - margin):rows.max() + margin + 1,
      max(0, cols.min() - margin):cols.max() + margin + 1] = True
  return box.repeat(cell, axis=0).repeat(cell, axis=1)


def _other_pair(rng: np.random.Generator, obj: shapes.SceneObject, *,
                same_shape: bool) -> tuple[str, str]:
  pairs = [(c, s) for c, s in shapes.TRAIN_PAIRS
           if (c, s) != (obj.color, obj.shape) and c != obj.color
           and (s == obj.shape) == same_shape]
  return pairs[rng.integers(len(pairs))]


def make_cases(mode: str, scenes: Sequence[tuple[int, shapes.Scene, str]],
               *, size: int, cell: int, num: int, seed: int = 0
               ) -> list[EditCase]:
  """Up to `num` cases of `mode` from (index, scene, caption) triples.

  `size` is the edited images' side and `cell` the base model's token size
  in those pixels (regions follow its grid).
  """
  if mode not in MODES:
    raise ValueError(f"edit mode {mode!r} not in {MODES}")
  cases = []
  for index, scene, caption in scenes:
    if len(cases) == num:
      break
    if scene.scene_type != _SCENE_TYPE[mode]:
      continue
    obj = scene.objects[0]
    rng = np.random.default_rng([seed, index, MODES.index(mode)])
    if mode == "outpaint":
      cases.append(EditCase(mode, index, caption, caption,
                            object_box(obj, size, cell), scene))
      continue
    color, shape = _other_pair(rng, obj, same_shape=mode == "maskfree")
    target = dataclasses.replace(obj, color=color, shape=shape)
    region = (object_box(obj, size, cell, margin=1) if mode == "inpaint"
              else None)
    cases.append(EditCase(mode, index, caption,
                          replace_object(caption, obj, color, shape), region,
                          scene, target))
  return cases


def score_case(case: EditCase, image: np.ndarray) -> dict[str, bool]:
  """Checks of one edited image (uint8 [S, S, 3]); "success" combines the
  mode's checks (see the module docstring)."""
  checks = shapes_scorer.score(image, case.prompt)
  out = {"prompt": checks["correct"]}
  if case.target is not None:
    old = case.source.objects[0]
    dets = shapes_scorer.detect_objects(image)
    out["old_gone"] = not any(d.color == old.color and d.shape == old.shape
                              for d in dets)
    if case.mode == "maskfree":
      shift = min((float(np.hypot(d.center[0] - old.center[0],
                                  d.center[1] - old.center[1]))
                   for d in dets if d.color == case.target.color
                   and d.shape == case.target.shape), default=float("inf"))
      out["in_place"] = shift <= MAX_CENTER_SHIFT
  out["success"] = all(out.values())
  return out


def aggregate(scores: Sequence[dict[str, bool]]) -> dict[str, float]:
  """Rates of every check over the cases (and their number)."""
  out: dict[str, float] = {"num": float(len(scores))}
  for key in (scores[0] if scores else {}):
    out[key] = float(np.mean([s[key] for s in scores]))
  return out
