"""The compositional shapes dataset: procedural scenes, renderer and captions.

This is the project's default, offline training data (spec:
`shapes_spec.md`). It lets a user train and sample the whole Muse pipeline on
a laptop CPU, and makes text-image alignment measurable by geometry (see
`muse_jax.evaluation.shapes_scorer`). Everything is pure numpy, and every
example is a deterministic function of `(split, index, seed)`.

Choices the spec leaves open, made here:

* Coordinates are normalized to [0, 1] with x to the right and y downwards
  (image row order). Object centres are snapped to a grid of 1/8 of the side,
  so at 64 px with a downsampling factor of 8 every centre lies on a token
  corner: an object always covers its tokens the same way, wherever it is.
  (A 1/16 grid, which also allows token centres, quadruples the distinct
  token patterns of each object: with the demo's CPU budget the base
  transformer reached 0.38 single-object accuracy on it, 0.82 on this one.)
* Object "diameter" d is S/6 (small) or S/3 (large). A circle has diameter d,
  a square has side d and a triangle is equilateral with side d, upright,
  centred vertically in the d x d box. Every object lies in its d x d box.
* Objects keep a gap of at least 1/16 of the side between their boxes (the
  spec's S/32 margin plus one pixel of antialiasing slack at S=32) and at
  least S/32 from the border. After rasterization this leaves >= S/32
  untouched pixels between objects and from the border at every supported
  size S in {32, 64, 128, 256}.
* Scene types cycle with the index (single, count, relation), so each is 1/3.
  Count scenes have 2..4 objects of one colour+shape; with probability 1/2
  they share a size (and the caption may name it), otherwise sizes are mixed
  and the caption never names one. Relation scenes have two objects with
  different colour-shape pairs, whose centres differ by >= 1/4 of the side
  along the relation axis and by at most half of that along the other axis.
* The background is gray with probability 0.3, else black. The caption always
  mentions a gray background and sometimes a black one, so an unmentioned
  background means black (the spec's default).
* Held-out colour-shape pairs: purple circle, orange square, cyan triangle.
  Train and validation never show or name them; every held-out example shows
  at least one of them (single and count scenes use one as their object,
  relation scenes use one for one of the two objects).
* Train and validation are the same distribution with different streams
  (the split name is part of the hash), so simple scenes (a single object)
  can repeat across splits; compositions with several objects rarely do.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

# --- Palette and vocabulary (the spec's exact values). ---

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 130, 30),
    "white": (240, 240, 240),
    "cyan": (40, 200, 210),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (110, 110, 110),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Object box side (diameter) as a fraction of the image side.
SIZE_DIAMETER: dict[str, float] = {"small": 1.0 / 6.0, "large": 1.0 / 3.0}
SCENE_TYPES: tuple[str, ...] = ("single", "count", "relation")
# A relation "A rel B" compares A's centre with B's centre.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("purple", "circle"),
    ("orange", "square"),
    ("cyan", "triangle"),
})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOR_NAMES for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
_HELDOUT_LIST: tuple[tuple[str, str], ...] = tuple(
    p for p in ALL_PAIRS if p in HELDOUT_PAIRS)

MAX_OBJECTS = 4
SUPPORTED_SIZES: tuple[int, ...] = (32, 64, 128, 256)
GRID = 8  # Centres lie on multiples of 1/GRID.
# Minimum gap between object boxes, and between a box and the border, as a
# fraction of the side (see the module docstring).
MIN_OBJECT_GAP = 1.0 / 16.0
MIN_BORDER_GAP = 1.0 / 32.0
# Relation scenes: minimum centre offset along the relation axis, and the
# largest allowed ratio of the off-axis offset to the on-axis offset.
RELATION_MIN_OFFSET = 0.25
RELATION_MAX_OFF_AXIS_RATIO = 0.5
GRAY_BACKGROUND_PROB = 0.3

_SUPERSAMPLE = 16  # Sub-columns per pixel (circles, triangles).


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object of a scene; `center` is (x, y) in [0, 1], y pointing down."""
  shape: str
  color: str
  size: str
  center: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Scene:
  """A renderable scene; `relation` reads "objects[0] <relation> objects[1]"."""
  scene_type: str
  background: str
  objects: tuple[SceneObject, ...]
  relation: str | None = None


# --- Determinism. ---


def _rng(split: str, index: int, seed: int, stream: str) -> np.random.Generator:
  """A generator seeded from a stable hash (Python's hash() is salted)."""
  key = f"shapes/{split}/{int(index)}/{int(seed)}/{stream}".encode()
  digest = hashlib.blake2b(key, digest_size=16).digest()
  return np.random.default_rng(int.from_bytes(digest, "little"))


