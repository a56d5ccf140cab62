"""Tests of Muse's masked image transformer (muse_jax.models.transformer)."""

from __future__ import annotations

import dataclasses
import functools

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from muse_jax import config_types
from muse_jax import sharding
from muse_jax.models import transformer as tr

CODEBOOK = 16
TEXT_DIM = 8
TEXT_LEN = 5


def tiny_cfg(**overrides) -> tr.TransformerConfig:
  kw = dict(codebook_size=CODEBOOK, grid_size=4, text_dim=TEXT_DIM, width=16,
            depth=2, num_heads=2, mlp_dim=32)
  kw.update(overrides)
  return tr.TransformerConfig(**kw)


def make_model(cfg: tr.TransformerConfig, seed: int = 0):
  with nnx.use_eager_sharding(False):
    return tr.MaskedTransformer(cfg, rngs=nnx.Rngs(seed))


def make_inputs(batch: int = 2, seed: int = 0, cfg=None):
  cfg = cfg or tiny_cfg()
  rng = np.random.default_rng(seed)
  # Ids include the mask id (= codebook_size).
  tokens = rng.integers(0, cfg.codebook_size + 1, (batch, cfg.seq_len))
  text_emb = rng.normal(size=(batch, TEXT_LEN, cfg.text_dim))
  text_mask = np.ones((batch, TEXT_LEN), bool)
  text_mask[:, -2:] = False  # Padding.
  return (jnp.asarray(tokens, jnp.int32), jnp.asarray(text_emb, jnp.float32),
          jnp.asarray(text_mask))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, method, state, *args):
  return getattr(nnx.merge(graphdef, state), method)(*args)


