r"""Samples images for text prompts from a trained workdir's checkpoints.

  python -m muse_jax.sample --workdir=workdir/shapes_demo \
      --prompt="a red circle to the left of a blue square" \
      --prompt="two purple circles" --out=samples.png

Reads the config the main job saved (`<workdir>/config.json`) and, through
`<workdir>/stages.json`, the Orbax checkpoints of its tokenizer and
transformer stages. Writes a captioned grid (PNG) and, with `--npz`, the
raw uint8 images.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained experiment workdir.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "Text prompt(s).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None,
                                "Replaces the unconditional logits.")
_OUT = flags.DEFINE_string("out", "samples_cli.png", "Output PNG path.")
_NPZ = flags.DEFINE_string("npz", None, "Optional .npz for the raw images.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEPS = flags.DEFINE_integer("num_steps", None, "Decoding steps override.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Guidance override.")

flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax's INFO chatter off.
  from muse_jax.evaluation import sample_grid  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import workdir  # pylint: disable=g-import-not-at-top
  overrides = {}
  if _STEPS.value is not None:
    overrides["num_steps"] = _STEPS.value
  if _GUIDANCE.value is not None:
    overrides["guidance_scale"] = _GUIDANCE.value
  generate = workdir.load_generator(_WORKDIR.value, overrides)
  prompts = list(_PROMPTS.value)
  images = generate(prompts, seed=_SEED.value,
                    negative_prompt=_NEGATIVE.value)
  sample_grid.save_grid(_OUT.value, list(images), prompts)
  if _NPZ.value:
    import numpy as np  # pylint: disable=g-import-not-at-top
    np.savez(_NPZ.value, images=images, prompts=np.asarray(prompts))
  print(f"wrote {_OUT.value}", flush=True)


def run():
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
