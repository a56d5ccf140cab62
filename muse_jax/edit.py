r"""Zero-shot edits of an image with a trained workdir's models (P§3.3).

  python -m muse_jax.edit --workdir=workdir/shapes_cascade --mode=inpaint \
      --image=in.png --box=32,32,96,96 --prompt="a blue circle" --out=out.png
  python -m muse_jax.edit --workdir=DIR --mode=outpaint --image=in.png \
      --box=32,32,96,96 --prompt="two red squares" --out=out.png
  python -m muse_jax.edit --workdir=DIR --mode=maskfree --image=in.png \
      --prompt="a blue circle" --iterations=100 --out=out.png \
      --intermediate_every=25

inpaint regenerates the region (`--box=top,left,bottom,right` in pixels,
bottom/right exclusive, or `--mask`, a PNG the image's size, white = the
region); outpaint keeps that region and regenerates the rest; maskfree
resamples 8% of the tokens per iteration towards the prompt (guidance 4,
top-k 3: the paper's defaults). A cascade workdir edits at both
resolutions (`muse_jax.editor`). Writes the edited image to `--out` and,
with `--intermediate_every`, a captioned grid of the iterations beside it.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging

from muse_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained experiment workdir.")
_MODE = flags.DEFINE_enum("mode", None, ["inpaint", "outpaint", "maskfree"],
                          "The edit.")
_IMAGE = flags.DEFINE_string("image", None, "The source image (PNG/JPEG).")
_MASK = flags.DEFINE_string(
    "mask", None, "A PNG the image's size: white = the region (inpaint: "
    "regenerated; outpaint: kept).")
_BOX = flags.DEFINE_string(
    "box", None, "top,left,bottom,right pixels of the region, instead of "
    "--mask.")
_PROMPT = flags.DEFINE_string("prompt", None, "The text to edit towards.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None,
                                "Replaces the unconditional logits.")
_ITERATIONS = flags.DEFINE_integer("iterations", 100,
                                   "Mask-free iterations.")
_FRACTION = flags.DEFINE_float("fraction", 0.08,
                               "Mask-free: tokens resampled per iteration.")
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "Mask-free guidance scale.")
_TOP_K = flags.DEFINE_integer("top_k", 3, "Mask-free top-k.")
_INTERMEDIATE = flags.DEFINE_integer(
    "intermediate_every", 0, "Mask-free: also save every n-th iteration.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", "edited.png", "Output PNG path.")

flags.mark_flags_as_required(["workdir", "mode", "image", "prompt"])


def read_image(path: str):
  """A PIL image, or an error naming the file."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"--image={path} not found")
  try:
    image = Image.open(path)
    image.load()
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  return image


def region_mask(image_size: tuple[int, int], mask_path: str | None,
                box: str | None):
  """Bool [H, W] of --mask or --box at the source image's own size."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from muse_jax import editing  # pylint: disable=g-import-not-at-top
  width, height = image_size
  if (mask_path is None) == (box is None):
    raise ValueError("give the region as exactly one of --mask or --box")
  if box is not None:
    try:
      coords = tuple(int(v) for v in box.split(","))
    except ValueError as e:
      raise ValueError(f"--box={box!r}: expected four integers "
                       "top,left,bottom,right") from e
    return editing.box_mask(height, width, coords)
  mask_image = read_image(mask_path).convert("L")
  mask = np.asarray(mask_image) > 127
  if mask.shape != (height, width):
    raise ValueError(
        f"--mask={mask_path} is {mask.shape[1]}x{mask.shape[0]} but the "
        f"image is {width}x{height}: the mask must have the image's size")
  if not mask.any():
    raise ValueError(f"--mask={mask_path} is empty (no white pixel)")
  return mask


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  import warnings  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from muse_jax import editor as editor_lib  # pylint: disable=g-import-not-at-top
  from muse_jax.evaluation import sample_grid  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import workdir  # pylint: disable=g-import-not-at-top
  if not _PROMPT.value.strip():
    raise ValueError("--prompt is empty")
  if _NEGATIVE.value is not None and not _NEGATIVE.value.strip():
    raise ValueError("--negative_prompt is empty")
  source = read_image(_IMAGE.value)
  region = None
  if _MODE.value != "maskfree":
    region = region_mask(source.size, _MASK.value, _BOX.value)
  elif _MASK.value or _BOX.value:
    raise ValueError("--mode=maskfree takes no --mask or --box")
  editor = editor_lib.Editor(workdir.load_generator(_WORKDIR.value,
                                                    batch_size=1))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    image = editor_lib.prepare_image(source, editor.size, _IMAGE.value)
  for w in caught:
    print(f"warning: {w.message}", file=sys.stderr)
  steps = []
  if _MODE.value == "maskfree":
    edited, steps = editor.maskfree(
        image, _PROMPT.value, seed=_SEED.value, iterations=_ITERATIONS.value,
        fraction=_FRACTION.value, guidance_scale=_GUIDANCE.value,
        top_k=_TOP_K.value, negative_prompt=_NEGATIVE.value,
        intermediate_every=_INTERMEDIATE.value)
  else:
    mask = editor_lib.prepare_mask(region, editor.size)
    fn = editor.inpaint if _MODE.value == "inpaint" else editor.outpaint
    edited = fn(image, mask, _PROMPT.value, seed=_SEED.value,
                negative_prompt=_NEGATIVE.value)
  Image.fromarray(edited).save(_OUT.value)
  print(f"wrote {_OUT.value} ({edited.shape[1]} px)", flush=True)
  if steps:
    stem, _ = os.path.splitext(_OUT.value)
    every = _INTERMEDIATE.value
    grid = f"{stem}_iterations.png"
    sample_grid.save_grid(
        grid, [image] + steps,
        ["source"] + [f"iteration {(i + 1) * every}"
                      for i in range(len(steps))])
    print(f"wrote {grid}", flush=True)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
