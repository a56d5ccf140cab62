r"""Samples images for text prompts from a trained workdir's checkpoints.

  python -m muse_jax.sample --workdir=workdir/shapes_demo \
      --prompt="a red circle to the left of a blue square" \
      --prompt="two purple circles" --num_images=2 --out=samples_cli

Reads the config the main job saved (`<workdir>/config.json`) and, through
`<workdir>/stages.json`, the Orbax checkpoints of its tokenizer(s) and
transformer(s). A cascade workdir (`configs/shapes_cascade.py`) samples
base -> super-res -> high-res decode; `--sr_steps=0` stops at the base
model. Writes one PNG per image (`<out>/<prompt index>_<image index>.png`)
and a captioned grid (`<out>/grid.png`); `--npz` also keeps the raw uint8
images.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging

from muse_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained experiment workdir.")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Text prompt (repeat).")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "A text file with one prompt per line.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None,
                                "Replaces the unconditional logits.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_OUT = flags.DEFINE_string("out", "samples_cli", "Output directory.")
_NPZ = flags.DEFINE_string("npz", None, "Optional .npz for the raw images.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEPS = flags.DEFINE_integer("steps", None, "Base decoding steps.")
_SR_STEPS = flags.DEFINE_integer(
    "sr_steps", None, "Super-res decoding steps (cascade workdirs; 0 = stop "
    "at the base model).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance scale.")
_GUIDANCE_SCHEDULE = flags.DEFINE_enum(
    "guidance_schedule", None, ["constant", "linear"],
    "Guidance schedule (linear: ramped from 0, as Muse).")
_TEMPERATURE = flags.DEFINE_float("temperature", None,
                                  "Sampling temperature.")

flags.mark_flags_as_required(["workdir"])


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
  """The --prompt values then the file's non-empty lines; an empty or
  missing prompt is an error naming it."""
  out = list(prompts)
  if prompts_file:
    if not os.path.exists(prompts_file):
      raise FileNotFoundError(f"--prompts_file={prompts_file} not found")
    with open(prompts_file, encoding="utf-8") as f:
      out += [line.strip() for line in f if line.strip()]
  if not out:
    raise ValueError("no prompt: pass --prompt (repeatable) or "
                     "--prompts_file")
  empty = [i for i, p in enumerate(out) if not p.strip()]
  if empty:
    raise ValueError(f"prompt {empty[0]} is empty")
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax's INFO chatter off.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from muse_jax.evaluation import sample_grid  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import workdir  # pylint: disable=g-import-not-at-top
  prompts = read_prompts(_PROMPTS.value, _PROMPTS_FILE.value)
  if _NUM_IMAGES.value < 1:
    raise ValueError(f"--num_images={_NUM_IMAGES.value} must be >= 1")
  if _NEGATIVE.value is not None and not _NEGATIVE.value.strip():
    raise ValueError("--negative_prompt is empty")
  overrides = {k: v for k, v in (
      ("num_steps", _STEPS.value), ("guidance_scale", _GUIDANCE.value),
      ("guidance_schedule", _GUIDANCE_SCHEDULE.value),
      ("temperature", _TEMPERATURE.value)) if v is not None}
  sr_steps = _SR_STEPS.value
  sr_overrides = {"num_steps": sr_steps} if sr_steps else {}
  if sr_steps is not None and sr_steps < 0:
    raise ValueError(f"--sr_steps={sr_steps} must be >= 0")
  generate = workdir.load_generator(
      _WORKDIR.value, overrides, sr_overrides, superres=sr_steps != 0)
  requests = [p for p in prompts for _ in range(_NUM_IMAGES.value)]
  images = generate(requests, seed=_SEED.value,
                    negative_prompt=_NEGATIVE.value)
  os.makedirs(_OUT.value, exist_ok=True)
  for i, image in enumerate(images):
    p, k = divmod(i, _NUM_IMAGES.value)
    Image.fromarray(image).save(os.path.join(_OUT.value, f"{p:03d}_{k}.png"))
  grid = os.path.join(_OUT.value, "grid.png")
  sample_grid.save_grid(grid, list(images), requests)
  if _NPZ.value:
    np.savez(_NPZ.value, images=images, prompts=np.asarray(requests))
  print(f"wrote {len(images)} images ({images.shape[1]} px) and {grid}",
        flush=True)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
