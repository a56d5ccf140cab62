"""Tests of the T5 encoder (`muse_jax.text_encoders.t5`).

The goldens (scripts/make_t5_golden.py) are transformers' `T5Tokenizer`
and `T5EncoderModel` on a small random T5 v1.1 model (gated-GELU, 3
layers) over a small sentencepiece vocabulary with T5's special ids
(tests/golden/t5_tiny/), plus sentencepiece's own ids and transformers'
relative-position buckets. No torch here; the same weights are re-saved
as sharded safetensors, as a whole encoder-decoder checkpoint, and in
T5X's tensorstore layout (`muse_jax.interop.t5x_checkpoint`), and each
must give the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file
import tensorstore as ts

from muse_jax import sharding
from muse_jax.interop import safetensors_files
from muse_jax.interop import t5x_checkpoint
from muse_jax.text_encoders import t5

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
TINY_DIR = GOLDEN_DIR / "t5_tiny"
GOLDEN = GOLDEN_DIR / "t5_tiny_golden.npz"
TOL = 1e-4
MAX_LEN = 40  # The golden's padded length.
BATCH = 4  # Fewer than the golden texts, so encode() runs several batches.
PARAM_AXES = {"vocab", "embed", "heads", "kv", "mlp", None}
REL_BIAS = ("encoder.block.0.layer.0.SelfAttention."
            "relative_attention_bias.weight")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def config():
  return t5.T5Config.from_hf_config(TINY_DIR)


@pytest.fixture(scope="module")
def hf_tensors():
  return load_file(str(TINY_DIR / "model.safetensors"))


def _abstract(cfg: t5.T5Config) -> t5.T5Encoder:
  """Abstract, as the encoder builds it: loading fills every parameter."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)))


@nnx.jit
def _call(model, ids, mask):
  return model(ids, mask)


def _outputs(model, golden) -> np.ndarray:
  return np.asarray(_call(model, golden["ids"], golden["mask"]))


@pytest.fixture(scope="module")
def outputs(config, golden):
  return _outputs(t5.load_t5_weights(_abstract(config), TINY_DIR), golden)


@pytest.fixture(scope="module")
def encoder():
  return t5.T5TextEncoder(TINY_DIR, max_len=MAX_LEN, batch_size=BATCH)


def _unpad(rows: np.ndarray) -> list[list[int]]:
  return [[int(i) for i in row if i >= 0] for row in rows]


def _num_truncated(golden) -> int:
  return sum(len(ids) > MAX_LEN for ids in _unpad(golden["hf_ids"]))


def _assert_close_at(actual, expected, mask, tol=TOL):
  np.testing.assert_allclose(actual[mask], expected[mask], atol=tol, rtol=0)


def _model_dir(tmp_path: pathlib.Path, tensors=None, name="model"
               ) -> pathlib.Path:
  """A copy of the tiny model directory, with `tensors` as its weights."""
  out = tmp_path / name
  out.mkdir()
  for f in ("config.json", "spiece.model"):
    shutil.copy(TINY_DIR / f, out / f)
  if tensors is not None:
    save_file(tensors, str(out / "model.safetensors"))
  return out


# ---------------------------------------------------------------------------
# Config and presets.
# ---------------------------------------------------------------------------


def test_config_from_hf(config):
  assert (config.vocab_size, config.d_model, config.d_kv, config.num_heads,
          config.d_ff, config.num_layers) == (188, 32, 8, 4, 64, 3)
  assert (config.relative_attention_num_buckets,
          config.relative_attention_max_distance) == (32, 128)
  assert config.layer_norm_eps == 1e-6
  assert config.feed_forward_proj == "gated-gelu"
  assert (config.gated, config.activation) == (True, "gelu_new")


def test_config_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
    t5.T5Config.from_hf_config(tmp_path)
  hf = json.loads((TINY_DIR / "config.json").read_text())
  for field, value, message in (
      ("feed_forward_proj", "gated-swish", "feed_forward_proj='gated-swish'"),
      ("model_type", "umt5", "model_type='umt5'")):
    (tmp_path / "config.json").write_text(json.dumps({**hf, field: value}))
    with pytest.raises(ValueError, match=message):
      t5.T5Config.from_hf_config(tmp_path)
  del hf["d_kv"]
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="missing T5 config field 'd_kv'"):
    t5.T5Config.from_hf_config(tmp_path)
  with pytest.raises(ValueError, match="relative_attention_num_buckets=7"):
    t5.T5Config(relative_attention_num_buckets=7)


