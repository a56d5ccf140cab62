"""Stage `evaluate`: sample the validation and heldout prompts and score them.

The prompts' stored caption embeddings (the tokenize stage's records) are
decoded in parallel (`sampling`, Muse's schedule) in batches sharded over
the data axis, turned into images by the tokenizer and, on shapes, scored
by the shapes scorer (captioned data, which has no heldout split: sampled
and shown only). With `eval.inception_path` (pytorch-fid's Inception
weights) each split also gets its FID against the split's real images
(`evaluation.fid`), and with `eval.clip_path` (a CLIP checkpoint of
`eval.clip_model`) its CLIP score, the mean cosine of each sample's and its
caption's CLIP embeddings (`evaluation.clip_score`). Process 0 writes `samples.png` and `metrics.json` into
this stage's directory and publishes both in the workdir.

In the cascade (`CascadeEvaluate`) the base model's tokens go on through
the super-res model (`superres.sampling`) and the super-res tokenizer: each
split is scored at both resolutions (`<split>` is the final, high-res
output; `<split>_base` the base model's), and `samples.png` shows every
prompt at both. `superres_quality` also scores the super-res model alone:
PSNR of its output from the real low-res tokens against the real high-res
images, beside bicubic upsampling of the base tokenizer's reconstruction.
"""

from __future__ import annotations

import json
import time
from typing import Any

from etils import epath
import jax
import numpy as np
from PIL import Image

from muse_jax import config_types
from muse_jax import distributed
from muse_jax import sampling
from muse_jax import text_to_image
from muse_jax.data import records
from muse_jax.data import shapes
from muse_jax.evaluation import clip_layout
from muse_jax.evaluation import clip_score
from muse_jax.evaluation import fid
from muse_jax.evaluation import inception
from muse_jax.evaluation import reconstruction
from muse_jax.evaluation import sample_grid
from muse_jax.evaluation import shapes_scorer
from muse_jax.models import vqgan
from muse_jax.stages import artifacts
from muse_jax.stages import data as data_stage
from muse_jax.stages import graph
from muse_jax.stages import tokenize
from muse_jax.text_to_image import TextToImage

EVAL_SPLITS = ("validation", "heldout")
PUBLISHED = ("samples.png", "metrics.json")


def sampler_config(config) -> sampling.SamplerConfig:
  return config_types.dataclass_from_config(sampling.SamplerConfig,
                                            config.sampling)


def clip_scorer_config(config) -> clip_score.ScorerConfig:
  """The CLIP-score settings of `config.eval` (clip_path, clip_model,
  clip_tokenizer, clip_dtype, clip_impl; the batch is eval.batch_size)."""
  e = config.eval
  return clip_score.ScorerConfig(
      path=e.get("clip_path", ""),
      model=e.get("clip_model", clip_score.ScorerConfig.model),
      tokenizer_path=e.get("clip_tokenizer", ""), batch_size=e.batch_size,
      dtype=e.get("clip_dtype", "float32"), impl=e.get("clip_impl", "plain"))


