"""Geometric text-image alignment scorer for the compositional shapes dataset.

Implements the evaluator of the shapes spec: a prompt is parsed into the
objects it asks for, objects are detected in the image by colour segmentation
against the palette, and each prompt is judged on presence (colour+shape),
count, relation, and (when applicable) size and background. No learned judge
is involved, so the score is exact on the dataset's own images and
interpretable on generated ones.

Detection models every pixel as a blend of the background and one palette
colour (what antialiasing and decoder blur produce): per palette colour we
project the pixel onto the background->colour segment, giving a coverage
`alpha` and an off-line residual. A pixel is an object core pixel when its
best colour explains it (small residual) with alpha >= 0.4. Core pixels are
grouped into connected components per colour (tiny ones are dropped as
speckles), and each component's shape, size and centre come from
alpha-weighted moments over its neighbourhood, which are insensitive to
blurry edges and sub-pixel placement:

* triangle: strongly negative vertical skewness (mass at the bottom);
* square vs circle: E[x^2 y^2] / (E[x^2] E[y^2]) is 1 for an axis-aligned
  square and 2/3 for a disc;
* size: the alpha sum (blur-invariant area) against the small/large areas;
* a solidity check (area vs. second moments) and an aspect check mark
  blobs that are no clean shape (e.g. two objects fused) as "unknown".

Conventions: an unmentioned background means black (the spec's default), and
"a"/"an" ask for presence while a number word ("one".."four") asks for an
exact count of that colour+shape.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from muse_jax.data import shapes

# --- Prompt parsing. ---


@dataclasses.dataclass(frozen=True)
class ObjectRequest:
  """One requested object; `count` is None when only presence is asked."""
  color: str
  shape: str
  size: str | None = None
  count: int | None = None


@dataclasses.dataclass(frozen=True)
class Request:
  """A parsed prompt; `relation` reads "objects[0] <relation> objects[1]"."""
  objects: tuple[ObjectRequest, ...]
  relation: str | None = None
  background: str | None = None

  @property
  def scene_type(self) -> str:
    """The dataset scene type this prompt has the form of."""
    if self.relation is not None:
      return "relation"
    if self.objects[0].count is not None and self.objects[0].count > 1:
      return "count"
    return "single"


_PREFIXES = ("an image of ", "a picture of ", "a photo of ", "there is ",
             "there are ")
_BACKGROUND_RE = re.compile(r"\s+on an? (black|gray|grey) background$")
_RELATION_RE = re.compile(
    r"\s+(?:is\s+|are\s+)?(to the left of|to the right of|on the left of|"
    r"on the right of|left of|right of|above|below|under|over)\s+")
_RELATION_NAMES = {
    "to the left of": "left of", "on the left of": "left of",
    "left of": "left of", "to the right of": "right of",
    "on the right of": "right of", "right of": "right of",
    "above": "above", "over": "above", "below": "below", "under": "below",
}
_NUMBERS = {w: i + 1 for i, w in enumerate(shapes.NUMBER_WORDS)}
_OBJECT_RE = re.compile(
    r"^(a|an|one|two|three|four)\s+(?:(small|large|big)\s+)?(" +
    "|".join(shapes.COLOR_NAMES) + r")\s+(" + "|".join(shapes.SHAPES) +
    r")(s?)$")


def _parse_object(phrase: str, prompt: str) -> ObjectRequest:
  m = _OBJECT_RE.match(phrase)
  if m is None:
    raise ValueError(f"Cannot parse object {phrase!r} in prompt {prompt!r}.")
  det, size, color, shape, plural = m.groups()
  count = _NUMBERS.get(det)
  if ((count or 1) > 1) != bool(plural):
    raise ValueError(f"Number and plural disagree in {phrase!r} of prompt "
                     f"{prompt!r}.")
  size = {"big": "large"}.get(size, size)
  return ObjectRequest(color, shape, size, count)


def parse_prompt(text: str) -> Request:
  """Parses a shapes caption into a Request; ValueError if it cannot."""
  s = " ".join(text.lower().strip().rstrip(".").split())
  for prefix in _PREFIXES:
    if s.startswith(prefix):
      s = s[len(prefix):]
      break
  background = None
  m = _BACKGROUND_RE.search(s)
  if m:
    background = {"grey": "gray"}.get(m.group(1), m.group(1))
    s = s[:m.start()]
  parts = _RELATION_RE.split(s)
  if len(parts) == 1:
    return Request((_parse_object(s, text),), None, background)
  if len(parts) == 3:
    a, rel, b = parts
    return Request((_parse_object(a, text), _parse_object(b, text)),
                   _RELATION_NAMES[rel], background)
  raise ValueError(f"Cannot parse prompt {text!r}: expected one object or "
                   "two objects joined by one relation.")


# --- Detection. ---


@dataclasses.dataclass(frozen=True)
class Detection:
  """A detected object. `center` is (x, y) in [0, 1]; `area` a fraction."""
  color: str
  shape: str  # "circle", "square", "triangle" or "unknown".
  size: str
  center: tuple[float, float]
  area: float


_PALETTE = np.array([shapes.COLORS[c] for c in shapes.COLOR_NAMES], np.float32)
_BACKGROUND_RGB = np.array(
    [shapes.BACKGROUNDS[b] for b in shapes.BACKGROUND_NAMES], np.float32)

# Largest distance (RGB units) of a pixel from the background->colour segment
# for it to count as that colour; half the smallest such distance between two
# palette colours is about 33, and decoder colour errors need slack.
COLOR_TOLERANCE = 40.0
CORE_ALPHA = 0.4
WEIGHT_ALPHA = 0.25  # Fainter tints (decoder halos) carry no shape weight.
# Components with fewer core pixels than this fraction of S^2 are speckles
# (a small triangle covers about 0.012 S^2).
MIN_AREA_FRACTION = 0.0035
# Detections whose area is below this fraction of the small area of their
# shape are dropped (a small object is never rendered that small).
MIN_AREA_RATIO = 0.4
TRIANGLE_SKEW = -0.2  # Upright triangle: about -0.57; disc/square: 0.
SQUARE_CORNER = 0.83  # E[x2 y2]/(E[x2] E[y2]): square 1.0, disc 0.667.
SOLIDITY_RANGE = (0.55, 1.3)
MAX_ASPECT = 1.6
# Shape area as a fraction of d^2 (d: the object's box side).
_AREA_FACTOR = {"circle": np.pi / 4, "square": 1.0,
                "triangle": np.sqrt(3.0) / 4, "unknown": np.pi / 4}
# area / sqrt(E[x2] E[y2]) for the ideal shape: used for solidity.
_MOMENT_AREA = {"circle": 4 * np.pi, "square": 12.0,
                "triangle": 24 * np.sqrt(3.0) / 4}
# Scorer's relation rule: on-axis centre offset >= this fraction of the side,
# and larger than the off-axis offset. Looser than the dataset's margin, so
# slightly misplaced generations still count, while mirrored ones never do.
RELATION_MIN_OFFSET = 0.1


def _small_area(shape: str) -> float:
  """Area (fraction of S^2) of a small object of `shape`."""
  unknown = "triangle"  # The smallest shape: keep unknown blobs of that size.
  return _AREA_FACTOR[unknown if shape == "unknown" else shape] * (
      shapes.SIZE_DIAMETER["small"] ** 2)


def estimate_background(image: np.ndarray) -> np.ndarray:
  """Median RGB of the border ring (objects keep off the border)."""
  s = image.shape[0]
  w = max(1, s // 32)
  ring = np.concatenate([
      image[:w].reshape(-1, 3), image[-w:].reshape(-1, 3),
      image[:, :w].reshape(-1, 3), image[:, -w:].reshape(-1, 3)])
  return np.median(ring.astype(np.float32), axis=0)


def classify_background(image: np.ndarray) -> str:
  """The palette background nearest to the image's border colour."""
  bg = estimate_background(image)
  return shapes.BACKGROUND_NAMES[
      int(np.argmin(np.linalg.norm(_BACKGROUND_RGB - bg, axis=-1)))]