def test_presets():
  sizes = {name: (c.d_model, c.d_kv, c.num_heads, c.d_ff, c.num_layers,
                  c.vocab_size, c.relative_attention_num_buckets,
                  c.relative_attention_max_distance, c.feed_forward_proj)
           for name, c in t5.PRESETS.items()}
  v11 = (32128, 32, 128, "gated-gelu")
  assert sizes == {
      "t5_v1_1_base": (768, 64, 12, 2048, 12) + v11,
      "t5_v1_1_xl": (2048, 64, 32, 5120, 24) + v11,
      "t5_v1_1_xxl": (4096, 64, 64, 10240, 24) + v11,
      "flan_t5_xl": (2048, 64, 32, 5120, 24) + v11,
  }
  assert t5.embedding_dim("t5_v1_1_xxl") == 4096
  assert t5.embedding_dim(path=TINY_DIR) == 32
  for call in (lambda: t5.preset_config("t5_xxxl"),
               lambda: t5.embedding_dim("t5_xxxl"),
               lambda: t5.T5TextEncoder(TINY_DIR, preset="t5_xxxl")):
    with pytest.raises(ValueError, match="unknown T5 preset 't5_xxxl'"):
      call()


def test_preset_must_agree_with_config_json():
  with pytest.raises(ValueError, match=r"preset 't5_v1_1_base' disagrees "
                     r"with .*t5_tiny/config.json: vocab_size: preset 32128 "
                     r"vs 188, d_model: preset 768 vs 32"):
    t5.T5TextEncoder(TINY_DIR, preset="t5_v1_1_base")


def test_xxl_parameter_count_abstractly():
  # Embedding 32128 x 4096 plus 24 layers of 4 x 4096^2 attention and
  # 3 x 4096 x 10240 MLP: the "4.7B" of T5-XXL's encoder.
  assert 4.6e9 <= t5.num_params(t5.PRESETS["t5_v1_1_xxl"]) <= 4.8e9


