r"""An f=8, 1024-code VQGAN tokenizer on real photographs, CPU, ~30 minutes.

Pipeline "tokenizer" (muse_jax.stages): random 64x64 crops of the
photographs bundled with scikit-image (four whole photographs held out,
muse_jax.data.photos) -> train the tokenizer (VQGAN task: L2 + adversarial,
dead-code restarts; LPIPS when a VGG16 file is given) -> fine-tune a larger
decoder with encoder and codebook frozen (Muse Sec. 2.5) -> evaluate both
on 256 held-out crops against a k-means codebook of the same size fitted to
raw 8x8 patches of the same training crops; writes
tokenizer_metrics.json and reconstructions.png.

COMMAND:
  python -m muse_jax.main --config=configs/photos_tokenizer.py \
      --workdir=workdir/photos_tokenizer
  (add --config.tokenizer.perceptual.vgg16_path=/path/vgg16-397923af.pth
   and --config.tokenizer.loss.perceptual_weight=0.1 for LPIPS)
Smoke-size variant (tests): --config=configs/photos_tokenizer.py:tiny

EXPECTED (2-core AMD EPYC, Zen 4 class, AVX-512; 2026-12-04, machine
otherwise idle; README "Tokenizers"): tokenizer stage 25.8 min (3.46
steps/s, ~2.7 once the discriminator starts at step 4000), decoder
fine-tuning ~10 min; on 1024 held-out crops tokenizer 26.27 dB PSNR, 99.2%
codebook usage, perplexity 564; fine-tuned decoder 26.34 dB; k-means of the
same size 24.46 dB, 77.5%.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pipeline = "tokenizer"

  c.data = ml_collections.ConfigDict(dict(
      name="photos",
      image_size=64,
      num_train=131072,  # The crop table the tokenizer's iterator shuffles.
      num_heldout=1024,  # 64 tokens per code: usage is not a sampling limit.
      seed=0,
      data_dir="",
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      # f = patch_size * 2**(len(channel_mult)-1) = 4 * 2 = 8.
      model=dict(
          patch_size=4,
          base_channels=64,
          channel_mult=(1, 2),
          num_res_blocks=2,
          num_groups=16,
          codebook_size=1024,
          code_dim=8,
          quantizer="l2_normalized",
          commitment_cost=0.25,
          entropy_weight=0.0,
          restart_threshold=0.02,
          usage_decay=0.99,
      ),
      loss=dict(l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.0),
      perceptual=dict(vgg16_path=""),
      adversarial=dict(weight=0.1, kind="hinge", start_step=4000,
                       adaptive=True, max_adaptive_weight=1e4, r1_weight=0.0,
                       r1_every=4, lecam_weight=0.0, lecam_decay=0.999),
      discriminator=dict(base_channels=16, channel_mult=(1, 2, 4),
                         max_channels=128),
      disc_optimizer=dict(learning_rate=2e-4, warmup_steps=0, b1=0.5,
                          b2=0.99, weight_decay=0.0, decay="kernels",
                          grad_clip_norm=0.0, end_lr_fraction=1.0),
      ema_decay=0.0,
      optimizer=dict(learning_rate=2e-3, warmup_steps=200, b1=0.9, b2=0.99,
                     weight_decay=0.0, decay="kernels", grad_clip_norm=1.0,
                     end_lr_fraction=0.05),
      loop=dict(num_steps=5000, log_every=500, checkpoint_every=1000,
                keep_checkpoints=2, eval_every=1000),
      batch_size=16,
  ))

  # Muse Sec. 2.5: a larger decoder on the frozen encoder and codebook:
  # twice the residual blocks per resolution, started from the trained
  # decoder (the extra blocks begin as the identity: tasks.vq.grow_decoder).
  # A wider decoder (base 96) started from scratch ended 0.23 dB below the
  # trained one after 1000 steps.
  c.tokenizer_decoder = ml_collections.ConfigDict(dict(
      model=dict(decoder_num_res_blocks=4),
      optimizer=dict(learning_rate=5e-4, warmup_steps=100, b1=0.9, b2=0.99,
                     weight_decay=0.0, decay="kernels", grad_clip_norm=1.0,
                     end_lr_fraction=0.05),
      adversarial=dict(weight=0.1, kind="hinge", start_step=0, adaptive=True,
                       max_adaptive_weight=1e4, r1_weight=0.0, r1_every=4,
                       lecam_weight=0.0, lecam_decay=0.999),
      loop=dict(num_steps=1000, log_every=250, checkpoint_every=500,
                keep_checkpoints=2, eval_every=0),
  ))

  c.tokenizer_eval = ml_collections.ConfigDict(dict(
      num_images=1024,
      batch_size=64,
      grid_images=8,
      kmeans_train_crops=8192,  # 524288 patches of 8x8x3.
      kmeans_max_fit_patches=262144,
  ))

  common.mesh_and_rules(c)

  if arg.tiny:
    c.data.update(num_train=256, num_heldout=16)
    c.tokenizer.model.update(base_channels=8, num_groups=4, codebook_size=32)
    c.tokenizer.adversarial.start_step = 2
    c.tokenizer.discriminator.update(base_channels=4, max_channels=8)
    c.tokenizer.loop.update(num_steps=4, log_every=2, checkpoint_every=2,
                            eval_every=0)
    c.tokenizer.batch_size = 8  # Divisible by the tests' 8 devices.
    c.tokenizer_decoder.model.update(decoder_base_channels=12)  # Fresh.
    c.tokenizer_decoder.loop.update(num_steps=3, log_every=1,
                                    checkpoint_every=2)
    c.tokenizer_eval.update(num_images=16, batch_size=8, grid_images=4,
                            kmeans_train_crops=64,
                            kmeans_max_fit_patches=4096)
  return c


def sweep(add):
  """Codebook remedies and adversarial start, each point one full run."""
  for threshold in (0.0, 0.02):
    for entropy in (0.0, 0.001):
      add(**{"tokenizer.model.restart_threshold": threshold,
             "tokenizer.model.entropy_weight": entropy})
