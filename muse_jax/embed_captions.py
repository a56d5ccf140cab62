r"""Embeds captions once into an on-disk cache the tokenize stage can read.

  python -m muse_jax.embed_captions --config=configs/shapes_demo.py \
      --out=workdir/caption_cache --workdir=workdir/shapes_demo
  python -m muse_jax.embed_captions --config=configs/shapes_demo.py \
      --out=DIR --captions=captions.txt

Encodes the distinct captions of a text file (one per line, blank lines
skipped) or of the configured dataset's splits (`--split`, default all;
the dataset is the main job's `data` stage in `--workdir`, built there if
it is not yet) with the config's `text_encoder`, into the cache format of
`muse_jax.text_encoders.cache`. Resumable: a re-run finishes the missing
shards and redoes none. Point the experiment at it with
`--config.text_encoder.cache_dir=DIR`: its tokenize stage then reads the
embeddings and never loads the encoder.

Several processes (`--coordinator_address` ... as for `muse_jax.main`, or
a cluster JAX detects): each encodes its share of the shards on its own
devices (`--fsdp=N` shards the weights over N of them), process 0 writes
the manifest. Prints each shard's captions/s and a summary.
"""

from __future__ import annotations

import copy

from absl import app
from absl import flags
from absl import logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from muse_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]); its "
    "text_encoder section picks the encoder.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "The cache directory (created; a "
                           "partly built one is finished).")
_CAPTIONS = flags.DEFINE_string(
    "captions", None, "A text file of captions, one per line; default: the "
    "configured dataset's captions.")
_SPLITS = flags.DEFINE_list(
    "split", None, "Dataset splits whose captions to embed (default: all).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The experiment workdir whose data stage holds the "
    "dataset (built if missing); needed without --captions.")
_PER_SHARD = flags.DEFINE_integer("captions_per_shard", 4096,
                                  "Distinct captions per cache shard.")
_FSDP = flags.DEFINE_integer(
    "fsdp", 1, "Local devices each encoder copy's weights are sharded over "
    "(1: every device holds the whole encoder).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")

flags.mark_flags_as_required(["config", "out"])


def read_captions(path: str) -> list[str]:
  """The lines of a text file, blank ones skipped."""
  return [line for line in epath.Path(path).read_text().splitlines()
          if line.strip()]


def dataset_captions(config: ml_collections.ConfigDict, workdir: str,
                     splits: list[str] | None = None) -> list[str]:
  """The captions of the shapes dataset's `splits` (default all), from the
  main job's `data` stage in `workdir` (run now if it has not finished)."""
  # pylint: disable=g-import-not-at-top
  from muse_jax import stages
  from muse_jax.data import shapes
  from muse_jax.stages import data as data_stage
  # pylint: enable=g-import-not-at-top
  if data_stage.source_name(config) != "shapes":
    raise ValueError(f"data.name={data_stage.source_name(config)!r} has no "
                     "captions; pass --captions=FILE")
  splits = list(splits or shapes.SPLITS)
  unknown = [s for s in splits if s not in shapes.SPLITS]
  if unknown:
    raise ValueError(f"unknown splits {unknown}; known: {shapes.SPLITS}")
  # The cache being built is not there yet: the graph's checks must not look
  # for it (cache_dir is in no fingerprint, so the data stage's directory is
  # the main job's).
  config = copy.deepcopy(config)
  if "cache_dir" in config.text_encoder:
    config.text_encoder.cache_dir = ""
  graph = stages.build(config, workdir)
  graph.run(["data"])
  return [c for split in splits for c in data_stage.split_captions(
      config, graph.stage_dir("data"), split)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CAPTIONS.value and _SPLITS.value:
    raise app.UsageError("--captions and --split exclude each other")
  if not _CAPTIONS.value and not _WORKDIR.value:
    raise app.UsageError("the dataset's captions need --workdir (or pass "
                         "--captions=FILE)")
  logging.set_verbosity(logging.ERROR)  # Library INFO chatter off.
  from muse_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  # pylint: disable=g-import-not-at-top
  import time
  import jax
  from muse_jax import text_encoders
  from muse_jax.text_encoders import cache
  # pylint: enable=g-import-not-at-top
  config = _CONFIG.value
  if _CAPTIONS.value:
    captions = read_captions(_CAPTIONS.value)
  else:
    captions = dataset_captions(config, _WORKDIR.value, _SPLITS.value)
  t0 = time.perf_counter()
  s = cache.build_for_config(
      text_encoders.config_from(config.text_encoder), config.sharding_rules,
      _OUT.value, captions, fsdp=_FSDP.value,
      captions_per_shard=_PER_SHARD.value, log=print)
  wall = time.perf_counter() - t0
  rate = (f"{s['captions']} captions encoded in {s['encode_s']:.1f}s "
          f"({s['captions'] / max(s['encode_s'], 1e-9):.1f} captions/s)"
          if s["captions"] else "nothing left to encode")
  print(f"[embed_captions] process {jax.process_index()}: {rate}; "
        f"{len(s['skipped'])} finished shards kept", flush=True)
  if distributed.is_leader():
    print(f"embedding cache {_OUT.value}: {s['num_captions']} distinct "
          f"captions (of {len(captions)}) in {s['num_shards']} shards, "
          f"{s['num_truncated']} truncated to the encoder's max_len; "
          f"{wall:.1f}s wall", flush=True)


def run():
  from muse_jax.text_encoders import cache  # pylint: disable=g-import-not-at-top
  cli.run(main, errors=(ValueError, FileNotFoundError, cache.CacheError))


if __name__ == "__main__":
  run()