# --- Layout. ---


def _center_range(size: str) -> np.ndarray:
  """Grid positions (in 1/GRID units) that keep the border margin."""
  half = SIZE_DIAMETER[size] / 2
  ks = np.arange(GRID + 1)
  pos = ks / GRID
  ok = ((pos - half >= MIN_BORDER_GAP - 1e-9) &
        (pos + half <= 1 - MIN_BORDER_GAP + 1e-9))
  return ks[ok]


_CENTER_RANGE = {s: _center_range(s) for s in SIZES}


def _min_center_distance(size_a: str, size_b: str) -> float:
  """Chebyshev distance between centres that keeps the minimum gap."""
  return (SIZE_DIAMETER[size_a] + SIZE_DIAMETER[size_b]) / 2 + MIN_OBJECT_GAP


def _candidates(size: str) -> np.ndarray:
  """All admissible (x, y) centres for an object of `size`, shape [N, 2]."""
  ks = _CENTER_RANGE[size]
  gx, gy = np.meshgrid(ks, ks, indexing="xy")
  return np.stack([gx.ravel(), gy.ravel()], axis=-1) / GRID


_CANDIDATES = {s: _candidates(s) for s in SIZES}


def _place(rng: np.random.Generator, specs: Sequence[tuple[str, str, str]]
           ) -> list[SceneObject] | None:
  """Places (shape, colour, size) specs at random free grid positions.

  Returns None when an object finds no free position (the caller resamples).
  """
  objects = []
  for shape, color, size in specs:
    cands = _CANDIDATES[size]
    ok = np.ones(len(cands), bool)
    for other in objects:
      d = np.abs(cands - np.asarray(other.center)).max(axis=-1)
      ok &= d >= _min_center_distance(size, other.size) - 1e-9
    free = cands[ok]
    if not len(free):
      return None
    x, y = free[rng.integers(len(free))]
    objects.append(SceneObject(shape, color, size, (float(x), float(y))))
  return objects


def _relation_mask(a: np.ndarray, b: np.ndarray, relation: str) -> np.ndarray:
  """Vectorized `relation_holds` over centres a, b of shape [..., 2]."""
  dx, dy = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
  on, off = {"left of": (dx, dy), "right of": (-dx, dy),
             "above": (dy, dx), "below": (-dy, dx)}[relation]
  return ((on >= RELATION_MIN_OFFSET - 1e-9) &
          (np.abs(off) <= RELATION_MAX_OFF_AXIS_RATIO * on + 1e-9))


def relation_holds(a: tuple[float, float], b: tuple[float, float],
                   relation: str) -> bool:
  """Whether centre `a` is clearly `relation` centre `b` (dataset's margin)."""
  return bool(_relation_mask(np.asarray(a), np.asarray(b), relation))


# --- Scene sampling. ---


def _pairs_for(split: str) -> tuple[tuple[str, str], ...]:
  if split in ("train", "validation"):
    return TRAIN_PAIRS
  if split == "heldout":
    return _HELDOUT_LIST
  raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def _pick(rng: np.random.Generator, items: Sequence):
  return items[rng.integers(len(items))]


def _sample_single(rng, pairs) -> list[SceneObject]:
  color, shape = _pick(rng, pairs)
  size = _pick(rng, SIZES)
  return _place(rng, [(shape, color, size)])


def _sample_count(rng, pairs) -> list[SceneObject]:
  color, shape = _pick(rng, pairs)
  n = int(rng.integers(2, MAX_OBJECTS + 1))
  while True:
    if rng.random() < 0.5:
      sizes = [_pick(rng, SIZES)] * n
    else:
      sizes = [_pick(rng, SIZES) for _ in range(n)]
    objects = _place(rng, [(shape, color, s) for s in sizes])
    if objects is not None:
      return objects


def _sample_relation(rng, split) -> tuple[list[SceneObject], str]:
  if split == "heldout":
    # One object is a held-out pair, the other any different pair.
    first = _pick(rng, _HELDOUT_LIST)
    second = _pick(rng, [p for p in ALL_PAIRS if p != first])
    pair_a, pair_b = (first, second) if rng.random() < 0.5 else (second, first)
  else:
    pair_a = _pick(rng, TRAIN_PAIRS)
    pair_b = _pick(rng, [p for p in TRAIN_PAIRS if p != pair_a])
  relation = _pick(rng, RELATIONS)
  size_a, size_b = _pick(rng, SIZES), _pick(rng, SIZES)
  while True:
    a = _place(rng, [(pair_a[1], pair_a[0], size_a)])[0]
    cands = _CANDIDATES[size_b]
    apart = (np.abs(cands - np.asarray(a.center)).max(axis=-1) >=
             _min_center_distance(size_a, size_b) - 1e-9)
    ok = _relation_mask(np.asarray(a.center), cands, relation) & apart
    if ok.any():
      x, y = cands[ok][rng.integers(ok.sum())]
      b = SceneObject(pair_b[1], pair_b[0], size_b, (float(x), float(y)))
      return [a, b], relation


