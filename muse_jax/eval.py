r"""Evaluates a finished workdir, optionally over a sweep of sampler settings.

  python -m muse_jax.eval --workdir=workdir/shapes_demo --num_prompts=300 \
      --guidance=0,0.5,1,2,3 --guidance_schedule=constant,linear \
      --out=workdir/shapes_demo/guidance_sweep

Samples `--num_prompts` prompts of a split (the stored caption embeddings
of the workdir's `tokenize` stage, from `--first_prompt`) under every
combination of `--guidance`, `--guidance_schedule` and `--temperature`
(default: the workdir's own setting), with one seed, and scores them:

* `accuracy`: the shapes scorer's compositional accuracy (shapes data);
* `fid`: FID against the split's real images (pytorch-fid's Inception
  weights from `--inception_path`; the reference statistics are computed
  once and cached beside the dataset, in the data stage's directory, or
  read from `--fid_reference`, pytorch-fid's `.npz`);
* `clip`: CLIP score, the mean cosine of each image's and its caption's
  CLIP embeddings (`--clip_path`: OpenAI's `ViT-L-14.pt`, an open_clip or
  HF checkpoint of `--clip_model`).

Writes `<out>/results.jsonl` (one line per setting), `<out>/metrics.json`,
TensorBoard scalars (`<out>/tb`, step = setting index) and, with more
than one setting, `<out>/sweep.png`: FID against CLIP score when both are
measured (Muse's Figure 8), else accuracy (or FID, or CLIP score) against
guidance; one line per schedule, the workdir's own setting ringed.
"""

from __future__ import annotations

import json
import os

from absl import flags

from muse_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained experiment workdir.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default "
                           "<workdir>/eval).")
_SPLIT = flags.DEFINE_string("split", "validation", "Prompt split.")
_NUM = flags.DEFINE_integer("num_prompts", 300, "Prompts per setting.")
_FIRST = flags.DEFINE_integer("first_prompt", 0, "First prompt's index.")
_GUIDANCE = flags.DEFINE_list("guidance", None, "Guidance scales.")
_SCHEDULES = flags.DEFINE_list("guidance_schedule", None,
                               "Guidance schedules (constant, linear).")
_TEMPERATURES = flags.DEFINE_list("temperature", None,
                                  "Sampling temperatures.")
_METRICS = flags.DEFINE_list("metrics", ["accuracy"],
                             "accuracy (shapes), fid, clip.")
_INCEPTION = flags.DEFINE_string(
    "inception_path", "", "pytorch-fid's pt_inception-2015-12-05-6726825d"
    ".pth (for fid).")
_FID_REFERENCE = flags.DEFINE_string(
    "fid_reference", "", "Reference statistics (.npz with mu, sigma); "
    "default: the split's real images.")
_FID_RESIZE = flags.DEFINE_enum("fid_resize", "pytorch_fid",
                                ["pytorch_fid", "clean"], "FID resize.")
_CLIP_PATH = flags.DEFINE_string(
    "clip_path", "", "CLIP checkpoint (for clip): OpenAI's ViT-L-14.pt, an "
    "open_clip .bin/.safetensors or a HF CLIPModel directory.")
_CLIP_MODEL = flags.DEFINE_string(
    "clip_model", "ViT-L-14-quickgelu", "open_clip model name of "
    "--clip_path (ViT-B-32, ViT-L-14, their -quickgelu forms for OpenAI's "
    "weights) or a JSON file of clip_layout.CLIPArch fields.")
_CLIP_TOKENIZER = flags.DEFINE_string(
    "clip_tokenizer", "", "CLIP BPE (bpe_simple_vocab_16e6.txt.gz or a HF "
    "tokenizer.json); default: the one inside open_clip or clip-anytorch.")
_CLIP_DTYPE = flags.DEFINE_enum(
    "clip_dtype", "float32", ["float32", "bfloat16"],
    "CLIP compute dtype (float32: the reference numbers).")
