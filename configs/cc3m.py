r"""Muse's base model on CC3M-style data: raw img2dataset shards -> trained model.

Pipeline "muse" on a real captioned dataset (muse_jax.stages.captioned):
list the train and validation shards -> train the f=16 VQGAN tokenizer on
random 256 px squares streamed from the raw shards (grain; the stream's
position is in the tokenizer's checkpoints) -> pre-tokenise both splits
once (16x16 tokens of the centre square, frozen T5-XXL caption embeddings;
one ArrayRecord shard per input shard, resumable, skipped records counted
by reason in <split>.skips.json) -> train the base masked transformer on
the token records -> sample the validation captions (24 steps, linear
guidance ramp) into samples.png.

Paper values (Chang et al. 2023; ../shared reference): tokenizer f=16,
codebook 8192, 128 base channels, 2 residual blocks per level, perceptual
0.05 and adversarial 0.1 losses, Adam lr 1e-4 (b 0.9/0.99, wd 1e-4), 10k
warmup, batch 256; transformer AdamW lr 1e-4 (b 0.9/0.96, wd 0.045), 5k
warmup, cosine decay, batch 512, mask rate cos(pi/2 u), 10% text dropout;
24 decoding steps. The paper gives no config for its 632M CC3M model: 24
layers of width 1280 (MLP 5120, 20 heads) hold 629M parameters in their
attention, cross-attention and MLP blocks, 658M with the embeddings and
output head (tests/test_captioned_pipeline.py counts them). It trains the base model with Adafactor; this
recipe uses AdamW (muse_jax.training.optimizer). Label smoothing 0.1 and
the text length 64 are not in the paper (MaskGIT's smoothing).

COMMANDS (raw shards -> trained base model):
  # 1. Download CC3M with img2dataset as webdataset shards (or parquet):
  #    img2dataset --url_list cc3m.tsv --input_format tsv \
  #      --url_col url --caption_col caption --output_format webdataset \
  #      --image_size 256 --resize_mode keep_ratio --output_folder /data/cc3m
  # 2. Train (every stage in order, resumable; T5-XXL weights from
  #    Hugging Face safetensors or a T5X checkpoint):
  python -m muse_jax.main --config=configs/cc3m.py \
      --workdir=gs://bucket/muse/cc3m \
      --config.data.train.path=/data/cc3m/train \
      --config.data.validation.path=/data/cc3m/validation \
      --config.text_encoder.path=/models/t5-v1_1-xxl \
      --config.tokenizer.perceptual.vgg16_path=/models/vgg16-397923af.pth
  # Parquet: --config=configs/cc3m.py:format=parquet (image bytes in the
  # "jpg" column); COCO: :format=coco with data.{train,validation}.images.
  # Multi-host: launch/tpu_pod.sh or launch/slurm.sbatch with the same
  # flags; each process streams and pre-tokenises its own shards.
Smoke-size variant (tests; shards written by tests/captioned_files.py):
  --config=configs/cc3m.py:tiny,format=webdataset (or parquet, coco)

EXPECTED: at full size, not run here (no accelerator in this project's
CI). The tiny variant trains every stage in about a minute on a 2-core CPU
(tests/test_captioned_pipeline.py).
"""

import ml_collections

from configs import common
from configs import shapes_demo