def forward(model, *args, method="__call__"):
  """Jitted model call; compiled once per (config, method, shapes)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, method, state, *args)


@pytest.fixture(scope="module")
def model():
  return make_model(tiny_cfg())


@pytest.fixture(scope="module")
def inputs():
  return make_inputs()


# ---------------------------------------------------------------------------
# Forward pass.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_shape_and_dtypes(dtype, inputs):
  cfg = tiny_cfg(dtype=dtype)
  m = make_model(cfg)
  logits = forward(m, *inputs)
  assert logits.shape == (2, cfg.seq_len, CODEBOOK)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  params = jax.tree.leaves(nnx.state(m, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  ref = forward(make_model(tiny_cfg()), *inputs)
  if dtype == "bfloat16":
    # Computed in bf16 (so not bit-identical) but close to the f32 model.
    assert not np.array_equal(logits, ref)
    np.testing.assert_allclose(logits, ref, atol=0.1 * np.abs(ref).max())
  else:
    np.testing.assert_array_equal(logits, ref)


def test_param_dtype_is_respected():
  # Shapes only (no init compile): every parameter is stored in param_dtype.
  cfg = tiny_cfg(dtype="bfloat16", param_dtype="bfloat16")
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
        lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert len(params) > 10
  assert all(p.dtype == jnp.bfloat16 for p in params)


def test_logits_depend_on_tokens_and_positions(model, inputs):
  tokens, emb, mask = inputs
  base = forward(model, tokens, emb, mask)
  changed = tokens.at[0, 3].set((tokens[0, 3] + 1) % CODEBOOK)
  out = forward(model, changed, emb, mask)
  # Self-attention mixes the change into every position of row 0 only.
  assert np.all(np.abs(out[0] - base[0]).max(-1) > 0)
  np.testing.assert_array_equal(out[1], base[1])
  # Same token everywhere still gives position-dependent logits.
  same = forward(model, jnp.zeros_like(tokens), emb, mask)
  assert not np.allclose(same[0, 0], same[0, 1])


def test_scan_and_unrolled_layers_agree(inputs):
  scanned = make_model(tiny_cfg(scan_layers=True), seed=3)
  unrolled = make_model(tiny_cfg(scan_layers=False), seed=3)
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(scanned, nnx.Param)),
               nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)))
  a = forward(scanned, *inputs)
  b = forward(unrolled, *inputs)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  kv_a = forward(scanned, inputs[1], method="text_kv")
  kv_b = forward(unrolled, inputs[1], method="text_kv")
  for x, y in zip(kv_a, kv_b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_remat_policies_give_same_loss_and_grads(inputs):
  tokens, emb, mask = inputs
  targets = jnp.arange(tokens.size).reshape(tokens.shape) % CODEBOOK
  graphdefs, state = {}, None
  for policy in tr.REMAT_POLICIES:
    graphdefs[policy], state = nnx.split(
        make_model(tiny_cfg(remat_policy=policy), seed=1))

  def loss_and_grads(policy, s):
    def loss(s):
      logits = nnx.merge(graphdefs[policy], s)(tokens, emb, mask)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
    return jax.value_and_grad(loss)(s)

  # One program for all policies: one compilation instead of four.
  results = jax.jit(lambda s: {p: loss_and_grads(p, s) for p in graphdefs})(
      state)
  ref_loss, ref_grads = results["none"]
  assert np.isfinite(ref_loss)
  for policy in graphdefs:
    loss, grads = results[policy]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=policy)
    jax.tree.map(
        lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6,
                                                err_msg=policy),
        grads, ref_grads)
    # The policy is actually applied: a remat in the program, or none.
    jaxpr = str(jax.make_jaxpr(functools.partial(loss_and_grads, policy))(
        state))
    assert ("remat" in jaxpr) == (policy != "none"), policy
  assert len(graphdefs) == 4


def test_text_kv_then_decode_equals_call(model, inputs):
  tokens, emb, mask = inputs
  kv = forward(model, emb, method="text_kv")
  cfg = model.cfg
  head_dim = cfg.width // cfg.num_heads
  for x in kv:
    assert x.shape == (cfg.depth, 2, cfg.num_heads, TEXT_LEN, head_dim)
  full = forward(model, tokens, emb, mask)
  np.testing.assert_allclose(forward(model, tokens, kv, mask, method="decode"),
                             full, rtol=1e-6, atol=1e-6)
  # The cached keys/values are what is used: other text gives other logits.
  other = forward(model, emb + 1.0, method="text_kv")
  assert not np.allclose(
      forward(model, tokens, other, mask, method="decode"), full)


def test_rows_without_text_skip_cross_attention(model, inputs):
  # The sampler's [cond; uncond] batch: only the first rows carry text.
  tokens, emb, mask = inputs
  both = jnp.concatenate([tokens, tokens[::-1]])
  reference = forward(model, both, jnp.concatenate([emb, emb]),
                      jnp.concatenate([mask, jnp.zeros_like(mask)]))
  kv = forward(model, emb, method="text_kv")
  graphdef, state = nnx.split(model)
  rows = tokens.shape[0]
  got = jax.jit(lambda s, x, kv, m: nnx.merge(graphdef, s).decode(
      x, kv, m, text_rows=rows))(state, both, kv, mask)
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="text_rows=3"):
    nnx.merge(graphdef, state).decode(both, kv, mask, text_rows=3)


def test_dropped_caption_is_unconditional(model, inputs):
  tokens, emb, mask = inputs
  other_emb = emb * -3.0 + 1.0
  # Row 0's caption is dropped (all-False mask); row 1 keeps its caption.
  mask = mask.at[0].set(False)
  a = forward(model, tokens, emb, mask)
  b = forward(model, tokens, other_emb, mask)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[1], b[1])
  # The unconditional output is the same whatever the padding embeddings.
  c = forward(model, tokens, jnp.zeros_like(emb), mask)
  np.testing.assert_array_equal(a[0], c[0])


def test_padded_text_tokens_are_ignored(model, inputs):
  tokens, emb, mask = inputs  # The last two text positions are padding.
  changed = emb.at[:, -2:].set(100.0)
  np.testing.assert_allclose(forward(model, tokens, changed, mask),
                             forward(model, tokens, emb, mask),
                             rtol=1e-6, atol=1e-6)
  changed = emb.at[:, 0].set(100.0)
  assert not np.allclose(forward(model, tokens, changed, mask),
                         forward(model, tokens, emb, mask))


@pytest.mark.parametrize("length", [15, 17])
def test_wrong_token_length_raises(model, inputs, length):
  _, emb, mask = inputs
  tokens = jnp.zeros((2, length), jnp.int32)
  with pytest.raises(ValueError, match=rf"length {length}.*expects 16"):
    model(tokens, emb, mask)


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,field", [
    (dict(width=18, num_heads=4), "width"),
    (dict(remat_policy="everything"), "remat_policy"),
    (dict(depth=0), "depth"),
    (dict(num_heads=0), "num_heads"),
    (dict(codebook_size=0), "codebook_size"),
    (dict(grid_size=-1), "grid_size"),
])
def test_bad_config_raises_naming_field(overrides, field):
  with pytest.raises(ValueError, match=rf"TransformerConfig\.{field}\b"):
    tiny_cfg(**overrides)


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_bad_dtype_raises(field):
  with pytest.raises(ValueError, match="float64"):
    tiny_cfg(**{field: "float64"})


def test_config_properties():
  cfg = tiny_cfg(grid_size=3, codebook_size=40)
  assert cfg.seq_len == 9 and cfg.mask_token_id == 40


def test_dataclass_from_config():
  base = dict(codebook_size=CODEBOOK, grid_size=4, text_dim=TEXT_DIM,
              width=16, depth=1, num_heads=2, mlp_dim=32)
  cfg = config_types.dataclass_from_config(tr.TransformerConfig, base, depth=2)
  assert cfg == dataclasses.replace(tiny_cfg(), depth=2)
  with pytest.raises(ValueError, match="widht") as exc:
    config_types.dataclass_from_config(tr.TransformerConfig,
                                       dict(base, widht=16))
  assert "TransformerConfig" in str(exc.value)
  with pytest.raises(ValueError, match="bogus"):
    config_types.dataclass_from_config(tr.TransformerConfig, base, bogus=1)


# ---------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_and_rules():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  return mesh, rules


@pytest.fixture(scope="module")
def sharded_model(mesh_and_rules):
  mesh, rules = mesh_and_rules
  return sharding.create_sharded(
      lambda: tr.MaskedTransformer(tiny_cfg(), rngs=nnx.Rngs(0)), mesh, rules)


def _param(model, path):
  node = nnx.state(model)
  for key in path.split("."):
    node = node[key]
  return node[...]


@pytest.mark.parametrize("path,spec", [
    ("blocks.self_attn.query.kernel", P(None, "fsdp", "tensor", None)),
    ("blocks.self_attn.query.bias", P(None, "tensor", None)),
    ("blocks.cross_attn.key.kernel", P(None, "fsdp", "tensor", None)),
    ("blocks.self_attn.out.kernel", P(None, "tensor", None, "fsdp")),
    ("blocks.mlp.wi.kernel", P(None, "fsdp", "tensor")),
    ("blocks.mlp.wo.kernel", P(None, "tensor", "fsdp")),
    ("blocks.norm1.scale", P(None, "fsdp")),
    ("head_out.kernel", P("fsdp", "tensor")),
    ("head_out.bias", P("tensor")),
    ("token_embed.embedding", P(None, "fsdp")),
    ("pos_embed", P(None, "fsdp")),
    ("text_proj.kernel", P(None, "fsdp")),
])
def test_parameter_partition_specs(sharded_model, mesh_and_rules, path, spec):
  mesh, _ = mesh_and_rules
  x = _param(sharded_model, path)
  assert x.sharding.mesh.shape == mesh.shape
  # Compare normalised specs (trailing Nones are implicit).
  want = jax.sharding.NamedSharding(mesh, spec)
  assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding.spec, spec)
  assert x.sharding.spec == spec


def test_every_parameter_is_sharded_somewhere(sharded_model):
  # The stacked blocks carry an unsharded leading `layers` axis of size depth.
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(sharded_model))
  for path, x in leaves:
    assert any(a is not None for a in x.sharding.spec), path
    if "blocks" in jax.tree_util.keystr(path):
      assert x.shape[0] == 2 and x.sharding.spec[0] is None, path


def test_sharded_forward_equals_unsharded(sharded_model, mesh_and_rules):
  mesh, rules = mesh_and_rules
  unsharded = make_model(tiny_cfg(), seed=0)
  # Same seed -> same values, whatever the placement.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               nnx.to_pure_dict(nnx.state(sharded_model)),
               nnx.to_pure_dict(nnx.state(unsharded)))
  tokens, emb, mask = make_inputs(batch=8, seed=1)
  ref = forward(unsharded, tokens, emb, mask)
  with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(rules):
    out = forward(sharded_model, tokens, emb, mask)
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_sharded_bfloat16_gradients_equal_unsharded(mesh_and_rules):
  # The bf16 path has its own attention and loss gradients, with reshapes
  # that merge the (data-sharded) batch with the (tensor-sharded) heads:
  # on a 2x2x2 mesh they must give the single-device gradients.
  from muse_jax import masking  # pylint: disable=g-import-not-at-top
  mesh, rules = mesh_and_rules
  cfg = tiny_cfg(dtype="bfloat16")
  tokens, emb, mask = make_inputs(batch=8, seed=2, cfg=cfg)
  targets = jnp.where(tokens == cfg.mask_token_id, 0, tokens)
  masked = tokens % 2 == 0

  def grads(model):
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens, emb, mask)
      return masking.masked_cross_entropy(logits, targets, masked, 0.1)[0]

    return jax.jit(jax.value_and_grad(loss))(state)

  ref_loss, ref = grads(make_model(cfg, seed=3))
  with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(rules):
    sharded = sharding.create_sharded(
        lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(3)), mesh, rules)
    loss, got = grads(sharded)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-3)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(got)):
    r = np.asarray(functools.reduce(lambda n, k: n[k.key], path,
                                    nnx.to_pure_dict(ref)))
    scale = float(np.max(np.abs(r))) + 1e-12
    np.testing.assert_allclose(np.asarray(g), r, rtol=0, atol=2e-2 * scale,
                               err_msg=jax.tree_util.keystr(path))