def test_params_carry_logical_axes(config):
  leaves = jax.tree.leaves(nnx.state(_abstract(config), nnx.Param),
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
  # Embedding, relative bias, final norm; per layer 2 norms, 4 attention
  # and 3 MLP kernels.
  assert len(leaves) == 3 + 3 * 9
  for var in leaves:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, var
    assert set(names) <= PARAM_AXES, names


# ---------------------------------------------------------------------------
# Tokenizer and relative positions.
# ---------------------------------------------------------------------------


def test_tokenizer_matches_transformers_and_sentencepiece(golden):
  tok = t5.T5Tokenizer(TINY_DIR / "spiece.model")
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  texts = list(golden["texts"])
  assert len(texts) >= 8
  ids = tok.token_ids(texts)
  assert ids == _unpad(golden["hf_ids"])
  assert ids == _unpad(golden["sp_ids"])
  assert ids[texts.index("")] == [1]


def test_tokenizer_missing_file_named(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=str(tmp_path / "spiece.model")):
    t5.T5Tokenizer(tmp_path)
  weights_only = tmp_path / "weights"
  weights_only.mkdir()
  for f in ("config.json", "model.safetensors"):
    shutil.copy(TINY_DIR / f, weights_only / f)
  with pytest.raises(FileNotFoundError,
                     match=str(weights_only / "spiece.model")):
    t5.T5TextEncoder(weights_only)


def test_encoder_tokenize_matches_golden(encoder, golden):
  ids, mask, truncated = encoder.tokenize(list(golden["texts"]))
  np.testing.assert_array_equal(ids, golden["ids"])
  np.testing.assert_array_equal(mask, golden["mask"])
  assert truncated == _num_truncated(golden) >= 1
  assert ids[-1, -1] == 1  # The truncated text keeps its EOS.


def test_relative_buckets_match_transformers(golden):
  r = (len(golden["buckets"]) - 1) // 2
  # Offsets key - query from -r to r: the keys of the query at position r.
  buckets = t5.relative_position_buckets(2 * r + 1, 2 * r + 1, 32, 128)
  np.testing.assert_array_equal(buckets[r], golden["buckets"])


# ---------------------------------------------------------------------------
# Parity.
# ---------------------------------------------------------------------------


def test_outputs_match_transformers(outputs, golden):
  assert golden["mask"].shape[0] >= 8
  _assert_close_at(outputs, golden["last"], golden["mask"])


def test_encoder_matches_transformers(encoder, golden):
  out = encoder.encode(list(golden["texts"]))
  np.testing.assert_array_equal(out.mask, golden["mask"])
  assert out.num_truncated == _num_truncated(golden)
  # Zero at padding, as the golden is.
  np.testing.assert_allclose(out.embeddings, golden["last"], atol=TOL,
                             rtol=0)
  assert encoder.dim == 32 and encoder.end_id == 1
  assert encoder.describe()["tokenizer"] in ("sentencepiece", "seqio")


def test_padding_does_not_change_real_tokens(config, outputs, golden):
  model = t5.load_t5_weights(_abstract(config), TINY_DIR)
  # The texts of at most 24 tokens, padded to 24, 40 (the golden) and 64.
  short = golden["mask"].sum(axis=1) <= 24
  assert short.sum() >= 4
  ids, mask = golden["ids"][short], golden["mask"][short]
  at_24 = np.asarray(_call(model, ids[:, :24], mask[:, :24]))
  pad = ((0, 0), (0, 24))
  at_64 = np.asarray(_call(model, np.pad(ids, pad), np.pad(mask, pad)))
  _assert_close_at(at_24, outputs[short][:, :24], mask[:, :24], tol=1e-5)
  _assert_close_at(at_64[:, :MAX_LEN], outputs[short], mask, tol=1e-5)


def test_bf16_compute_close(golden):
  enc = t5.T5TextEncoder(TINY_DIR, max_len=MAX_LEN, batch_size=16,
                         dtype=jnp.bfloat16)
  emb = enc.encode(list(golden["texts"])).embeddings
  ref, mask = golden["last"], golden["mask"]
  err = np.abs(emb[mask] - ref[mask]).max() / np.abs(ref[mask]).max()
  assert err < 0.05, err


# ---------------------------------------------------------------------------
# Other checkpoint layouts of the same weights.
# ---------------------------------------------------------------------------


def test_sharded_safetensors_load_the_same(outputs, golden, hf_tensors,
                                           tmp_path):
  model_dir = _model_dir(tmp_path)
  files = safetensors_files.save_sharded(hf_tensors, model_dir,
                                         max_shard_bytes=40_000)
  assert len(files) >= 3
  enc = t5.T5TextEncoder(model_dir, max_len=MAX_LEN, batch_size=16)
  np.testing.assert_allclose(enc.encode(list(golden["texts"])).embeddings,
                             golden["last"], atol=TOL, rtol=0)
  # A shard the index names but that is gone is named.
  files[1].unlink()
  with pytest.raises(FileNotFoundError, match=files[1].name):
    t5.T5TextEncoder(model_dir)


def test_encoder_decoder_checkpoint_ignores_decoder(config, outputs, golden,
                                                    hf_tensors, tmp_path):
  # T5ForConditionalGeneration: both tied table names, a decoder, a head.
  tensors = dict(hf_tensors)
  tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
  tensors["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.ones(
      (32, 32), np.float32)
  tensors["decoder.final_layer_norm.weight"] = np.ones((32,), np.float32)
  tensors["lm_head.weight"] = np.ones((188, 32), np.float32)
  model_dir = _model_dir(tmp_path, tensors)
  model = t5.load_t5_weights(_abstract(config), model_dir)
  _assert_close_at(_outputs(model, golden), outputs, golden["mask"],
                   tol=1e-6)
  # The encoder's own name alone also works.
  del tensors["shared.weight"]
  only_encoder = _model_dir(tmp_path, tensors, "encoder_name")
  model = t5.load_t5_weights(_abstract(config), only_encoder)
  _assert_close_at(_outputs(model, golden), outputs, golden["mask"],
                   tol=1e-6)


def _t5x_tensors(hf: dict[str, np.ndarray], num_layers: int
                 ) -> dict[str, np.ndarray]:
  """The HF checkpoint in T5X's names and layouts: flax kernels [in, out]
  (the transposed torch weights, heads x head_dim flattened as torch's),
  the relative bias table [heads, buckets]."""
  out = {
      "target.token_embedder.embedding": hf["shared.weight"],
      "target.encoder.relpos_bias.rel_embedding": hf[REL_BIAS].T,
      "target.encoder.encoder_norm.scale":
          hf["encoder.final_layer_norm.weight"],
      # A decoder, which the encoder ignores.
      "target.decoder.decoder_norm.scale": np.ones((32,), np.float32),
      "target.decoder.layers_0.self_attention.query.kernel":
          np.ones((32, 32), np.float32),
  }
  for i in range(num_layers):
    p, t = f"encoder.block.{i}.layer.", f"target.encoder.layers_{i}."
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"),
                         ("o", "out")):
      out[f"{t}attention.{theirs}.kernel"] = hf[
          f"{p}0.SelfAttention.{ours}.weight"].T
    out[f"{t}pre_attention_layer_norm.scale"] = hf[f"{p}0.layer_norm.weight"]
    out[f"{t}pre_mlp_layer_norm.scale"] = hf[f"{p}1.layer_norm.weight"]
    for name in ("wi_0", "wi_1", "wo"):
      out[f"{t}mlp.{name}.kernel"] = hf[f"{p}1.DenseReluDense.{name}.weight"].T
  return out


