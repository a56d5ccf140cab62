r"""Pre-tokenises a captioned dataset with a trained workdir's tokenizers.

  python -m muse_jax.pretokenize --workdir=workdir/shapes_demo \
      --format=webdataset --path=/data/cc3m/shards --out=/data/cc3m/tokens

Every image is read once (`muse_jax.data.captioned`: webdataset tar
shards, parquet, COCO, an image folder, a prepared TFDS dataset), cut to a square at the high-res
side (`data.sr_image_size` of a cascade workdir, else `data.image_size`;
centre crop, or `--crop=random` seeded by the record's key), and encoded
by the workdir's tokenizer (`tokens`, the square downsampled to
`data.image_size`) and, in a cascade, its super-res tokenizer (`hr_tokens`)
-- both grids of one crop. Records also keep `caption`, `key` and, with
`--embed_captions`, the workdir's text encoder's `text_emb` (bfloat16,
padding dropped: what the `tokenize` stage writes). Output: one ArrayRecord
shard per input shard, resumable after a kill and split over processes
(`data.captioned.convert`); `<name>.json` (the manifest the trainers read)
and `<name>.skips.json` (skipped records by reason) come last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import flags
from absl import logging

from muse_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Workdir with trained tokenizer stage(s).")
_FORMAT = flags.DEFINE_enum("format", None, ["webdataset", "parquet", "coco",
                                             "folder", "tfds"],
                            "Input format.")
_PATH = flags.DEFINE_string(
    "path", None, "Shard folder or glob (webdataset, parquet), annotations "
    "JSON (coco), image folder (folder), or a prepared TFDS dataset's name "
    "or directory (tfds).")
_IMAGES = flags.DEFINE_string("images", "", "COCO image folder.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_NAME = flags.DEFINE_string("name", "train", "Record set name.")
_MIN_SIZE = flags.DEFINE_integer("min_size", 0,
                                 "Skip images with a shorter side below.")
_CROP = flags.DEFINE_enum("crop", "center", ["center", "random"],
                          "Square crop position.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of random crops.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per encode call.")
_EMBED = flags.DEFINE_bool("embed_captions", False,
                           "Store the text encoder's caption embeddings.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 1000,
                                  "coco / folder / tfds: records per shard.")
_IMAGE_COL = flags.DEFINE_string("image_column", "jpg", "parquet: bytes.")
_PATH_COL = flags.DEFINE_string("path_column", "", "parquet: image paths.")
_CAPTION_COL = flags.DEFINE_string("caption_column", "caption",
                                   "parquet: captions.")
_SPLIT = flags.DEFINE_string("split", "train", "tfds: the split.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds: the data_dir.")
_IMAGE_FEATURE = flags.DEFINE_string("image_feature", "image",
                                     "tfds: the image feature.")
_CAPTION_FEATURE = flags.DEFINE_string(
    "caption_feature", "caption", "tfds: the caption feature ('/' path).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "jax.distributed coordinator host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")

flags.mark_flags_as_required(["workdir", "format", "path", "out"])


def make_transform(workdir: str, *, crop: str = "center", seed: int = 0,
                   embed_captions: bool = False
                   ) -> tuple[Callable[[list[dict[str, Any]]],
                                       list[dict[str, Any]]], dict[str, Any]]:
  """(batch transform for `convert.convert`, manifest info) from a
  workdir's tokenizers (and text encoder), on this process's devices: each
  process encodes its own shards, never in step with the others."""
  # pylint: disable=g-import-not-at-top
  from muse_jax.data.captioned import preprocess
  from muse_jax.stages import artifacts
  from muse_jax.stages import captioned
  from muse_jax.stages import env as env_lib
  from muse_jax.stages import tokenize
  from muse_jax.stages import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  config, dirs = workdir_lib.read(workdir)
  if "tokenizer" not in dirs:
    raise FileNotFoundError(f"{workdir}: no tokenizer stage (stages.json "
                            f"has {sorted(dirs)})")
  env = env_lib.Env(config).local()
  size = config.data.image_size
  cascade = "sr_tokenizer" in dirs
  top = config.data.sr_image_size if cascade else size
  if top % size:
    raise ValueError(f"data.sr_image_size {top} is not a multiple of "
                     f"data.image_size {size}")
  base = tokenize.image_tokenizer(
      config, env, artifacts.load_vq(config, dirs["tokenizer"], env), "image")
  hr = (tokenize.image_tokenizer(
      config, env, artifacts.load_sr_vq(config, dirs["sr_tokenizer"], env),
      "image") if cascade else None)
  encoder = env.text_encoder() if embed_captions else None
  transform = captioned.record_transform(
      captioned.seeded_squares(
          preprocess.PreprocessConfig(image_size=top, crop=crop), seed),
      base, size=size, hr_tokens=hr, encoder=encoder)
  info = {"image_size": size, "sr_image_size": top if cascade else None,
          "crop": crop, "workdir": str(workdir)}
  if encoder is not None:
    info.update(text_dim=encoder.dim, max_len=encoder.max_len)
  return transform, info


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from muse_jax import distributed
  from muse_jax.data.captioned import convert
  from muse_jax.data.captioned import dataset
  import jax
  # pylint: enable=g-import-not-at-top
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  source = dataset.SourceConfig(
      format=_FORMAT.value, path=_PATH.value, images=_IMAGES.value,
      min_size=_MIN_SIZE.value, image_column=_IMAGE_COL.value,
      path_column=_PATH_COL.value, caption_column=_CAPTION_COL.value,
      records_per_shard=_PER_SHARD.value, split=_SPLIT.value,
      data_dir=_DATA_DIR.value, image_feature=_IMAGE_FEATURE.value,
      caption_feature=_CAPTION_FEATURE.value)
  shards = dataset.list_shards(source)
  transform, info = make_transform(_WORKDIR.value, crop=_CROP.value,
                                   seed=_SEED.value,
                                   embed_captions=_EMBED.value)
  counts = convert.convert(shards, _OUT.value, _NAME.value, transform,
                           batch_size=_BATCH.value,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  logging.info("process %d: %s", jax.process_index(), counts)
  distributed.barrier("pretokenize-done")
  if distributed.is_leader():
    manifest = convert.finalize(_OUT.value, _NAME.value, len(shards), info)
    print(f"wrote {manifest['num_records']} records in {len(shards)} "
          f"shards to {_OUT.value} (skipped: {manifest['skipped'] or 'none'})",
          flush=True)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
