"""A finished workdir read back: its saved config, stage dirs and generator.

The main job leaves `<workdir>/config.json` (the resolved config) and
`<workdir>/stages.json` (each stage's output dir in the store). Everything
that samples from a trained run after the fact — the sample CLI, notebooks,
tests — starts here, so they all read the same checkpoints the stages wrote.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath
import ml_collections

from muse_jax import text_to_image
from muse_jax.stages import artifacts
from muse_jax.stages import env as env_lib
from muse_jax.stages import evaluate


def read(workdir: str | epath.Path
         ) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """(saved config, {stage name: output dir}) of a main-job workdir."""
  wd = epath.Path(workdir)
  for name in ("config.json", "stages.json"):
    if not (wd / name).exists():
      raise FileNotFoundError(
          f"{wd / name} not found: is {str(workdir)!r} a muse_jax workdir?")
  config = ml_collections.ConfigDict(
      json.loads((wd / "config.json").read_text()))
  dirs = {k: v["dir"]
          for k, v in json.loads((wd / "stages.json").read_text()).items()}
  return config, dirs


def load_generator(workdir: str | epath.Path,
                   sampling_overrides: dict[str, Any] | None = None
                   ) -> text_to_image.TextToImage:
  """A `TextToImage` over a trained workdir's models and text encoder.

  `sampling_overrides` replace keys of the saved `config.sampling` (e.g.
  `num_steps`, `guidance_scale`) without touching the workdir.
  """
  config, dirs = read(workdir)
  for stage in ("tokenizer", "transformer"):
    if stage not in dirs:
      raise FileNotFoundError(
          f"{workdir}: stage {stage!r} has not run (stages.json has "
          f"{sorted(dirs)})")
  for k, v in (sampling_overrides or {}).items():
    if k not in config.sampling:
      raise KeyError(f"sampling override {k!r}: config.sampling has "
                     f"{sorted(config.sampling)}")
    config.sampling[k] = v
  env = env_lib.Env(config)
  vq = artifacts.load_vq(config, dirs["tokenizer"], env)
  model = artifacts.load_transformer(config, dirs["transformer"], env)
  return text_to_image.TextToImage(
      vq, model, evaluate.sampler_config(config), env,
      batch_size=config.eval.batch_size, text_encoder=env.text_encoder())