def test_t5x_checkpoint_loads_the_same(config, outputs, golden, hf_tensors,
                                       tmp_path):
  train_dir = tmp_path / "train"
  ckpt = train_dir / "checkpoint_1000"
  tensors = _t5x_tensors(hf_tensors, config.num_layers)
  # One norm scale kept inline in the msgpack file, as T5X does for arrays
  # it does not partition.
  inline = ("target.encoder.encoder_norm.scale",)
  t5x_checkpoint.save_t5x_checkpoint(tensors, ckpt, inline=inline)
  # T5X's on-disk layout: a zarr directory per partitioned parameter, named
  # by its dotted path, plus the msgpack index.
  query = ckpt / "target.encoder.layers_0.attention.query.kernel"
  assert (query / ".zarray").is_file() and (ckpt / "checkpoint").is_file()
  header = json.loads((query / ".zarray").read_text())
  assert header["shape"] == [32, 32] and header["compressor"]["id"] == "gzip"
  assert not (ckpt / inline[0]).exists()
  # The optimizer's arrays beside them are never read.
  ts.open({"driver": "zarr", "kvstore": {
      "driver": "file", "path": str(ckpt / "state.param_states.x.v")}},
          create=True, dtype="float32", shape=[3]).result()

  source = t5x_checkpoint.T5XCheckpoint(train_dir)  # The latest step.
  assert source.path == ckpt and set(source) == set(tensors)
  model = t5.load_t5_weights(_abstract(config), train_dir)
  _assert_close_at(_outputs(model, golden), outputs, golden["mask"],
                   tol=1e-6)

  # The encoder on a T5X directory: sizes from a preset or a config.json
  # there, the tokenizer from tokenizer_path.
  with pytest.raises(ValueError, match="pass preset="):
    t5.T5TextEncoder(ckpt, tokenizer_path=TINY_DIR)
  shutil.copy(TINY_DIR / "config.json", ckpt / "config.json")
  enc = t5.T5TextEncoder(ckpt, tokenizer_path=TINY_DIR, max_len=MAX_LEN,
                         batch_size=16)
  np.testing.assert_allclose(enc.encode(list(golden["texts"])).embeddings,
                             golden["last"], atol=TOL, rtol=0)


