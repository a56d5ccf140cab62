"""Stage `tokenize`: image tokens and caption embeddings, as ArrayRecord shards.

Every split is read in chunks: the chunk's images are VQ-encoded by the
trained tokenizer and its distinct captions embedded once by the frozen
text encoder, each batch sharded over the mesh's data axis. With
`text_encoder.cache_dir` set, the embeddings come from that pre-computed
cache instead (`text_encoders.cache`, built by `muse_jax.embed_captions`):
the encoder's weights are never loaded, a cache of another encoder or one
lacking a caption is an error, and the records are the same. One record per
example (`data.records`): `tokens` int32 [N], `caption`, `text_emb` bfloat16
[caption tokens, dim] (padding dropped; readers pad to `max_len`),
`scene_type` and `index`. Process 0 writes the shards, so a run on several
processes writes the same files as a run on one. Captioned data
(`data.name="captioned"`) is pre-tokenised by `captioned.tokenize`
instead: train and validation records with `tokens`, `caption`, `key` and
`text_emb`, one shard per input shard.

Stage `sr_tokenize` (`SrTokenize`, the cascade): per example `hr_tokens`,
the super-res tokenizer's tokens of the same scene rendered at
`data.sr_image_size` (the super-res stage's targets), and `index`, in the
same order as `tokenize`'s records (`paired_source` joins the two). A
stage of its own so that a new super-res tokenizer re-runs the super-res
side only, never the base transformer.
"""

from __future__ import annotations

from collections.abc import Iterator
import time
from typing import Any

import jax
from etils import epath
import ml_dtypes
import numpy as np

from muse_jax import distributed
from muse_jax import sharding
from muse_jax import text_encoders
from muse_jax.data import records
from muse_jax.data import shapes
from muse_jax.models import vqgan
from muse_jax.stages import artifacts
from muse_jax.stages import captioned
from muse_jax.stages import data as data_stage
from muse_jax.stages import graph
from muse_jax.text_encoders import cache

CHUNK = 4096  # Examples per shard (and per distinct-caption pass).


def _as_str(x: Any) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


class Tokenize(graph.Stage):
  name = "tokenize"
  reads = ("data", "tokenizer")
  config_keys = ("text_encoder", "tokenize")
  # The cache holds what the encoder would compute: same records.
  fingerprint_ignores = ("text_encoder.cache_dir",)

  def check(self, config) -> None:
    cfg = text_encoders.config_from(config.text_encoder)
    if config.tokenize.batch_size < 1:
      raise ValueError("tokenize.batch_size must be >= 1")
    if cfg.cache_dir:  # Missing, unfinished or another encoder's: fail now.
      cache.open_for(cfg)

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    if data_stage.source_name(run.config) == "captioned":
      return captioned.tokenize(run)
    config, env = run.config, run.env
    image_tokens = image_tokenizer(
        config, env, artifacts.load_vq(config, run.inputs["tokenizer"], env),
        shapes.image_key(config.data.image_size))
    cfg = text_encoders.config_from(config.text_encoder)
    # Either embeds captions: `encode(texts) -> EncodedText`, `dim`, `max_len`.
    encoder = cache.open_for(cfg) if cfg.cache_dir else env.text_encoder()
    verb = "read from the cache" if cfg.cache_dir else "embedded"
    info: dict[str, Any] = {"text_dim": encoder.dim,
                            "max_len": encoder.max_len}
    if cfg.cache_dir:
      info["text_cache"] = cfg.cache_dir

    for split in shapes.SPLITS:
      source = data_stage.split_source(config, run.inputs["data"], split)
      stats = {"examples": len(source), "distinct_captions": 0,
               "truncated_captions": 0, "text_encode_s": 0.0}

      def examples(source=source, stats=stats) -> Iterator[dict[str, Any]]:
        for lo in range(0, len(source), CHUNK):
          recs = [source[i] for i in range(lo, min(len(source), lo + CHUNK))]
          tokens = image_tokens(recs)
          captions = [_as_str(r["caption"]) for r in recs]
          distinct, which = np.unique(np.asarray(captions),
                                      return_inverse=True)
          t0 = time.perf_counter()
          text = encoder.encode([str(c) for c in distinct])
          stats["text_encode_s"] += time.perf_counter() - t0
          stats["distinct_captions"] += len(distinct)
          stats["truncated_captions"] += text.num_truncated
          lengths = text.mask.sum(axis=1)
          emb = text.embeddings.astype(ml_dtypes.bfloat16)
          for j, r in enumerate(recs):
            c = which[j]
            out = {"tokens": tokens[j], "caption": captions[j],
                   "text_emb": emb[c, :lengths[c]],
                   "scene_type": int(r["scene_type"]),
                   "index": int(r["index"])}
            yield out

      if distributed.is_leader():
        records.write(run.dir, split, examples(), records_per_shard=CHUNK,
                      info={"text_dim": encoder.dim,
                            "max_len": encoder.max_len})
      else:
        for _ in examples():  # The same sharded computations, no writes.
          pass
      distributed.barrier(f"tokenize-{split}")
      info[split] = stats
      if not distributed.is_leader():
        continue
      if stats["truncated_captions"]:
        print(f"[tokenize] {split}: {stats['truncated_captions']} of "
              f"{stats['distinct_captions']} distinct captions truncated to "
              f"{encoder.max_len} tokens", flush=True)
      print(f"[tokenize] {split}: {stats['examples']} images, "
            f"{stats['distinct_captions']} distinct captions {verb} in "
            f"{stats['text_encode_s']:.1f}s", flush=True)
    return info