def sr_sampler_config(config) -> sampling.SamplerConfig:
  return config_types.dataclass_from_config(sampling.SamplerConfig,
                                            config.superres.sampling)


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour upsampling of uint8 [N, s, s, 3] to side `size`."""
  f = size // images.shape[1]
  return images.repeat(f, axis=1).repeat(f, axis=2)


class Evaluate(graph.Stage):
  name = "evaluate"
  reads = ("data", "tokenizer", "tokenize", "transformer")
  config_keys = ("seed", "sampling", "eval")

  def check(self, config) -> None:
    sampler_config(config).check_codebook(
        artifacts.vq_config(config).codebook_size)
    for key in ("num_validation", "num_heldout", "grid_prompts",
                "validation_start"):
      if config.eval[key] < 0:
        raise ValueError(f"eval.{key} must be >= 0")
    if config.eval.batch_size < 1:
      raise ValueError("eval.batch_size must be >= 1")
    path = config.eval.get("inception_path", "")
    if path and not epath.Path(path).exists():
      raise FileNotFoundError(inception.missing_weights_message(path))
    path = config.eval.get("clip_path", "")
    if path:
      model = clip_scorer_config(config).model
      clip_layout.arch(model)  # A known name or a readable JSON file.
      if not epath.Path(path).exists():
        raise FileNotFoundError(clip_score.missing_weights_message(path,
                                                                   model))

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, env, e = run.config, run.env, run.config.eval
    sampler = sampler_config(config)
    vq = artifacts.load_vq(config, run.inputs["tokenizer"], env)
    model = artifacts.load_transformer(config, run.inputs["transformer"], env)
    sr = None
    if "superres" in run.inputs:
      sr = text_to_image.SuperRes(
          artifacts.load_sr_vq(config, run.inputs["sr_tokenizer"], env),
          artifacts.load_superres(config, run.inputs["superres"], env),
          sr_sampler_config(config))
    generate = TextToImage(vq, model, sampler, env, batch_size=e.batch_size,
                           superres=sr)
    metrics: dict[str, Any] = {}
    grid_images, grid_captions = [], []
    extractor = scorer = None
    if e.get("inception_path"):  # FID of each split's samples.
      extractor = fid.Extractor(inception.from_file(e.inception_path),
                                env.mesh, env.rules,
                                batch_size=e.batch_size)
    if e.get("clip_path"):  # CLIP score of each split's samples.
      scorer = clip_score.CLIPScorer(clip_scorer_config(config), env.mesh,
                                     env.rules)
    wanted = {"validation": e.num_validation, "heldout": e.num_heldout}
    first = {"validation": e.get("validation_start", 0), "heldout": 0}
    sample_s, num_images = 0.0, 0
    # Captioned data has no heldout split, and no scene types to score.
    for split in [s for s in EVAL_SPLITS
                  if (run.inputs["tokenize"] / f"{s}.json").exists()]:
      source = records.open_source(run.inputs["tokenize"], split)
      lo = first[split]
      n = max(0, min(wanted[split], len(source) - lo))
      if n == 0:
        continue
      to_example = tokenize.text_example(source.manifest["max_len"])
      recs = [source[i] for i in range(lo, lo + n)]
      examples = [to_example(r) for r in recs]
      emb = np.stack([x["text_emb"] for x in examples]).astype(np.float32)
      mask = np.stack([x["text_mask"] for x in examples])
      prompts = [r["caption"] for r in recs]
      t0 = time.perf_counter()
      base_tokens, hr_tokens = generate.cascade_tokens(emb, mask,
                                                       seed=config.seed)
      outputs = {split: generate.decode(base_tokens)}
      if hr_tokens is not None:
        outputs = {f"{split}_base": outputs[split],
                   split: generate.decode_superres(hr_tokens)}
      sample_s += time.perf_counter() - t0
      num_images += n
      if not distributed.is_leader():
        continue
      if extractor is not None:
        for name, images in outputs.items():
          size = images.shape[1]
          reference = fid.cached_statistics(
              run.inputs["data"] / f"fid_reference_{split}_{lo}-{lo + n}_"
              f"{size}px_pytorch_fid.npz",
              lambda size=size: data_stage.split_images(
                  config, run.inputs["data"], split, n + lo, size=size)[lo:],
              extractor)
          metrics.setdefault(name, {})["fid"] = fid.frechet_distance(
              *_stats(extractor, images), *reference)
      if scorer is not None:
        texts = [p.decode() if isinstance(p, bytes) else str(p)
                 for p in prompts]
        for name, images in outputs.items():
          metrics.setdefault(name, {})["clip_score"] = float(
              scorer.score(images, texts).mean())
      scored = "scene_type" in recs[0]
      take = e.grid_prompts // len(EVAL_SPLITS)
      for name, images in outputs.items():
        metrics[name] = dict(metrics.get(name, {}), num_prompts=n,
                             first_prompt=lo,
                             image_size=int(images.shape[1]))
        scores = [{"correct": True}] * n
        if scored:
          scores = [shapes_scorer.score(img, p)
                    for img, p in zip(images, prompts)]
          metrics[name].update(shapes_scorer.aggregate(
              scores, np.asarray([r["scene_type"] for r in recs])))
        print(f"[evaluate] {name} ({images.shape[1]} px): {n} prompts"
              + "".join(f", {k} {v:.3f}"
                        for k, v in sorted(metrics[name].items())
                        if k.startswith(("accuracy", "fid", "clip"))),
              flush=True)
        size = max(x.shape[1] for x in outputs.values())
        grid_images += list(_upsample(images[:take], size))
        grid_captions += [
            f"{'[heldout] ' if split == 'heldout' else ''}"
            f"{'' if len(outputs) == 1 else f'{images.shape[1]}px: '}{p}"
            f"{'' if s['correct'] else ' (x)'}"
            for p, s in zip(prompts[:take], scores[:take])]
    metrics.update(self.extra_metrics(run, generate))
    seq_len = model.cfg.seq_len
    metrics["decoding"] = {
        "steps": sampler.num_steps, "tokens": seq_len,
        "tokens_per_step": seq_len / sampler.num_steps,
        "guidance_scale": sampler.guidance_scale,
        "guidance_schedule": sampler.guidance_schedule,
        "temperature": sampler.temperature,
        "confidence": sampler.confidence}
    if sr is not None:
      metrics["decoding_superres"] = {
          "steps": sr.sampler.num_steps, "tokens": sr.model.cfg.seq_len,
          "tokens_per_step": sr.model.cfg.seq_len / sr.sampler.num_steps,
          "guidance_scale": sr.sampler.guidance_scale,
          "guidance_schedule": sr.sampler.guidance_schedule}
    metrics["sampling"] = {"images": num_images, "wall_s": sample_s,
                           "images_per_s": num_images / max(sample_s, 1e-9)}
    metrics["timings_s"] = {k: v["wall_s"] for k, v in run.infos.items()
                            if "wall_s" in v}
    metrics["devices"] = [str(d) for d in jax.devices()]
    metrics["num_processes"] = jax.process_count()
    if distributed.is_leader():
      sample_grid.save_grid(run.dir / "samples.png", grid_images,
                            grid_captions)
      graph.write_json(run.dir / "metrics.json", metrics)
      for name in PUBLISHED:
        (run.dir / name).copy(run.workdir / name, overwrite=True)
    distributed.barrier("evaluate-written")
    return {"metrics": json.loads(json.dumps(metrics, default=float))}


  def extra_metrics(self, run: graph.StageRun, generate: TextToImage
                    ) -> dict[str, Any]:
    del run, generate
    return {}


def _stats(extractor: fid.Extractor, images: np.ndarray):
  return extractor.statistics(
      [images[i:i + extractor.batch_size]
       for i in range(0, len(images), extractor.batch_size)]).mu_sigma()


class CascadeEvaluate(Evaluate):
  """`Evaluate` through the base -> super-res cascade, plus the super-res
  model's quality on its own (`superres_quality`)."""

  reads = ("data", "tokenizer", "tokenize", "transformer", "sr_tokenizer",
           "sr_tokenize", "superres")
  config_keys = ("seed", "sampling", "eval", "superres.sampling")

  def check(self, config) -> None:
    super().check(config)
    sr_sampler_config(config).check_codebook(
        artifacts.sr_vq_config(config).codebook_size)

  def extra_metrics(self, run: graph.StageRun, generate: TextToImage
                    ) -> dict[str, Any]:
    return {"superres_quality": superres_quality(run, generate)}