def test_t5x_reader_dtypes_and_errors(tmp_path):
  arrays = {
      "target.a.kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
      "target.b.scale": np.arange(5).astype(ml_dtypes.bfloat16),
      "target.c.inline": np.ones((2,), np.float32),
  }
  t5x_checkpoint.save_t5x_checkpoint(arrays, tmp_path / "ckpt",
                                     inline=("target.c.inline",),
                                     chunk_bytes=16)
  source = t5x_checkpoint.T5XCheckpoint(tmp_path / "ckpt")
  assert source.shape("target.a.kernel") == (3, 4)
  for name, value in arrays.items():
    assert source[name].dtype == value.dtype
    np.testing.assert_array_equal(source[name], value)
  # Chunks of at most 16 bytes that divide the shape (the largest
  # dimension cut first).
  assert t5x_checkpoint.chunk_shape((3, 4), 4, 16) == [1, 2]
  assert t5x_checkpoint.chunk_shape((10240, 4096), 4) == [2560, 4096]
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    t5x_checkpoint.T5XCheckpoint(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="not a T5X checkpoint"):
    t5x_checkpoint.T5XCheckpoint(tmp_path)
  shutil.rmtree(tmp_path / "ckpt" / "target.b.scale")
  with pytest.raises(FileNotFoundError, match="target.b.scale"):
    t5x_checkpoint.T5XCheckpoint(tmp_path / "ckpt")


