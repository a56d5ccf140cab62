r"""Samples images for text prompts from a trained workdir's checkpoints.

  python -m muse_jax.sample --workdir=workdir/shapes_demo \
      --prompt="a red circle to the left of a blue square" \
      --prompt="two purple circles" --out=samples.png

Reads the config the trainer saved (`<workdir>/config.json`) and the Orbax
checkpoints of the tokenizer and transformer stages; `--sampling.*` flags
override decoding settings. Writes a captioned grid (PNG) and, with
`--npz`, the raw uint8 images.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

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


def load_experiment(workdir: str):
  """An Experiment over a trained workdir, from its saved config."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from muse_jax import experiment  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: is {workdir!r} a trained muse_jax workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  return experiment.Experiment(config, workdir)


def main(argv):
  del argv
  from muse_jax.evaluation import sample_grid  # pylint: disable=g-import-not-at-top
  exp = load_experiment(_WORKDIR.value)
  if _STEPS.value is not None:
    exp.config.sampling.num_steps = _STEPS.value
  if _GUIDANCE.value is not None:
    exp.config.sampling.guidance_scale = _GUIDANCE.value
  prompts = list(_PROMPTS.value)
  images = exp.generate(prompts, seed=_SEED.value,
                        negative_prompt=_NEGATIVE.value)
  sample_grid.save_grid(_OUT.value, list(images), prompts)
  if _NPZ.value:
    import numpy as np  # pylint: disable=g-import-not-at-top
    np.savez(_NPZ.value, images=images, prompts=np.asarray(prompts))
  print(f"wrote {_OUT.value}", flush=True)


def run():
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