def _color_fields(image: np.ndarray, bg: np.ndarray):
  """Per pixel and palette colour: coverage alpha and off-line residual."""
  p = image.astype(np.float32) - bg  # [H, W, 3]
  d = _PALETTE - bg  # [K, 3]
  alpha = np.einsum("hwc,kc->hwk", p, d) / np.maximum(
      (d * d).sum(-1), 1.0)
  alpha = np.clip(alpha, 0.0, 1.25)
  resid = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * d, axis=-1)
  return alpha, resid


def _classify(w: np.ndarray, s: int) -> tuple[str, str, tuple[float, float],
                                              float]:
  """Shape, size, centre and area from an alpha weight map."""
  area = float(w.sum())
  ys, xs = np.nonzero(w)
  ww = w[ys, xs]
  x = xs + 0.5
  y = ys + 0.5
  cx, cy = (ww * x).sum() / area, (ww * y).sum() / area
  dx, dy = x - cx, y - cy
  mxx = max((ww * dx * dx).sum() / area, 1e-6)
  myy = max((ww * dy * dy).sum() / area, 1e-6)
  myyy = (ww * dy ** 3).sum() / area
  mxxyy = (ww * dx * dx * dy * dy).sum() / area
  skew = myyy / myy ** 1.5
  corner = mxxyy / (mxx * myy)
  if skew < TRIANGLE_SKEW:
    shape = "triangle"
  elif skew > -TRIANGLE_SKEW:
    shape = "unknown"  # An inverted triangle or a lopsided blob.
  else:
    shape = "square" if corner >= SQUARE_CORNER else "circle"
  if shape != "unknown":
    solidity = area / (_MOMENT_AREA[shape] * np.sqrt(mxx * myy))
    aspect = np.sqrt(max(mxx, myy) / min(mxx, myy))
    if not (SOLIDITY_RANGE[0] <= solidity <= SOLIDITY_RANGE[1]) or (
        aspect > MAX_ASPECT):
      shape = "unknown"
  if shape == "triangle":
    # Centroid -> box centre: the centroid sits h/6 = 0.707 std below it.
    cy -= 0.707 * np.sqrt(myy)
  area_frac = area / (s * s)
  # Small/large areas differ 4x; split at their geometric mean.
  split = _AREA_FACTOR[shape] * (shapes.SIZE_DIAMETER["small"] *
                                 shapes.SIZE_DIAMETER["large"])
  size = "large" if area_frac >= split else "small"
  return shape, size, (cx / s, cy / s), area_frac