def test_t5x_wrong_shape_named(config, hf_tensors, tmp_path):
  tensors = _t5x_tensors(hf_tensors, config.num_layers)
  name = "target.encoder.layers_1.mlp.wi_1.kernel"
  tensors[name] = np.zeros((32, 48), np.float32)
  del tensors["target.encoder.layers_2.pre_mlp_layer_norm.scale"]
  t5x_checkpoint.save_t5x_checkpoint(tensors, tmp_path / "ckpt")
  with pytest.raises(ValueError) as err:
    t5.load_t5_weights(_abstract(config), tmp_path / "ckpt")
  msg = str(err.value)
  assert "T5 (t5x)" in msg and str(tmp_path / "ckpt") in msg
  assert (f"shape mismatch for '{name}': checkpoint (32, 48), expected "
          "(32, 64)") in msg
  assert ("missing tensors "
          "['target.encoder.layers_2.pre_mlp_layer_norm.scale']") in msg


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_missing_weight_file_named(tmp_path):
  model_dir = _model_dir(tmp_path)
  with pytest.raises(FileNotFoundError, match=str(model_dir)
                     + ".*model.safetensors"):
    t5.T5TextEncoder(model_dir)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    t5.T5TextEncoder(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    t5.open_checkpoint(tmp_path / "absent")
  (model_dir / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="holds pytorch_model.bin but "
                     "no model.safetensors"):
    t5.open_checkpoint(model_dir)


def test_wrong_shape_missing_and_unexpected_named(config, hf_tensors,
                                                  tmp_path):
  tensors = dict(hf_tensors)
  name = "encoder.block.1.layer.0.SelfAttention.q.weight"
  tensors[name] = np.zeros((24, 32), np.float32)
  del tensors["encoder.block.2.layer.1.layer_norm.weight"]
  # UMT5 has a relative bias in every layer; T5 only in the first.
  extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  tensors[extra] = tensors[REL_BIAS]
  model_dir = _model_dir(tmp_path, tensors)
  with pytest.raises(ValueError) as err:
    t5.load_t5_weights(_abstract(config), model_dir)
  msg = str(err.value)
  assert str(model_dir / "model.safetensors") in msg
  assert (f"shape mismatch for '{name}': checkpoint (24, 32), expected "
          "(32, 32)") in msg
  assert ("missing tensors "
          "['encoder.block.2.layer.1.layer_norm.weight']") in msg
  assert f"unexpected tensors ['{extra}']" in msg
  with pytest.raises(ValueError, match=r"shape mismatch for '" + name):
    t5.T5TextEncoder(model_dir)


def test_missing_embedding_names_both_names(config, hf_tensors, tmp_path):
  tensors = {k: v for k, v in hf_tensors.items() if k != "shared.weight"}
  with pytest.raises(ValueError, match="missing tensors "
                     r"\['encoder.embed_tokens.weight' or 'shared.weight'\]"):
    t5.load_t5_weights(_abstract(config), _model_dir(tmp_path, tensors))


def test_relu_feed_forward_loads_wi(tmp_path):
  # The original T5's MLP: one "wi" and ReLU.
  cfg = t5.T5Config(vocab_size=16, d_model=8, d_kv=4, num_heads=2, d_ff=12,
                    num_layers=1, feed_forward_proj="relu")
  rng = np.random.default_rng(0)
  shapes = {
      "shared.weight": (16, 8), REL_BIAS: (32, 2),
      "encoder.final_layer_norm.weight": (8,),
      "encoder.block.0.layer.0.layer_norm.weight": (8,),
      "encoder.block.0.layer.1.layer_norm.weight": (8,),
      "encoder.block.0.layer.1.DenseReluDense.wi.weight": (12, 8),
      "encoder.block.0.layer.1.DenseReluDense.wo.weight": (8, 12),
  }
  for n in "qkv":
    shapes[f"encoder.block.0.layer.0.SelfAttention.{n}.weight"] = (8, 8)
  shapes["encoder.block.0.layer.0.SelfAttention.o.weight"] = (8, 8)
  tensors = {k: rng.normal(size=s).astype(np.float32)
             for k, s in shapes.items()}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  model = t5.load_t5_weights(_abstract(cfg), tmp_path)
  mlp = model.layers[0].mlp
  np.testing.assert_array_equal(
      mlp.wi.kernel[...],
      tensors["encoder.block.0.layer.1.DenseReluDense.wi.weight"].T)
  x = jnp.asarray(rng.normal(size=(1, 3, 8)), jnp.float32)
  want = (np.maximum(np.asarray(x) @ np.asarray(mlp.wi.kernel[...]), 0)
          @ np.asarray(mlp.wo.kernel[...]))
  np.testing.assert_allclose(mlp(x), want, atol=1e-5)
  out = model(jnp.array([[3, 4, 1]]), jnp.array([[True, True, True]]))
  assert out.shape == (1, 3, 8) and np.isfinite(np.asarray(out)).all()


# ---------------------------------------------------------------------------
# On a mesh.
# ---------------------------------------------------------------------------


def test_sharded_encoder_matches_unsharded(golden):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  enc = t5.T5TextEncoder(TINY_DIR, max_len=MAX_LEN, batch_size=8, mesh=mesh,
                         rules=rules)
  # Loaded straight onto the mesh, by logical axes (vocab x embed over
  # tensor x fsdp, heads and mlp over tensor), not replicated.
  placements = [x.sharding for x in jax.tree.leaves(enc.params)]
  assert {p.device_set == set(mesh.devices.flat) for p in placements} == {
      True}
  assert not all(p.is_fully_replicated for p in placements)
  np.testing.assert_allclose(enc.encode(list(golden["texts"])).embeddings,
                             golden["last"], atol=TOL, rtol=0)


# ---------------------------------------------------------------------------
# Scanning over stacked layers (`scan_layers`).
# ---------------------------------------------------------------------------


XXL_PARAMS = 4_762_310_656


def _scanned(cfg: t5.T5Config) -> t5.T5Encoder:
  return _abstract(dataclasses.replace(cfg, scan_layers=True))


@pytest.fixture(scope="module")
def t5x_dir(config, hf_tensors, tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("t5x") / "checkpoint_1"
  return t5x_checkpoint.save_t5x_checkpoint(
      _t5x_tensors(hf_tensors, config.num_layers), ckpt)


def test_scan_layers_defaults():
  assert {n: c.scan_layers for n, c in t5.PRESETS.items()} == {
      "t5_v1_1_base": False, "t5_v1_1_xl": True, "t5_v1_1_xxl": True,
      "flan_t5_xl": True}
  assert not t5.T5Config().scan_layers
  assert not t5.T5Config.from_hf_config(TINY_DIR).scan_layers
  assert t5.T5Config.from_hf_config(TINY_DIR, scan_layers=True).scan_layers
  assert not t5.preset_config("t5_v1_1_xxl",
                              scan_layers=False).scan_layers
  # Not a size: a checkpoint is the same either way.
  assert "scan_layers" not in t5.T5Config().sizes()


def test_scanned_params_carry_layers_axis(config):
  model = _scanned(config)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  # Embedding, relative bias, final norm, and one stacked parameter per
  # kind of layer parameter.
  assert len(params) == 3 + 9
  stacked = 0
  for path, var in params:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, path
    if path[0] == "layers":
      stacked += 1
      assert names[0] == "layers" and var.shape[0] == config.num_layers
      assert set(names[1:]) <= PARAM_AXES, (path, names)
    else:
      assert set(names) <= PARAM_AXES, (path, names)
  assert stacked == 9
  query = model.layers.attention.query.kernel
  assert query.get_metadata()["out_sharding"] == ("layers", "embed",
                                                  "heads", "kv")
  assert query.shape == (3, 32, 4, 8)


def test_scanned_matches_unrolled_from_hf_and_t5x(config, golden, outputs,
                                                  t5x_dir):
  for path in (TINY_DIR, t5x_dir):
    scanned = t5.load_t5_weights(_scanned(config), path)
    assert all(isinstance(x, jax.Array)
               for x in jax.tree.leaves(nnx.state(scanned)))
    got = _outputs(scanned, golden)
    assert np.abs(got - outputs).max() <= 1e-5, path
  # Stacked rows hold exactly the unrolled layers' parameters, also when
  # cast to bfloat16 on the host while stacking.
  bf16 = dataclasses.replace(config, param_dtype=jnp.bfloat16)
  for path in (TINY_DIR, t5x_dir):
    unrolled = t5.load_t5_weights(_abstract(bf16), path)
    scanned = t5.load_t5_weights(_scanned(bf16), path)
    stacked = nnx.state(scanned.layers, nnx.Param)
    for i, layer in enumerate(unrolled.layers):
      rows = jax.tree.map(lambda a, i=i: a[i], stacked)
      for a, b in zip(jax.tree.leaves(nnx.state(layer, nnx.Param)),
                      jax.tree.leaves(rows)):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32),
                                      np.asarray(b, np.float32))