def sample_scene(split: str, index: int, seed: int = 0) -> Scene:
  """Samples the scene of example `index` of `split`, deterministically."""
  pairs = _pairs_for(split)
  rng = _rng(split, index, seed, "scene")
  scene_type = SCENE_TYPES[int(index) % len(SCENE_TYPES)]
  background = "gray" if rng.random() < GRAY_BACKGROUND_PROB else "black"
  relation = None
  if scene_type == "single":
    objects = _sample_single(rng, pairs)
  elif scene_type == "count":
    objects = _sample_count(rng, pairs)
  else:
    objects, relation = _sample_relation(rng, split)
  return Scene(scene_type, background, tuple(objects), relation)


# --- Rendering. ---


def _coverage(obj: SceneObject, size: int) -> tuple[slice, slice, np.ndarray]:
  """Antialiased coverage of `obj` over its pixel bounding box."""
  d = SIZE_DIAMETER[obj.size] * size
  cx, cy = obj.center[0] * size, obj.center[1] * size
  x0, x1 = int(np.floor(cx - d / 2)), int(np.ceil(cx + d / 2))
  y0, y1 = int(np.floor(cy - d / 2)), int(np.ceil(cy + d / 2))
  r = d / 2
  if obj.shape == "square":
    # Exact area coverage: the product of the per-axis interval overlaps.
    def overlap(lo, n, c):
      edges = lo + np.arange(n, dtype=np.float64)
      return np.clip(np.minimum(edges + 1, c + r) - np.maximum(edges, c - r),
                     0.0, 1.0)
    cov = overlap(y0, y1 - y0, cy)[:, None] * overlap(x0, x1 - x0, cx)[None, :]
    return slice(y0, y1), slice(x0, x1), cov.astype(np.float32)
  # Circles and triangles: supersample in x only; each sub-column crosses
  # the shape in one interval [lo, hi], whose overlap with each pixel row
  # is exact.
  ss = _SUPERSAMPLE
  x = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss - cx
  if obj.shape == "circle":
    inside = np.abs(x) < r
    half = np.sqrt(np.maximum(r * r - x * x, 0.0))
    lo, hi = cy - half, cy + half
  elif obj.shape == "triangle":
    h = d * np.sqrt(3.0) / 2
    inside = np.abs(x) <= r
    lo = cy - h / 2 + np.abs(x) * (h / r)
    hi = np.full_like(x, cy + h / 2)
  else:
    raise ValueError(f"Unknown shape {obj.shape!r}.")
  rows = np.arange(y0, y1, dtype=np.float64)[:, None]
  sub = np.clip(np.minimum(hi, rows + 1) - np.maximum(lo, rows), 0.0, 1.0)
  sub = np.where(inside, sub, 0.0)
  cov = sub.reshape(y1 - y0, x1 - x0, ss).mean(axis=-1)
  return slice(y0, y1), slice(x0, x1), cov.astype(np.float32)


def object_coverage(obj: SceneObject, size: int) -> np.ndarray:
  """Full-canvas float coverage in [0, 1] of one object at side `size`."""
  out = np.zeros((size, size), np.float32)
  rows, cols, cov = _coverage(obj, size)
  out[rows, cols] = cov
  return out


def render(scene: Scene, size: int) -> np.ndarray:
  """Renders `scene` natively at side `size`; uint8 [size, size, 3]."""
  if size not in SUPPORTED_SIZES:
    raise ValueError(
        f"Unsupported size {size}; expected one of {SUPPORTED_SIZES}.")
  bg = np.asarray(BACKGROUNDS[scene.background], np.float32)
  img = np.empty((size, size, 3), np.float32)
  img[...] = bg
  for obj in scene.objects:
    rows, cols, cov = _coverage(obj, size)
    color = np.asarray(COLORS[obj.color], np.float32)
    a = cov[..., None]
    img[rows, cols] = img[rows, cols] * (1 - a) + color * a
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --- Captions. ---