def source(fmt: str, **kw) -> ml_collections.ConfigDict:
  """A `data.train` / `data.validation` section (dataset.SourceConfig)."""
  s = dict(format=fmt, path="", images="", min_size=0, image_column="jpg",
           path_column="", caption_column="caption", key_column="key",
           records_per_shard=1000, split="", data_dir="",
           image_feature="image", caption_feature="caption")
  s.update(kw)
  return ml_collections.ConfigDict(s)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, tiny=False, format="webdataset")
  # The shapes recipe's sections, each value below set for this data.
  c = shapes_demo.get_config("tiny" if arg.tiny else None)
  c.pipeline = "muse"

  c.data = ml_collections.ConfigDict(dict(
      name="captioned",
      image_size=256,
      # Validation fields left empty take train's (a TFDS validation split
      # is just split="validation").
      train=source(arg.format, split="train", min_size=128),
      validation=source("", min_size=0),
      crop="random",  # Tokenizer training squares; pre-tokenising: centre.
      caption="random",  # One of several captions (COCO has five).
      num_workers=4,  # grain worker processes streaming the raw shards.
      seed=0,
  ))

  c.text_encoder.update(name="t5_v1_1_xxl", path="", max_len=64,
                        batch_size=256, dtype="bfloat16",
                        param_dtype="bfloat16")

  t = c.tokenizer
  t.model.update(patch_size=1, base_channels=128, channel_mult=(1, 1, 2, 2, 4),
                 num_res_blocks=2, num_groups=32, codebook_size=8192,
                 code_dim=256, quantizer="euclidean", entropy_weight=0.0,
                 local_encoder=False)
  t.loss.update(l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.05)
  t.adversarial.update(weight=0.1, start_step=20000)
  t.discriminator.update(base_channels=64, channel_mult=(1, 2, 4, 8),
                         max_channels=512)
  t.optimizer.update(learning_rate=1e-4, warmup_steps=10000, b1=0.9,
                     b2=0.99, weight_decay=1e-4, end_lr_fraction=0.0)
  t.disc_optimizer.update(learning_rate=1e-4, b1=0.9, b2=0.99)
  t.loop.update(num_steps=1_000_000, log_every=1000, checkpoint_every=5000,
                keep_checkpoints=3)
  t.batch_size = 256
  c.tokenize.batch_size = 256

  x = c.transformer
  x.model.update(width=1280, depth=24, num_heads=20, mlp_dim=5120,
                 dtype="bfloat16", param_dtype="float32", scan_layers=True,
                 remat_policy="dots_no_batch", attention_impl="plain",
                 matmul_impl="plain", qk_norm="none")
  x.objective.update(schedule="cosine", label_smoothing=0.1,
                     text_dropout=0.1)
  x.optimizer.update(learning_rate=1e-4, warmup_steps=5000, b1=0.9, b2=0.96,
                     weight_decay=0.045, end_lr_fraction=0.0)
  x.loop.update(num_steps=1_000_000, log_every=1000, checkpoint_every=5000,
                keep_checkpoints=3)
  x.batch_size = 512

  c.sampling.update(num_steps=24, guidance_scale=3.0,
                    guidance_schedule="linear", temperature=1.0,
                    confidence="tempered")
  c.eval.update(validation_start=0, num_validation=1000, num_heldout=0,
                grid_prompts=32, batch_size=64)

  if arg.tiny:
    c.data.update(image_size=32, num_workers=0)
    c.data.train.update(min_size=16, records_per_shard=8)
    c.data.validation.update(records_per_shard=8)
    c.text_encoder.update(name="minilm", path="", max_len=16, batch_size=32,
                          dtype="float32", param_dtype="float32")
    t.model.update(patch_size=2, base_channels=8, channel_mult=(1, 2, 2),
                   num_res_blocks=1, num_groups=4, codebook_size=32,
                   code_dim=4, quantizer="l2_normalized")
    t.loss.perceptual_weight = 0.0
    t.adversarial.start_step = 2
    t.discriminator.update(base_channels=4, channel_mult=(1, 2),
                           max_channels=8)
    t.optimizer.warmup_steps = 0
    t.loop.update(num_steps=4, log_every=2, checkpoint_every=2)
    t.batch_size = 8
    c.tokenize.batch_size = 8
    x.model.update(width=32, depth=2, num_heads=2, mlp_dim=64,
                   dtype="float32", remat_policy="none")
    x.optimizer.warmup_steps = 0
    x.loop.update(num_steps=4, log_every=2, checkpoint_every=2)
    x.batch_size = 8
    c.sampling.update(num_steps=4, guidance_scale=1.0)
    c.eval.update(num_validation=8, grid_prompts=8, batch_size=8)
  return c


def sweep(add):
  """Guidance around the recipe (the base model's headline knob, Muse
  Fig. 8); `launch/sweep.py` trains once and re-samples per point."""
  for scale in (1.0, 2.0, 3.0, 4.0):
    for schedule in ("constant", "linear"):
      add(**{"sampling.guidance_scale": scale,
             "sampling.guidance_schedule": schedule})