def test_scanned_errors_name_layer_tensors(config, hf_tensors, tmp_path):
  tensors = dict(hf_tensors)
  name = "encoder.block.1.layer.0.SelfAttention.q.weight"
  tensors[name] = np.zeros((24, 32), np.float32)
  del tensors["encoder.block.2.layer.1.layer_norm.weight"]
  with pytest.raises(ValueError) as err:
    t5.load_t5_weights(_scanned(config), _model_dir(tmp_path, tensors))
  msg = str(err.value)
  assert (f"shape mismatch for '{name}': checkpoint (24, 32), expected "
          "(32, 32)") in msg
  assert ("missing tensors "
          "['encoder.block.2.layer.1.layer_norm.weight']") in msg
  tensors = dict(hf_tensors)
  name = "encoder.block.2.layer.1.layer_norm.weight"
  tensors[name] = np.ones((32,), np.int32)
  with pytest.raises(ValueError, match=f"tensor '{name}' has non-float "
                     "dtype int32"):
    t5.load_t5_weights(_scanned(config),
                       _model_dir(tmp_path, tensors, "int_norm"))


def test_scanned_encoder_sharded_matches(golden, outputs):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  enc = t5.T5TextEncoder(TINY_DIR, max_len=MAX_LEN, batch_size=8, mesh=mesh,
                         rules=rules, scan_layers=True)
  assert enc.config.scan_layers and enc.describe()["scan_layers"]
  wi_0 = enc.model.layers.mlp.wi_0.kernel.get_value()
  # The stacked [layers, embed, mlp] kernel: layers unsharded, embed over
  # fsdp, mlp over tensor.
  assert wi_0.shape == (3, 32, 64)
  assert tuple(wi_0.sharding.spec) == (None, "fsdp", "tensor")
  assert wi_0.sharding.device_set == set(mesh.devices.flat)
  emb = enc.encode(list(golden["texts"])).embeddings
  np.testing.assert_allclose(emb, golden["last"], atol=TOL, rtol=0)
  mask = golden["mask"]
  assert np.abs(emb[mask] - outputs[mask]).max() <= 1e-5
  # The default for a config.json model stays unrolled.
  assert not t5.T5TextEncoder(TINY_DIR).config.scan_layers


def test_xxl_parameter_count_scanned_and_unrolled():
  xxl = t5.PRESETS["t5_v1_1_xxl"]
  assert xxl.scan_layers
  assert t5.num_params(xxl) == XXL_PARAMS
  assert t5.num_params(dataclasses.replace(xxl, scan_layers=False)) == (
      XXL_PARAMS)
