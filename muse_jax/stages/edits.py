"""Stage `edits`: zero-shot editing of validation scenes through the cascade.

Muse edits without fine-tuning (P§3.3); this stage measures how well the
trained cascade does it. From the validation split it builds, per mode,
`edits.num_images` edits with checkable goals (`evaluation.edit_scores`:
mask-free colour edits of one-object scenes, inpainting a different object
into one-object scenes, outpainting relation scenes around their first
object), runs them through `editor.Editor` (base model on the low-res
tokens, super-res model on the high-res ones) and scores the results with
the shapes scorer. It also checks the tokens outside each inpainting or
outpainting region are returned bitwise, at both resolutions.

Process 0 writes `edits.json` (rates per mode) and `edits.png` (source,
region and result of the first `edits.grid_examples` cases of every mode,
with their prompts) here and publishes both in the workdir.

Config section `edits`: `num_images` (per mode), `batch_size`, `seed`,
`grid_examples` and `maskfree` (`iterations`, `fraction`,
`guidance_scale`, `top_k`: the paper's 100, 8%, 4, 3 by default).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from muse_jax import distributed
from muse_jax import editor as editor_lib
from muse_jax.data import shapes
from muse_jax.evaluation import edit_scores
from muse_jax.evaluation import sample_grid
from muse_jax.stages import artifacts
from muse_jax.stages import data as data_stage
from muse_jax.stages import evaluate
from muse_jax.stages import graph
from muse_jax.text_to_image import SuperRes
from muse_jax.text_to_image import TextToImage
from muse_jax.training import loop as loop_lib

PUBLISHED = ("edits.png", "edits.json")
MASKFREE_KEYS = ("iterations", "fraction", "guidance_scale", "top_k")


def _overlay(image: np.ndarray, region: np.ndarray | None) -> np.ndarray:
  """The image with `region` tinted (what an edit keeps or regenerates)."""
  if region is None:
    return image
  out = image.astype(np.float32)
  out[region] = 0.5 * out[region] + 0.5 * np.array([255.0, 0.0, 255.0])
  return out.astype(np.uint8)


def _batches(n: int, size: int):
  for lo in range(0, n, size):
    yield lo, min(n, lo + size)


class Edits(graph.Stage):
  name = "edits"
  reads = ("data", "tokenizer", "sr_tokenizer", "transformer", "superres")
  config_keys = ("seed", "sampling", "superres.sampling", "edits",
                 "text_encoder")

  def check(self, config) -> None:
    e = config.edits
    if e.num_images < 1 or e.batch_size < 1 or e.grid_examples < 0:
      raise ValueError("edits.num_images and edits.batch_size must be >= 1 "
                       "and edits.grid_examples >= 0")
    unknown = set(e.maskfree) - set(MASKFREE_KEYS)
    if unknown:
      raise ValueError(f"edits.maskfree has unknown keys {sorted(unknown)}; "
                       f"expected {MASKFREE_KEYS}")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, env, e = run.config, run.env, run.config.edits
    generator = TextToImage(
        artifacts.load_vq(config, run.inputs["tokenizer"], env),
        artifacts.load_transformer(config, run.inputs["transformer"], env),
        evaluate.sampler_config(config), env, batch_size=e.batch_size,
        text_encoder=env.text_encoder(),
        superres=SuperRes(
            artifacts.load_sr_vq(config, run.inputs["sr_tokenizer"], env),
            artifacts.load_superres(config, run.inputs["superres"], env),
            evaluate.sr_sampler_config(config)))
    editor = editor_lib.Editor(generator)
    source = data_stage.split_source(config, run.inputs["data"],
                                     "validation")
    key = shapes.image_key(editor.size)
    cell = editor.size // generator.transformer.cfg.grid_size
    # Enough scenes for num_images of each scene type the modes need.
    scenes, images = [], {}
    for i in range(len(source)):
      r = source[i]
      scene = shapes.scene_from_arrays(r)
      scenes.append((i, scene, _text(r["caption"])))
      images[i] = np.asarray(r[key])
    metrics: dict[str, Any] = {}
    grid, captions = [], []
    for mode in edit_scores.MODES:
      cases = edit_scores.make_cases(mode, scenes, size=editor.size,
                                     cell=cell, num=e.num_images,
                                     seed=e.seed)
      if len(cases) < e.num_images:
        raise ValueError(
            f"edits: the validation split has {len(cases)} scenes for "
            f"{mode}, edits.num_images asks for {e.num_images}")
      t0 = time.perf_counter()
      results, kept = [], []
      for lo, hi in _batches(len(cases), e.batch_size):
        batch = cases[lo:hi]
        pad = e.batch_size - len(batch)  # One program per mode.
        batch = batch + batch[-1:] * pad
        src = np.stack([images[c.index] for c in batch])
        prompts = [c.prompt for c in batch]
        if mode == "maskfree":
          edited, _ = editor.maskfree_batch(
              src, prompts, seed=e.seed + lo,
              **{k: e.maskfree[k] for k in MASKFREE_KEYS})
        else:
          regions = np.stack([c.region for c in batch])
          fn = (editor.inpaint_batch if mode == "inpaint"
                else editor.outpaint_batch)
          edited = fn(src, regions, prompts, seed=e.seed + lo)
        n = len(batch) - pad
        results += list(edited.images[:n])
        kept += list(_kept_bitwise(edited)[:n])
      wall = time.perf_counter() - t0
      scores = [edit_scores.score_case(c, img)
                for c, img in zip(cases, results)]
      metrics[mode] = dict(edit_scores.aggregate(scores), wall_s=wall)
      if mode != "maskfree":
        metrics[mode]["kept_tokens_bitwise"] = float(np.mean(kept))
      loop_lib.say(f"[edits] {mode}: " + ", ".join(
          f"{k} {v:.3f}" for k, v in sorted(metrics[mode].items())))
      for c, img, s in list(zip(cases, results, scores))[:e.grid_examples]:
        grid += [images[c.index], _overlay(images[c.index], c.region), img]
        verb = {"maskfree": "mask-free", "inpaint": "inpaint region",
                "outpaint": "kept region"}[mode]
        captions += [f"source: {c.caption}", f"{mode}: {verb}",
                     f"-> {c.prompt}{'' if s['success'] else ' (x)'}"]
    metrics["settings"] = dict(
        num_images=e.num_images, maskfree=dict(e.maskfree),
        base_steps=generator.sampler.num_steps,
        superres_steps=generator.superres.sampler.num_steps,
        max_center_shift=edit_scores.MAX_CENTER_SHIFT)
    if distributed.is_leader():
      if grid:
        sample_grid.save_grid(run.dir / "edits.png", grid, captions,
                              columns=6)
      graph.write_json(run.dir / "edits.json", metrics)
      for name in PUBLISHED:
        if (run.dir / name).exists():
          (run.dir / name).copy(run.workdir / name, overwrite=True)
    distributed.barrier("edits-written")
    return {"metrics": metrics}


def _kept_bitwise(edited: editor_lib.Edited) -> np.ndarray:
  """Per row: every token outside the region equals the source's, at every
  resolution."""
  ok = np.all((edited.base == edited.source_base) | edited.base_region,
              axis=1)
  if edited.hr is not None:
    ok &= np.all((edited.hr == edited.source_hr) | edited.hr_region, axis=1)
  return ok


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)