# (format, name sizes, mention a black background). A gray background is
# always mentioned. "{x}" is the object phrase(s) of the scene type.
_TEMPLATES: dict[str, tuple[tuple[str, bool, bool], ...]] = {
    "single": (
        ("{x}", True, False),
        ("{x}", False, False),
        ("{x}", True, True),
        ("{x}", False, True),
        ("an image of {x}", True, False),
        ("an image of {x}", False, True),
    ),
    "count": (
        ("{x}", True, False),
        ("{x}", False, False),
        ("{x}", False, True),
        ("an image of {x}", True, True),
        ("an image of {x}", False, False),
    ),
    "relation": (
        ("{x}", True, False),
        ("{x}", False, False),
        ("{x}", True, True),
        ("{x}", False, True),
        ("an image of {x}", True, False),
        ("an image of {x}", False, False),
    ),
}


def num_templates(scene_type: str) -> int:
  """How many caption templates `scene_type` has."""
  return len(_TEMPLATES[scene_type])


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: SceneObject, with_size: bool) -> str:
  words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
  return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: Scene, template: np.random.Generator | int) -> str:
  """A true caption for `scene`, from a template index or a random one."""
  templates = _TEMPLATES[scene.scene_type]
  if isinstance(template, np.random.Generator):
    template = int(template.integers(len(templates)))
  fmt, with_size, black_bg = templates[int(template) % len(templates)]
  objs = scene.objects
  if scene.scene_type == "single":
    text = _object_phrase(objs[0], with_size)
  elif scene.scene_type == "count":
    same_size = len({o.size for o in objs}) == 1
    words = [NUMBER_WORDS[len(objs) - 1]]
    if with_size and same_size:
      words.append(objs[0].size)
    words += [objs[0].color, objs[0].shape + "s"]
    text = " ".join(words)
  elif scene.scene_type == "relation":
    text = (f"{_object_phrase(objs[0], with_size)} "
            f"{RELATION_PHRASES[scene.relation]} "
            f"{_object_phrase(objs[1], with_size)}")
  else:
    raise ValueError(f"Unknown scene type {scene.scene_type!r}.")
  text = fmt.format(x=text)
  if scene.background == "gray" or black_bg:
    text += f" on a {scene.background} background"
  return text


# --- Examples as arrays. ---


def scene_arrays(scene: Scene) -> dict[str, np.ndarray]:
  """The scene as fixed-size arrays, padded with -1 up to MAX_OBJECTS."""
  n = len(scene.objects)
  shape_ids = np.full((MAX_OBJECTS,), -1, np.int32)
  color_ids = np.full((MAX_OBJECTS,), -1, np.int32)
  size_ids = np.full((MAX_OBJECTS,), -1, np.int32)
  centers = np.full((MAX_OBJECTS, 2), -1, np.float32)
  for i, o in enumerate(scene.objects):
    shape_ids[i] = SHAPES.index(o.shape)
    color_ids[i] = COLOR_NAMES.index(o.color)
    size_ids[i] = SIZES.index(o.size)
    centers[i] = o.center
  return {
      "scene_type": np.int32(SCENE_TYPES.index(scene.scene_type)),
      "background": np.int32(BACKGROUND_NAMES.index(scene.background)),
      "relation": np.int32(-1 if scene.relation is None
                           else RELATIONS.index(scene.relation)),
      "num_objects": np.int32(n),
      "shape_ids": shape_ids,
      "color_ids": color_ids,
      "size_ids": size_ids,
      "centers": centers,
  }


def scene_from_arrays(arrays: dict[str, np.ndarray]) -> Scene:
  """Inverse of `scene_arrays` (e.g. for rendering a stored example)."""
  n = int(arrays["num_objects"])
  objects = tuple(
      SceneObject(SHAPES[int(arrays["shape_ids"][i])],
                  COLOR_NAMES[int(arrays["color_ids"][i])],
                  SIZES[int(arrays["size_ids"][i])],
                  tuple(float(c) for c in arrays["centers"][i]))
      for i in range(n))
  rel = int(arrays["relation"])
  return Scene(SCENE_TYPES[int(arrays["scene_type"])],
               BACKGROUND_NAMES[int(arrays["background"])], objects,
               None if rel < 0 else RELATIONS[rel])


def image_key(size: int) -> str:
  """The example key of the image rendered at side `size`."""
  return f"image_{size}"


def example(split: str, index: int, seed: int = 0,
            sizes: Sequence[int] = (64,)) -> dict[str, object]:
  """One example: images per size (`image_<S>`), caption and scene arrays."""
  scene = sample_scene(split, index, seed)
  out: dict[str, object] = {image_key(s): render(scene, s) for s in sizes}
  out["caption"] = caption(scene, _rng(split, index, seed, "caption"))
  out.update(scene_arrays(scene))
  return out