_CLIP_IMPL = flags.DEFINE_enum(
    "clip_impl", "plain", ["plain", "xla_cpu"],
    "CLIP layer implementation (xla_cpu: faster on CPUs, same function).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per sampling call.")

flags.mark_flags_as_required(["workdir"])

METRICS = ("accuracy", "fid", "clip")


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from absl import logging
  import numpy as np
  from muse_jax.data import records
  from muse_jax.evaluation import shapes_scorer
  from muse_jax.evaluation import sweep
  from muse_jax.stages import evaluate as evaluate_stage
  from muse_jax.stages import tokenize
  from muse_jax.stages import workdir as workdir_lib
  from muse_jax.training import writers
  # pylint: enable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)
  unknown = sorted(set(_METRICS.value) - set(METRICS))
  if unknown or not _METRICS.value:
    raise ValueError(f"--metrics {_METRICS.value}: choose from {METRICS}")
  if _NUM.value < 2 or _FIRST.value < 0:
    raise ValueError("--num_prompts must be >= 2 and --first_prompt >= 0")
  config, dirs = workdir_lib.read(_WORKDIR.value)
  if "tokenize" not in dirs:
    raise FileNotFoundError(f"{_WORKDIR.value}: no tokenize stage (its "
                            "stored caption embeddings are the prompts)")
  source = records.open_source(dirs["tokenize"], _SPLIT.value)
  lo, hi = _FIRST.value, _FIRST.value + _NUM.value
  if hi > len(source):
    raise ValueError(f"--first_prompt + --num_prompts = {hi} > the "
                     f"{len(source)} prompts of split {_SPLIT.value!r}")
  recs = [source[i] for i in range(lo, hi)]
  to_example = tokenize.text_example(source.manifest["max_len"])
  examples = [to_example(r) for r in recs]
  emb = np.stack([x["text_emb"] for x in examples]).astype(np.float32)
  mask = np.stack([x["text_mask"] for x in examples])
  prompts = [r["caption"].decode() if isinstance(r["caption"], bytes)
             else str(r["caption"]) for r in recs]
  if "accuracy" in _METRICS.value and "scene_type" not in recs[0]:
    raise ValueError("--metrics=accuracy scores shapes scenes; this "
                     "workdir's data has no scene types (use fid)")

  scorer_config = None
  if "clip" in _METRICS.value:
    from muse_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
    scorer_config = clip_score.ScorerConfig(
        _CLIP_PATH.value, _CLIP_MODEL.value, _CLIP_TOKENIZER.value,
        batch_size=_BATCH.value or 32, dtype=_CLIP_DTYPE.value,
        impl=_CLIP_IMPL.value)
    if not os.path.exists(_CLIP_PATH.value):  # Before any sampling.
      raise FileNotFoundError(clip_score.missing_weights_message(
          _CLIP_PATH.value, _CLIP_MODEL.value))

  own = evaluate_stage.sampler_config(config)
  mark = sweep.Setting(own.guidance_scale, own.guidance_schedule,
                       own.temperature)
  settings = sweep.grid(
      [float(g) for g in (_GUIDANCE.value or [own.guidance_scale])],
      _SCHEDULES.value or [own.guidance_schedule],
      [float(t) for t in (_TEMPERATURES.value or [own.temperature])])
  out = _OUT.value or os.path.join(_WORKDIR.value, "eval")
  os.makedirs(out, exist_ok=True)

  generate = workdir_lib.load_generator(_WORKDIR.value, superres=True,
                                        batch_size=_BATCH.value)
  base_sampler = generate.sampler
  extractor = reference = None
  if "fid" in _METRICS.value:
    from muse_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
    from muse_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    extractor = fid.Extractor(inception.from_file(_INCEPTION.value),
                              generate.env.mesh, generate.env.rules,
                              resize_mode=_FID_RESIZE.value)
    reference = _fid_reference(config, dirs, extractor, out, hi)
  scorer = None
  if scorer_config is not None:
    scorer = clip_score.CLIPScorer(scorer_config, generate.env.mesh,
                                   generate.env.rules)

  def sample(setting, a, b):
    import dataclasses  # pylint: disable=g-import-not-at-top
    generate.sampler = dataclasses.replace(
        base_sampler, guidance_scale=setting.guidance_scale,
        guidance_schedule=setting.guidance_schedule,
        temperature=setting.temperature)
    # Slices sample what one call over all prompts (the evaluate stage's)
    # does: the same randomness per batch.
    return generate.from_embeddings(emb[a:b], mask[a:b], seed=_SEED.value,
                                    offset=a)

  def score(images):
    result = {}
    if "accuracy" in _METRICS.value:
      scores = [shapes_scorer.score(img, p) for img, p in zip(images, prompts)]
      result.update(shapes_scorer.aggregate(
          scores, np.asarray([r["scene_type"] for r in recs])))
      result["accuracy"] = result["accuracy/overall"]
    if extractor is not None:
      from muse_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
      stats = extractor.statistics(
          [images[i:i + extractor.batch_size]
           for i in range(0, len(images), extractor.batch_size)])
      result["fid"] = fid.frechet_distance(*stats.mu_sigma(), *reference)
    if scorer is not None:
      result["clip_score"] = float(scorer.score(images, prompts).mean())
    return result

  results = sweep.run_settings(settings, num_prompts=len(recs),
                               sample=sample, score=score,
                               chunk=generate.batch_size)
  writer = writers.TensorBoardWriter(os.path.join(out, "tb"))
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    for i, r in enumerate(results):
      f.write(json.dumps(r) + "\n")
      writer.write_scalars(i, {k: float(v) for k, v in r.items()
                               if isinstance(v, (int, float))
                               and not isinstance(v, bool)})
  writer.close()
  summary = {"workdir": _WORKDIR.value, "split": _SPLIT.value,
             "first_prompt": lo, "num_prompts": len(recs),
             "seed": _SEED.value, "steps": base_sampler.num_steps,
             "recipe_setting": mark.label(), "results": results}
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=2)
  # Accuracy, else FID, else CLIP score against the guidance scale.
  y = next(k for m, k in (("accuracy", "accuracy"), ("fid", "fid"),
                          ("clip", "clip_score")) if m in _METRICS.value)
  x = "guidance_scale"
  if "fid" in _METRICS.value and "clip" in _METRICS.value:
    x, y = "clip_score", "fid"  # The trade-off of Muse's Figure 8.
  if len(settings) > 1:
    sweep.plot(results, os.path.join(out, "sweep.png"), x=x, y=y, mark=mark,
               title=f"{len(recs)} {_SPLIT.value} prompts, "
               f"{base_sampler.num_steps} steps")
  for s, r in zip(settings, results):
    print(f"{s.label()}: " + ", ".join(
        f"{k} {r[k]:.3f}" for k in ("accuracy", "fid", "clip_score")
        if k in r),
          flush=True)
  print(f"wrote {out}/results.jsonl and metrics.json"
        + (" and sweep.png" if len(settings) > 1 else ""), flush=True)


def _fid_reference(config, dirs, extractor, out: str, n: int):
  """(mu, sigma) of the split's first `n` real images: `--fid_reference`,
  or computed once and cached beside the dataset (the data stage's
  directory), so every evaluation of it shares them."""
  # pylint: disable=g-import-not-at-top
  from muse_jax.evaluation import fid
  from muse_jax.stages import data as data_stage
  # pylint: enable=g-import-not-at-top
  del out
  if _FID_REFERENCE.value:
    return fid.load_statistics(_FID_REFERENCE.value)
  size = data_stage.image_sizes(config)[-1]
  path = os.path.join(
      dirs["data"], f"fid_reference_{_SPLIT.value}_{n}_{size}px_"
      f"{_FID_RESIZE.value}.npz")
  return fid.cached_statistics(
      path, lambda: data_stage.split_images(config, dirs["data"],
                                            _SPLIT.value, n, size=size),
      extractor)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
