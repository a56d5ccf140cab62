"""An on-disk cache of caption embeddings, built once by a frozen encoder.

Muse trains against a frozen T5-XXL (4.6B parameters). Running it in every
training step (or in every tokenize pass of every experiment) wastes the
accelerators, so Muse-style training embeds each distinct caption once and
reads the embeddings back. This module is that cache.

Layout of a cache directory (all files through `etils.epath`, so a
`gs://` directory works; ArrayRecord I/O through `muse_jax.data.records`):

  embeddings.json                    the manifest, written last: a directory
                                     without it is unfinished
  captions-KKKKK.json                shard K's record-set manifest (its
                                     captions' keys, counts, the encoder's
                                     identity): shard K's "finished" marker
  captions-KKKKK-00000.array_record  shard K's records

One record per distinct caption: `key` (the first 32 hex digits, 128 bits,
of the SHA-256 of the caption's UTF-8 bytes), `caption`, `text_emb`
bfloat16 [caption tokens, dim] (padding dropped: readers pad to `max_len`
and build the mask) and `truncated` (whether the caption was cut to
`max_len` tokens). Captions are deduplicated and sorted by key, then cut
into shards of `captions_per_shard`, so the same caption set always gives
the same shards, and a reader finds a caption's shard by bisecting the
manifest's first keys and its record in that shard's key list.

Building resumes: each shard is written atomically (a temporary file
renamed, its marker after it) and a finished shard is never redone, so a
killed run continues where it stopped. A finished shard of another caption
set or encoder is an error, not silently reused.

Several processes: process p of n encodes the shards k with k % n == p on
its own devices (`local_mesh`: a process-local mesh over
`jax.local_devices()`, so no cross-host collectives are needed; the
encoder's weights must therefore fit on one host's devices, sharded over
the local `fsdp` axis or replicated), then process 0 writes the manifest
after a barrier (`muse_jax.distributed`).

The encoder's identity (`identity`: name, weights path, max_len, dtype,
dim, ...) is recorded; a reader built from a config refuses a cache of
another encoder.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import dataclasses
import hashlib
import json
import time
from typing import Any

from etils import epath
import jax
from jax.sharding import Mesh
import ml_dtypes
import numpy as np

from muse_jax import distributed
from muse_jax import sharding
from muse_jax.data import records
from muse_jax.text_encoders import base

MANIFEST = "embeddings.json"
FORMAT = "muse_jax.embedding_cache/1"
KEY_HEX_DIGITS = 32  # 128 bits of SHA-256: collisions are not a concern.
DEFAULT_CAPTIONS_PER_SHARD = 4096
# TextEncoderConfig fields that do not change the embeddings.
_NOT_IDENTITY = ("batch_size", "cache_dir")
_SHOW = 5  # Captions named in an error message.


class CacheError(RuntimeError):
  """A cache that is missing, unfinished, corrupt, of another encoder or
  caption set, or that lacks requested captions."""


def caption_key(caption: str) -> str:
  """The cache key of a caption: 32 hex digits of its UTF-8 SHA-256."""
  return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:KEY_HEX_DIGITS]


def identity(cfg: Any) -> dict[str, Any]:
  """What makes an encoder's embeddings what they are, without its weights.

  Every field of a `text_encoders.TextEncoderConfig` except those that do
  not change the embeddings (batch size, the cache's own directory), plus
  the embedding width. Weights paths are compared as configured ("" is the
  encoder's default weights).
  """
  from muse_jax import text_encoders  # pylint: disable=g-import-not-at-top
  out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
         if f.name not in _NOT_IDENTITY}
  out["dim"] = text_encoders.embedding_dim(cfg)
  return _jsonable(out)


def _jsonable(x: Mapping[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(dict(x), sort_keys=True, default=str))


def _check_identity(directory: epath.Path, have: Mapping[str, Any],
                    want: Mapping[str, Any]) -> None:
  have, want = _jsonable(have), _jsonable(want)
  if have == want:
    return
  diffs = [f"{k}: cache {have.get(k)!r}, wanted {want.get(k)!r}"
           for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
  raise CacheError(f"embedding cache {directory} was built by another "
                   f"encoder ({'; '.join(diffs)}); rebuild it with "
                   "`python -m muse_jax.embed_captions` or point "
                   "text_encoder.cache_dir elsewhere")


def local_mesh(fsdp: int = 1) -> Mesh:
  """This process's own devices as a mesh (data x fsdp x tensor=1).

  Encoding on it needs no other process. With `fsdp` > 1 the encoder's
  weights are sharded over that many local devices (by the rules' `embed ->
  fsdp` entry); batches split over all local devices.
  """
  return sharding.make_mesh([("data", -1), ("fsdp", fsdp), ("tensor", 1)],
                            jax.local_devices())


# ---------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  """Distinct captions in key order, cut into shards of `captions_per_shard`.

  A pure function of the caption set: every process computes the same plan.
  """

  keys: tuple[str, ...]
  captions: tuple[str, ...]
  captions_per_shard: int

  @property
  def num_shards(self) -> int:
    return -(-len(self.keys) // self.captions_per_shard)

  def shard(self, k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys, captions) of shard k."""
    lo = k * self.captions_per_shard
    hi = lo + self.captions_per_shard
    return self.keys[lo:hi], self.captions[lo:hi]


def plan(captions: Iterable[str],
         captions_per_shard: int = DEFAULT_CAPTIONS_PER_SHARD) -> Plan:
  """Deduplicates `captions` and orders them by key."""
  if captions_per_shard < 1:
    raise ValueError(f"captions_per_shard={captions_per_shard} must be >= 1")
  by_key: dict[str, str] = {}
  for c in captions:
    if not isinstance(c, str):
      raise TypeError(f"caption {c!r} is a {type(c).__name__}, not a str")
    other = by_key.setdefault(caption_key(c), c)
    if other != c:  # 2**-128: never, but never silently.
      raise CacheError(f"captions {other!r} and {c!r} share a key")
  keys = sorted(by_key)
  return Plan(tuple(keys), tuple(by_key[k] for k in keys),
              captions_per_shard)


def shard_name(k: int) -> str:
  """The record-set name of shard k (`muse_jax.data.records`)."""
  return f"captions-{k:05d}"


def _finished_shard(directory: epath.Path, p: Plan, k: int,
                    ident: Mapping[str, Any]) -> bool:
  """Whether shard k is written; an error if it holds something else."""
  name = shard_name(k)
  if not (directory / f"{name}.json").exists():
    return False
  m = records.manifest(directory, name)
  if any(not (directory / s).exists() for s in m["shards"]):
    return False  # Its records were removed: write it again.
  keys, _ = p.shard(k)
  if tuple(m.get("keys", ())) != keys:
    raise CacheError(
        f"{directory}: shard {k} ({name}) holds another caption set than "
        "this run's (other captions or captions_per_shard); build into a "
        "fresh directory")
  _check_identity(directory, m.get("identity", {}), ident)
  return True


def _shard_records(captions: Sequence[str], keys: Sequence[str],
                   encoder: base.TextEncoder, stats: dict[str, Any]
                   ) -> Iterator[dict[str, Any]]:
  """Encodes captions in the encoder's batches; one record per caption."""
  bs = encoder.batch_size
  for lo in range(0, len(captions), bs):
    text = encoder.encode(list(captions[lo:lo + bs]))
    lengths = text.mask.sum(axis=1)
    emb = text.embeddings.astype(ml_dtypes.bfloat16)
    truncated = _truncated_rows(encoder, captions[lo:lo + bs])
    stats["num_truncated"] += int(truncated.sum())
    for j in range(emb.shape[0]):
      yield {"key": keys[lo + j], "caption": captions[lo + j],
             "text_emb": emb[j, :lengths[j]],
             "truncated": bool(truncated[j])}


def _truncated_rows(encoder: base.TextEncoder,
                    captions: Sequence[str]) -> np.ndarray:
  """Per caption: longer than the encoder's max_len (before truncation)."""
  return np.asarray([len(s) > encoder.max_len
                     for s in encoder.token_ids(list(captions))], bool)


def write_shards(directory: epath.PathLike, p: Plan,
                 make_encoder: Callable[[], base.TextEncoder],
                 ident: Mapping[str, Any], *, process_index: int = 0,
                 process_count: int = 1,
                 log: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
  """Writes the unfinished shards k with k % process_count == process_index.

  `ident` is the encoder's `identity` (JSON; at least `max_len` and
  `dim`). `make_encoder` is called only if a shard is left to encode (a
  finished cache loads no weights). Returns {"written": [k...],
  "skipped": [k...], "captions": n encoded, "encode_s": seconds}.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process {process_index} of {process_count}")
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  ident = _jsonable(ident)
  mine = range(process_index, p.num_shards, process_count)
  todo = [k for k in mine if not _finished_shard(directory, p, k, ident)]
  out = {"written": [], "skipped": sorted(set(mine) - set(todo)),
         "captions": 0, "encode_s": 0.0}
  if not todo:
    return out
  encoder = make_encoder()
  if (encoder.max_len, encoder.dim) != (ident["max_len"], ident["dim"]):
    raise ValueError(
        f"encoder max_len/dim {encoder.max_len}/{encoder.dim} differ from "
        f"its identity's {ident['max_len']}/{ident['dim']}")
  for i, k in enumerate(todo):
    keys, captions = p.shard(k)
    stats = {"num_truncated": 0}
    t0 = time.perf_counter()
    rows = list(_shard_records(captions, keys, encoder, stats))
    dt = time.perf_counter() - t0
    records.write(directory, shard_name(k), rows,
                  records_per_shard=max(1, len(rows)),
                  info={"shard": k, "keys": list(keys),
                        "num_truncated": stats["num_truncated"],
                        "identity": ident})
    out["written"].append(k)
    out["captions"] += len(captions)
    out["encode_s"] += dt
    if log:
      log(f"[embed_captions] process {process_index}: shard {k} "
          f"({i + 1}/{len(todo)} of this process's unfinished), "
          f"{len(captions)} captions in {dt:.1f}s "
          f"({len(captions) / max(dt, 1e-9):.1f} captions/s)")
  return out


def write_manifest(directory: epath.PathLike, p: Plan,
                   ident: Mapping[str, Any]) -> dict[str, Any]:
  """Checks every shard is finished and writes `embeddings.json` (atomic)."""
  directory = epath.Path(directory)
  ident = _jsonable(ident)
  missing = [k for k in range(p.num_shards)
             if not _finished_shard(directory, p, k, ident)]
  if missing:
    raise CacheError(f"{directory}: shards {missing[:_SHOW]}"
                     f"{' ...' if len(missing) > _SHOW else ''} "
                     f"({len(missing)} of {p.num_shards}) are unfinished; "
                     "did a process fail? Run the build again to finish them")
  shards = []
  for k in range(p.num_shards):
    m = records.manifest(directory, shard_name(k))
    keys = m["keys"]
    shards.append({"name": shard_name(k), "num_captions": m["num_records"],
                   "num_truncated": m["num_truncated"],
                   "first_key": keys[0], "last_key": keys[-1]})
  manifest = {
      "format": FORMAT, "identity": ident,
      "key": f"sha256(utf-8 caption) hex[:{KEY_HEX_DIGITS}]",
      "num_captions": len(p.keys),
      "num_truncated": sum(s["num_truncated"] for s in shards),
      "captions_per_shard": p.captions_per_shard, "shards": shards}
  path = directory / MANIFEST
  tmp = directory / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
  tmp.replace(path)
  return manifest


def build(directory: epath.PathLike, captions: Iterable[str],
          make_encoder: Callable[[], base.TextEncoder],
          ident: Mapping[str, Any], *,
          captions_per_shard: int = DEFAULT_CAPTIONS_PER_SHARD,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Builds (or finishes) the cache of `captions` on every process.

  Every process calls this with the same captions: each encodes its share
  of the shards with its own encoder (on `local_mesh()`), then process 0
  writes the manifest. Returns this process's summary (`write_shards`)
  with the manifest's counts.
  """
  p = plan(captions, captions_per_shard)
  out = write_shards(directory, p, make_encoder, ident,
                     process_index=jax.process_index(),
                     process_count=jax.process_count(), log=log)
  distributed.barrier("embedding-cache-shards")
  if distributed.is_leader():
    write_manifest(directory, p, ident)
  distributed.barrier("embedding-cache-manifest")
  m = read_manifest(directory)
  return dict(out, num_captions=m["num_captions"],
              num_truncated=m["num_truncated"], num_shards=len(m["shards"]))


def build_for_config(cfg: Any, sharding_rules: Sequence[Sequence[Any]],
                     directory: epath.PathLike, captions: Iterable[str], *,
                     fsdp: int = 1,
                     captions_per_shard: int = DEFAULT_CAPTIONS_PER_SHARD,
                     log: Callable[[str], None] | None = None
                     ) -> dict[str, Any]:
  """`build` with the encoder of a `TextEncoderConfig`, on `local_mesh(fsdp)`
  under the experiment's `sharding_rules` (loaded only if there is work)."""
  from muse_jax import text_encoders  # pylint: disable=g-import-not-at-top
  mesh = local_mesh(fsdp)
  rules = sharding.validate_rules(sharding_rules, mesh)
  return build(directory, captions,
               lambda: text_encoders.make(cfg, mesh, rules), identity(cfg),
               captions_per_shard=captions_per_shard, log=log)


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


def read_manifest(directory: epath.PathLike) -> dict[str, Any]:
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    raise CacheError(f"no finished embedding cache in {directory} ({MANIFEST} "
                     "missing); build it with `python -m "
                     "muse_jax.embed_captions --out=...`")
  m = json.loads(path.read_text())
  if m.get("format") != FORMAT:
    raise CacheError(f"{path}: format {m.get('format')!r}, expected "
                     f"{FORMAT!r}")
  return m


class EmbeddingCache:
  """Caption embeddings read back from a finished cache.

  Stands in for the encoder where only known captions are embedded (`dim`,
  `max_len`, `encode`); shards are opened when first needed.
  """

  def __init__(self, directory: epath.PathLike,
               expect: Mapping[str, Any] | None = None):
    """Opens the cache in `directory`; with `expect` (an `identity`), a
    cache of another encoder is an error."""
    self.directory = epath.Path(directory)
    self.manifest = read_manifest(self.directory)
    self.identity = self.manifest["identity"]
    if expect is not None:
      _check_identity(self.directory, self.identity, expect)
    self.max_len = int(self.identity["max_len"])
    self.dim = int(self.identity["dim"])
    self._shards = self.manifest["shards"]
    self._first_keys = [s["first_key"] for s in self._shards]
    self._open: dict[int, tuple[records.Source, list[str]]] = {}

  def __len__(self) -> int:
    return int(self.manifest["num_captions"])

  def __contains__(self, caption: str) -> bool:
    return self._locate(caption_key(caption)) is not None

  def _shard(self, k: int) -> tuple[records.Source, list[str]]:
    if k not in self._open:
      s = self._shards[k]
      try:
        source = records.open_source(self.directory, s["name"])
      except records.RecordsError as e:
        raise CacheError(f"embedding cache {self.directory}: shard {k} "
                         f"unreadable: {e}") from e
      keys = list(source.manifest.get("keys", ()))
      if len(keys) != s["num_captions"] or len(source) != len(keys):
        raise CacheError(
            f"embedding cache {self.directory}: shard {k} ({s['name']}) "
            f"holds {len(source)} records / {len(keys)} keys, the manifest "
            f"says {s['num_captions']}")
      self._open[k] = (source, keys)
    return self._open[k]

  def _locate(self, key: str) -> tuple[int, int] | None:
    k = bisect.bisect_right(self._first_keys, key) - 1
    if k < 0 or key > self._shards[k]["last_key"]:
      return None
    _, keys = self._shard(k)
    i = bisect.bisect_left(keys, key)
    return (k, i) if i < len(keys) and keys[i] == key else None

  def _records(self, captions: Sequence[str]) -> list[dict[str, Any]]:
    if isinstance(captions, str):
      raise TypeError("expected a sequence of strings, not a str")
    where = {c: self._locate(caption_key(c)) for c in dict.fromkeys(captions)}
    missing = [c for c, w in where.items() if w is None]
    if missing:
      shown = ", ".join(repr(c) for c in missing[:_SHOW])
      raise CacheError(
          f"{len(missing)} of {len(where)} distinct captions are not in the "
          f"embedding cache {self.directory} (first: {shown}); build it over "
          "these captions with `python -m muse_jax.embed_captions`")
    found = {}
    for c, (k, i) in where.items():
      source, _ = self._shard(k)
      try:
        rec = source[i]
      except records.RecordsError as e:
        raise CacheError(f"embedding cache {self.directory}: shard {k}: "
                         f"{e}") from e
      if rec.get("caption") != c:
        raise CacheError(
            f"embedding cache {self.directory}: shard {k} record {i} holds "
            f"{rec.get('caption')!r}, its key is that of {c!r}")
      found[c] = rec
    return [found[c] for c in captions]

  def lookup(self, captions: Sequence[str], dtype: Any = np.float32
             ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, max_len, dim] zero at padding, mask bool [N, max_len])
    of `captions`; raises `CacheError` naming any that are missing."""
    return self._pad(self._records(captions), dtype)[:2]

  def encode(self, captions: Sequence[str]) -> base.EncodedText:
    """`TextEncoder.encode`'s result, from the cache (bfloat16 values in
    float32; `num_truncated` as the encoder counted it)."""
    emb, mask, truncated = self._pad(self._records(captions), np.float32)
    return base.EncodedText(emb, mask, truncated)

  def _pad(self, recs: list[dict[str, Any]], dtype: Any
           ) -> tuple[np.ndarray, np.ndarray, int]:
    emb = np.zeros((len(recs), self.max_len, self.dim), dtype)
    mask = np.zeros((len(recs), self.max_len), bool)
    for row, rec in enumerate(recs):
      e = np.asarray(rec["text_emb"])
      n = e.shape[0]
      if n > self.max_len or e.shape[1:] != (self.dim,):
        raise CacheError(f"embedding cache {self.directory}: "
                         f"{rec['caption']!r} has embeddings {e.shape}, "
                         f"expected at most [{self.max_len}, {self.dim}]")
      emb[row, :n] = e
      mask[row, :n] = True
    return emb, mask, sum(bool(r["truncated"]) for r in recs)

  def describe(self) -> dict[str, Any]:
    """JSON facts for stage markers and logs."""
    return {"cache": str(self.directory), **self.identity,
            "num_captions": len(self)}


def open_for(cfg: Any) -> EmbeddingCache:
  """The cache `cfg.cache_dir` of a `TextEncoderConfig`, checked against the
  config's encoder identity."""
  return EmbeddingCache(cfg.cache_dir, identity(cfg))
