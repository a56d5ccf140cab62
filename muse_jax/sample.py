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

import json
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


def load_generator(workdir: str, sampling_overrides: dict | None = None):
  """A `TextToImage` over a trained workdir's models and text encoder."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import artifacts  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import env as env_lib  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import evaluate  # pylint: disable=g-import-not-at-top
  from muse_jax import text_to_image  # pylint: disable=g-import-not-at-top
  wd = epath.Path(workdir)
  for name in ("config.json", "stages.json"):
    if not (wd / name).exists():
      raise FileNotFoundError(
          f"{wd / name} not found: is {workdir!r} a muse_jax workdir?")
  config = ml_collections.ConfigDict(json.loads((wd / "config.json")
                                                .read_text()))
  dirs = {k: v["dir"] for k, v in json.loads((wd / "stages.json")
                                             .read_text()).items()}
  for k, v in (sampling_overrides or {}).items():
    config.sampling[k] = v
  env = env_lib.Env(config)
  vq = artifacts.load_vq(config, dirs["tokenizer"], env)
  model = artifacts.load_transformer(config, dirs["transformer"], env)
  return text_to_image.TextToImage(
      vq, model, evaluate.sampler_config(config), env,
      batch_size=config.eval.batch_size, text_encoder=env.text_encoder())


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax's INFO chatter off.
  from muse_jax.evaluation import sample_grid  # pylint: disable=g-import-not-at-top
  overrides = {}
  if _STEPS.value is not None:
    overrides["num_steps"] = _STEPS.value
  if _GUIDANCE.value is not None:
    overrides["guidance_scale"] = _GUIDANCE.value
  generate = load_generator(_WORKDIR.value, overrides)
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