def image_tokenizer(config, env, vq: vqgan.VQModel, key: str):
  """records -> int32 [len, tokens]: `vq`'s tokens of each record's image
  `key`, in batches of `tokenize.batch_size` sharded over the data axis
  (the last one padded: one compiled shape)."""
  encode = jax.jit(lambda m, x: m.encode_to_indices(x))
  bs = max(1, config.tokenize.batch_size // env.data_shards) * (
      env.data_shards)

  def batch_tokens(images: np.ndarray) -> np.ndarray:
    rows = images.shape[0]
    if rows < bs:
      images = np.concatenate([images, np.repeat(images[-1:], bs - rows,
                                                 axis=0)])
    x = sharding.shard_host_batch(vqgan.to_unit_range(images), env.mesh,
                                  env.rules)
    with jax.set_mesh(env.mesh):
      ids = sharding.to_host(encode(vq, x))
    return ids.reshape(bs, -1)[:rows].astype(np.int32)

  def tokens(recs: list[dict[str, Any]]) -> np.ndarray:
    return np.concatenate([
        batch_tokens(np.stack([r[key] for r in recs[i:i + bs]]))
        for i in range(0, len(recs), bs)])

  return tokens


class SrTokenize(graph.Stage):
  """The super-res tokenizer's `hr_tokens` of every scene at
  `data.sr_image_size` (see the module docstring)."""

  name = "sr_tokenize"
  reads = ("data", "sr_tokenizer")
  config_keys = ("tokenize",)

  def check(self, config) -> None:
    if config.tokenize.batch_size < 1:
      raise ValueError("tokenize.batch_size must be >= 1")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, env = run.config, run.env
    image_tokens = image_tokenizer(
        config, env,
        artifacts.load_sr_vq(config, run.inputs["sr_tokenizer"], env),
        shapes.image_key(data_stage.sr_image_size(config)))
    info: dict[str, Any] = {}
    for split in shapes.SPLITS:
      source = data_stage.split_source(config, run.inputs["data"], split)

      def examples(source=source) -> Iterator[dict[str, Any]]:
        for lo in range(0, len(source), CHUNK):
          recs = [source[i] for i in range(lo, min(len(source), lo + CHUNK))]
          for r, hr in zip(recs, image_tokens(recs)):
            yield {"hr_tokens": hr, "index": int(r["index"])}

      if distributed.is_leader():
        records.write(run.dir, split, examples(), records_per_shard=CHUNK)
      else:
        for _ in examples():  # The same sharded computations, no writes.
          pass
      distributed.barrier(f"sr_tokenize-{split}")
      info[split] = {"examples": len(source)}
    return info


class PairedSource:
  """Random access over `tokenize`'s and `sr_tokenize`'s records of one
  split, joined: example i is the union of both records i (their `index`
  must agree)."""

  def __init__(self, tokenize_dir: epath.PathLike,
               sr_tokenize_dir: epath.PathLike, split: str):
    self.base = records.open_source(tokenize_dir, split)
    self.hr = records.open_source(sr_tokenize_dir, split)
    if len(self.base) != len(self.hr):
      raise records.RecordsError(
          f"split {split!r}: {len(self.base)} tokenize records but "
          f"{len(self.hr)} sr_tokenize records (stages of different data?)")
    self.manifest = self.base.manifest

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict[str, Any]:
    a, b = self.base[index], self.hr[index]
    if int(a["index"]) != int(b["index"]):
      raise records.RecordsError(
          f"record {index}: tokenize has scene {a['index']}, sr_tokenize "
          f"has scene {b['index']}")
    return {**a, "hr_tokens": b["hr_tokens"]}

  def __repr__(self) -> str:
    return f"PairedSource({self.base!r}, {self.hr!r})"


def paired_source(inputs: dict[str, epath.Path], split: str) -> PairedSource:
  """The cascade's joined records of `split` from a stage's inputs."""
  return PairedSource(inputs["tokenize"], inputs["sr_tokenize"], split)


def text_example(max_len: int):
  """A record -> {tokens, text_emb [max_len, dim], text_mask [max_len]}."""

  def transform(record: dict[str, Any]) -> dict[str, np.ndarray]:
    emb = np.asarray(record["text_emb"])
    n = emb.shape[0]
    if n > max_len:
      raise records.RecordsError(
          f"record {record.get('index')}: {n} caption tokens > max_len "
          f"{max_len}")
    padded = np.zeros((max_len, emb.shape[1]), emb.dtype)
    padded[:n] = emb
    mask = np.zeros((max_len,), bool)
    mask[:n] = True
    return {"tokens": np.asarray(record["tokens"], np.int32),
            "text_emb": padded, "text_mask": mask}

  return transform
