r"""Muse's cascade on the shapes dataset: base at 64 px, super-res to 128 px.

Stages (muse_jax.stages, pipeline "cascade"): build the shapes dataset with
every scene rendered at 64 and 128 px -> train the base tokenizer (64 px ->
8x8 tokens) and the super-res tokenizer (128 px -> 16x16 tokens) -> tokenize
both resolutions (`tokenize`, with the caption embeddings; `sr_tokenize`)
-> train the base transformer (the shapes demo's) and the super-res
transformer (16x16 high-res tokens cross-attending to [low-res token
encoder; text]) -> sample validation
prompts through the cascade (16 base steps, 8 super-res steps), score both
resolutions, write samples.png (64 px and 128 px rows) and metrics.json ->
edit validation scenes (stage `edits`: edits.png, edits.json).

COMMAND:
  python -m muse_jax.main --config=configs/shapes_cascade.py \
      --workdir=workdir/shapes_cascade
Smoke-size variant (tests): --config=configs/shapes_cascade.py:tiny

This is what `make demo` runs (workdir workdir/shapes_demo).

EXPECTED (2-core AMD EPYC, Zen 4 class, AVX-512; 2026-12-04; README
"Results"): make demo ~40 min on this CPU, install included
(transformer ~1000 s at 9 steps/s, sr_tokenizer 485 s, superres 340 s at
5.9 steps/s); metrics.json: validation (128 px) single 0.88, count 0.58,
relation 0.11, overall 0.523; validation_base (64 px) overall 0.507;
superres_quality: superres_psnr 39.3 dB, bicubic_psnr 34.4,
sr_tokenizer_psnr 41.1. edits.json: maskfree success 0.97, inpaint 0.94,
outpaint 0.50, tokens outside the regions kept bitwise 1.0.
"""

import ml_collections

from configs import common
from configs import shapes_demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, tiny=False)
  c = shapes_demo.get_config("tiny" if arg.tiny else None)
  c.pipeline = "cascade"
  c.data.sr_image_size = 128

  # The super-res tokenizer: the base tokenizer's architecture (f = 8,
  # fully convolutional) on the 128 px renderings: 16x16 tokens.
  c.sr_tokenizer = ml_collections.ConfigDict(c.tokenizer.to_dict())
  c.sr_tokenizer.loop.update(num_steps=4000)
  c.sr_tokenizer.adversarial.start_step = 1500
  # Reconstruction (L2) only: the super-res stage is judged by PSNR against
  # the real 128 px images (held-out 41.1 dB after 4000 steps, 36.5 after
  # 2000; with the critic from step 1500, 31.2 dB on 64 px crops).
  c.sr_tokenizer.adversarial.weight = 0.0
  # Whole 128 px images: trained on random 64 px windows (train_crop=64,
  # 4x cheaper per step) it reconstructs whole images far worse (32.95 dB
  # after 4000 steps vs 41.1), its GroupNorm statistics and
  # context being those of a window.
  c.sr_tokenizer.train_crop = 0

  c.superres = ml_collections.ConfigDict(dict(
      # Super-res is local (each low-res token's patch becomes 2x2 high-res
      # tokens): a 2-layer stack over a 1-layer low-res encoder, batch 8,
      # is 1/4 the base model's depth x batch per token.
      model=dict(width=128, depth=2, num_heads=4, mlp_dim=512,
                 dtype=c.transformer.model.dtype, param_dtype="float32",
                 scan_layers=True, remat_policy="full",
                 attention_impl="xla_cpu", matmul_impl="xla_cpu",
                 qk_norm="all", self_attention="full", attention_window=8),
      lowres_depth=1,
      # The low-res encoder's output also enters the high-res grid directly
      # (models/superres.py, LowResConfig.aligned): without it this small,
      # briefly trained model drew the objects in the wrong places.
      lowres_aligned=True,
      objective=dict(schedule="cosine", label_smoothing=0.1,
                     text_dropout=0.1, loss_impl="fused", loss_chunk=0),
      optimizer=dict(learning_rate=2e-3, warmup_steps=200, b1=0.9, b2=0.96,
                     weight_decay=0.045, decay="kernels", grad_clip_norm=1.0,
                     end_lr_fraction=0.05),
      loop=dict(num_steps=2000, log_every=200, checkpoint_every=1000,
                keep_checkpoints=2, eval_every=0),
      batch_size=8,
      # Super-res decoding (P§2.8: 8 steps): 32 of the 256 tokens per step.
      sampling=dict(num_steps=8, schedule="cosine", guidance_scale=1.0,
                    guidance_schedule="constant", temperature=0.1,
                    choice_temperature=1.0, top_k=0,
                    confidence="untempered"),
  ))

  # Zero-shot editing of validation scenes (stage `edits`): per mode,
  # num_images edits scored by the shapes scorer. Mask-free: the paper's 8%
  # of the tokens per iteration for 100 iterations, at this model's own
  # guidance (1.0, as its decoder) and greedy resampling (top-k 1). The
  # paper's guidance 4 / top-k 3 (the editing API's and CLI's defaults)
  # overdrives this small model: 9% of recolourings succeed (objects
  # dissolve into blobs) against 97% here; guidance 1 / top-k 3: 61%,
  # guidance 2 / top-k 3: 56% (validation scenes 0-99; 99% on 100-199).
  c.edits = ml_collections.ConfigDict(dict(
      num_images=100, batch_size=50, seed=0, grid_examples=4,
      maskfree=dict(iterations=100, fraction=0.08, guidance_scale=1.0,
                    top_k=1),
  ))

  if arg.tiny:
    c.sr_tokenizer.loop.update(num_steps=2, log_every=2, checkpoint_every=2)
    c.sr_tokenizer.adversarial.start_step = 1
    c.superres.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.superres.lowres_depth = 1
    c.superres.loop.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.superres.batch_size = 8
    c.superres.sampling.num_steps = 2
    c.sr_tokenizer.train_crop = 32
    c.edits.update(num_images=2, batch_size=2, grid_examples=1)
    c.edits.maskfree.iterations = 3
  return c


def sweep(add):
  """Super-res decoding steps and guidance around the recipe."""
  for steps in (4, 8):
    for scale in (0.0, 1.0, 2.0):
      add(**{"superres.sampling.num_steps": steps,
             "superres.sampling.guidance_scale": scale})