def superres_quality(run: graph.StageRun, generate: TextToImage
                     ) -> dict[str, float]:
  """PSNR at the high-res side against the real validation images of:
  the super-res model run on the real low-res tokens (`superres_psnr`),
  bicubic upsampling of the base tokenizer's reconstruction
  (`bicubic_psnr`, the baseline), and the super-res tokenizer's own
  reconstruction (`sr_tokenizer_psnr`, the ceiling)."""
  config = run.config
  n = run.config.eval.num_validation
  source = tokenize.paired_source(run.inputs, "validation")
  n = min(n, len(source))
  recs = [source[i] for i in range(n)]
  to_example = tokenize.text_example(source.manifest["max_len"])
  examples = [to_example(r) for r in recs]
  emb = np.stack([x["text_emb"] for x in examples]).astype(np.float32)
  mask = np.stack([x["text_mask"] for x in examples])
  low = np.stack([np.asarray(r["tokens"]) for r in recs])
  hr_real = np.stack([np.asarray(r["hr_tokens"]) for r in recs])
  size = data_stage.sr_image_size(config)
  images = data_stage.split_source(config, run.inputs["data"],
                                   "validation")
  key = shapes.image_key(size)
  real = np.stack([np.asarray(images[int(r["index"])][key]) for r in recs])
  _, hr = generate.cascade_tokens(emb, mask, seed=config.seed,
                                  low_tokens=low)
  grid = generate.transformer.cfg.grid_size
  sr_grid = generate.superres.model.cfg.grid_size
  base_recon = generate.decode(low.reshape(n, grid, grid))
  bicubic = np.stack([np.asarray(Image.fromarray(x).resize(
      (size, size), Image.BICUBIC)) for x in base_recon])
  def psnr(images: np.ndarray) -> float:
    return reconstruction.mean_psnr(vqgan.to_unit_range(real),
                                    vqgan.to_unit_range(images))

  out = {
      "num_images": n, "image_size": size,
      "superres_psnr": psnr(generate.decode_superres(hr)),
      "bicubic_psnr": psnr(bicubic),
      "sr_tokenizer_psnr": psnr(generate.decode_superres(
          hr_real.reshape(n, sr_grid, sr_grid))),
  }
  out["gain_db"] = out["superres_psnr"] - out["bicubic_psnr"]
  if distributed.is_leader():
    print("[evaluate] super-res from real low-res tokens: " + ", ".join(
        f"{k} {v:.2f}" for k, v in out.items()), flush=True)
  return out