def detect_objects(image: np.ndarray) -> list[Detection]:
  """Detects palette-coloured objects in an [S, S, 3] image.

  Args:
    image: RGB, uint8 or float on the same 0..255 scale, any side S >= 32.

  Returns:
    One Detection per object, in no particular order.
  """
  image = np.asarray(image)
  if (image.ndim != 3 or image.shape[-1] != 3 or
      image.shape[0] != image.shape[1]):
    raise ValueError(f"Expected a square RGB image, got shape {image.shape}.")
  if image.dtype != np.uint8:
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  s = image.shape[0]
  bg = estimate_background(image)
  alpha, resid = _color_fields(image, bg)
  # Colours too close to the background (none in the palette) are ignored.
  usable = np.linalg.norm(_PALETTE - bg, axis=-1) > 2 * COLOR_TOLERANCE
  resid_masked = np.where(usable, resid, np.inf)
  label = np.argmin(resid_masked, axis=-1)
  best_resid = np.take_along_axis(resid_masked, label[..., None], -1)[..., 0]
  best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
  core = (best_resid <= COLOR_TOLERANCE) & (best_alpha >= CORE_ALPHA)
  eight = np.ones((3, 3), bool)
  group_radius = s // 64
  edge_radius = max(1, s // 32)
  min_core = MIN_AREA_FRACTION * s * s
  detections = []
  for k in np.unique(label[core]):
    mask = core & (label == k)
    grouping = (ndimage.binary_dilation(mask, eight, iterations=group_radius)
                if group_radius else mask)
    comps, n = ndimage.label(grouping, structure=eight)
    weight_k = np.where(
        (resid[..., k] <= COLOR_TOLERANCE) & (alpha[..., k] >= WEIGHT_ALPHA),
        np.clip(alpha[..., k], 0.0, 1.0), 0.0)
    for i in range(1, n + 1):
      comp = (comps == i) & mask
      if comp.sum() < min_core:
        continue
      region = ndimage.binary_dilation(comp, eight, iterations=edge_radius)
      shape, size, center, area = _classify(np.where(region, weight_k, 0.0), s)
      if area < MIN_AREA_RATIO * _small_area(shape):
        continue  # A speckle, or a fragment of something.
      detections.append(Detection(shapes.COLOR_NAMES[k], shape, size,
                                  (float(center[0]), float(center[1])), area))
  return detections


# --- Scoring. ---


def _relation_holds(a: tuple[float, float], b: tuple[float, float],
                    relation: str) -> bool:
  dx, dy = b[0] - a[0], b[1] - a[1]
  on, off = {"left of": (dx, dy), "right of": (-dx, dy),
             "above": (dy, dx), "below": (-dy, dx)}[relation]
  return on >= RELATION_MIN_OFFSET and abs(off) < on


# The per-prompt correctness the dataset spec asks for; size and background
# are reported as extra checks (and in "correct_strict").
SPEC_CHECKS = ("present", "count", "relation")


def score(image: np.ndarray, prompt: str | Request) -> dict[str, bool]:
  """Judges `image` against `prompt`; booleans per applicable check.

  Keys: "present" (every requested colour+shape is detected), "count" (when a
  number word is used: exactly that many of the colour+shape), "size" (when a
  size is named: the matching objects have it), "relation" (when asked: a
  pair of matching objects satisfies it), "background" (the named one, or
  black when none is named), "correct" (the spec's checks that apply --
  present, count, relation -- all pass) and "correct_strict" (every
  applicable check, size and background included, passes).
  """
  request = parse_prompt(prompt) if isinstance(prompt, str) else prompt
  dets = detect_objects(image)
  matches = [[d for d in dets if d.color == o.color and d.shape == o.shape]
             for o in request.objects]
  out: dict[str, bool] = {"present": all(bool(m) for m in matches)}
  counted = [(o, m) for o, m in zip(request.objects, matches)
             if o.count is not None]
  if counted:
    out["count"] = all(len(m) == o.count for o, m in counted)
  sized = [(o, m) for o, m in zip(request.objects, matches) if o.size]
  if sized:
    out["size"] = all(
        (all(d.size == o.size for d in m) if o.count is not None else
         any(d.size == o.size for d in m)) and bool(m) for o, m in sized)
  if request.relation is not None:
    out["relation"] = any(
        _relation_holds(a.center, b.center, request.relation)
        for a in matches[0] for b in matches[1] if a is not b)
  out["background"] = classify_background(np.asarray(image)) == (
      request.background or "black")
  out["correct"] = all(out[k] for k in SPEC_CHECKS if k in out)
  out["correct_strict"] = all(
      v for k, v in out.items() if k != "correct")
  return out


def aggregate(scores: Sequence[dict[str, bool]],
              scene_types: Iterable[str | int]) -> dict[str, float]:
  """Accuracy ("correct" rate) per scene type and overall, plus check rates.

  Returns keys "accuracy/<scene_type>", "accuracy/overall", "num/<type>"
  (number of prompts) and "check/<name>" (pass rate of each check over the
  prompts it applies to).
  """
  types = [shapes.SCENE_TYPES[int(t)] if not isinstance(t, str) else t
           for t in scene_types]
  if len(types) != len(scores):
    raise ValueError(f"{len(scores)} scores but {len(types)} scene types.")
  out: dict[str, float] = {}
  for t in sorted(set(types)):
    sel = [s["correct"] for s, tt in zip(scores, types) if tt == t]
    out[f"accuracy/{t}"] = float(np.mean(sel))
    out[f"num/{t}"] = float(len(sel))
  out["accuracy/overall"] = (float(np.mean([s["correct"] for s in scores]))
                             if scores else float("nan"))
  strict = [s["correct_strict"] for s in scores if "correct_strict" in s]
  if strict:
    out["accuracy_strict/overall"] = float(np.mean(strict))
  for name in ("present", "count", "size", "relation", "background"):
    vals = [s[name] for s in scores if name in s]
    if vals:
      out[f"check/{name}"] = float(np.mean(vals))
  return out
