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


def has_superres(workdir: str | epath.Path) -> bool:
  """Whether the workdir's cascade trained a super-res stage."""
  _, dirs = read(workdir)
  return "superres" in dirs and "sr_tokenizer" in dirs


def _override(section: ml_collections.ConfigDict, name: str,
              overrides: dict[str, Any] | None) -> None:
  for k, v in (overrides or {}).items():
    if k not in section:
      raise KeyError(f"{name} override {k!r}: config.{name} has "
                     f"{sorted(section)}")
    section[k] = v


def load_generator(workdir: str | epath.Path,
                   sampling_overrides: dict[str, Any] | None = None,
                   sr_sampling_overrides: dict[str, Any] | None = None,
                   *, superres: bool = True,
                   batch_size: int | None = None
                   ) -> text_to_image.TextToImage:
  """A `TextToImage` over a trained workdir's models and text encoder.

  `sampling_overrides` replace keys of the saved `config.sampling` (e.g.
  `num_steps`, `guidance_scale`), `sr_sampling_overrides` those of
  `config.superres.sampling`, without touching the workdir. A cascade
  workdir samples through its super-res stage unless `superres` is False;
  asking for super-res overrides of a workdir without one is an error.
  """
  config, dirs = read(workdir)
  for stage in ("tokenizer", "transformer"):
    if stage not in dirs:
      raise FileNotFoundError(
          f"{workdir}: stage {stage!r} has not run (stages.json has "
          f"{sorted(dirs)})")
  cascade = superres and has_superres(workdir)
  if sr_sampling_overrides and not has_superres(workdir):
    raise ValueError(
        f"{workdir} has no super-res stage (stages.json has "
        f"{sorted(dirs)}); super-res settings such as --sr_steps need a "
        "workdir trained with the cascade (configs/shapes_cascade.py)")
  _override(config.sampling, "sampling", sampling_overrides)
  if cascade:
    _override(config.superres.sampling, "superres.sampling",
              sr_sampling_overrides)
  env = env_lib.Env(config)
  vq = artifacts.load_vq(config, dirs["tokenizer"], env)
  model = artifacts.load_transformer(config, dirs["transformer"], env)
  sr = None
  if cascade:
    sr = text_to_image.SuperRes(
        artifacts.load_sr_vq(config, dirs["sr_tokenizer"], env),
        artifacts.load_superres(config, dirs["superres"], env),
        evaluate.sr_sampler_config(config))
  return text_to_image.TextToImage(
      vq, model, evaluate.sampler_config(config), env,
      batch_size=batch_size or config.eval.batch_size,
      text_encoder=env.text_encoder(), superres=sr)
