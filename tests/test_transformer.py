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
from muse_jax import masking
from muse_jax.models import conditioning
from muse_jax.models import transformer as tr
from muse_jax import sharding

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
  """(tokens [B, N], conditioning.Text [B, TEXT_LEN, text_dim])."""
  cfg = cfg or tiny_cfg()
  rng = np.random.default_rng(seed)
  # Ids include the mask id (= codebook_size).
  tokens = rng.integers(0, cfg.codebook_size + 1, (batch, cfg.seq_len))
  text_emb = rng.normal(size=(batch, TEXT_LEN, cfg.text_dim))
  text_mask = np.ones((batch, TEXT_LEN), bool)
  text_mask[:, -2:] = False  # Padding.
  return (jnp.asarray(tokens, jnp.int32),
          conditioning.Text(jnp.asarray(text_emb, jnp.float32),
                            jnp.asarray(text_mask)))


def call_on_text(m, tokens, text):
  """Logits of `tokens` given a raw text condition."""
  return m(tokens, m.context(text))


def call_dropped(m, tokens, text, keep):
  """Logits with the rows where `keep` is False unconditional."""
  return m(tokens, m.context(text).drop(keep))


def text_kv(m, text):
  return m.context_kv(m.context(text))


def logits_from_kv(m, tokens, kv):
  return m.logits(tokens, kv)


def features_and_logits(m, tokens, context):
  kv = m.context_kv(context)
  return m.features(tokens, kv), m.logits(tokens, kv), m(tokens, context)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, fn, state, *args):
  return fn(nnx.merge(graphdef, state), *args)


def forward(model, *args, fn=call_on_text):
  """Jitted `fn(model, *args)`; compiled once per (config, fn, shapes)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, fn, state, *args)


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
  tokens, text = inputs
  base = forward(model, tokens, text)
  changed = tokens.at[0, 3].set((tokens[0, 3] + 1) % CODEBOOK)
  out = forward(model, changed, text)
  # Self-attention mixes the change into every position of row 0 only.
  assert np.all(np.abs(out[0] - base[0]).max(-1) > 0)
  np.testing.assert_array_equal(out[1], base[1])
  # Same token everywhere still gives position-dependent logits.
  same = forward(model, jnp.zeros_like(tokens), text)
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
  kv_a = forward(scanned, inputs[1], fn=text_kv)
  kv_b = forward(unrolled, inputs[1], fn=text_kv)
  for x, y in [(kv_a.keys, kv_b.keys), (kv_a.values, kv_b.values)]:
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_remat_policies_give_same_loss_and_grads(inputs):
  tokens, text = inputs
  targets = jnp.arange(tokens.size).reshape(tokens.shape) % CODEBOOK
  graphdefs, state = {}, None
  for policy in tr.REMAT_POLICIES:
    graphdefs[policy], state = nnx.split(
        make_model(tiny_cfg(remat_policy=policy), seed=1))

  def loss_and_grads(policy, s):
    def loss(s):
      logits = call_on_text(nnx.merge(graphdefs[policy], s), tokens, text)
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


def test_context_kv_then_logits_equals_call(model, inputs):
  tokens, text = inputs
  kv = forward(model, text, fn=text_kv)
  cfg = model.cfg
  head_dim = cfg.width // cfg.num_heads
  for x in (kv.keys, kv.values):
    # The plain impl's layout: [depth, B, S, H, K].
    assert x.shape == (cfg.depth, 2, TEXT_LEN, cfg.num_heads, head_dim)
  assert kv.keyed_rows is None
  np.testing.assert_array_equal(kv.mask, text.mask)
  full = forward(model, tokens, text)
  np.testing.assert_allclose(forward(model, tokens, kv, fn=logits_from_kv),
                             full, rtol=1e-6, atol=1e-6)
  # The cached keys/values are what is used: other text gives other logits.
  other = forward(model, text.replace(embeddings=text.embeddings + 1.0),
                  fn=text_kv)
  assert not np.allclose(forward(model, tokens, other, fn=logits_from_kv),
                         full)
  # Logits are head_logits of features.
  context = model.context(text)
  feats, logits, called = forward(model, tokens, context,
                                  fn=features_and_logits)
  assert feats.shape == (2, cfg.seq_len, cfg.width)
  np.testing.assert_allclose(logits, full, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(logits, called)
  np.testing.assert_allclose(model.head_logits(feats), logits, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("impl", ["plain", "xla_cpu"])
def test_guidance_pair_skips_cross_attention(impl, inputs):
  # The sampler's [cond; uncond] batch: the guidance pair of a text context
  # keeps only the conditional rows' keys (keyed_rows=B), and the model
  # writes the unconditional rows' cross-attention without computing it.
  # That must equal the explicit batch of conditional rows and all-masked
  # unconditional rows.
  cfg = tiny_cfg(attention_impl=impl, matmul_impl=impl)
  m = make_model(cfg, seed=4)
  tokens, text = inputs
  rows = tokens.shape[0]
  both = jnp.concatenate([tokens, tokens[::-1]])
  context = m.context(text)
  pair = context.guidance_pair()
  assert pair.keyed_rows == rows and pair.batch_size == 2 * rows
  explicit = conditioning.concat_rows(context, context.unconditional())
  assert explicit.keyed_rows is None
  assert explicit.embeddings.shape[0] == 2 * rows
  assert not np.asarray(explicit.mask[rows:]).any()
  got = forward(m, both, pair, fn=features_and_logits)
  want = forward(m, both, explicit, fn=features_and_logits)
  for g, w, what in zip(got, want, ("features", "logits", "call")):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=what)
  # The pair's keys are those of the conditional rows only.
  kv = m.context_kv(pair)
  assert kv.keys.shape[1] == rows and kv.keyed_rows == rows
  # The unconditional rows differ from the conditional ones (other tokens,
  # no text), so the comparison above covered both halves.
  assert not np.allclose(got[1][:rows], got[1][rows:])
  with pytest.raises(ValueError, match="3 token rows but the context "
                     "conditions 4"):
    m.features(both[:3], kv)


def test_dropped_caption_is_unconditional(model, inputs):
  tokens, text = inputs
  other = text.replace(embeddings=text.embeddings * -3.0 + 1.0)
  # Row 0's caption is dropped; row 1 keeps its caption.
  keep = jnp.array([False, True])
  a = forward(model, tokens, text, keep, fn=call_dropped)
  b = forward(model, tokens, other, keep, fn=call_dropped)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[1], b[1])
  # The unconditional output is the same whatever the padding embeddings,
  # and the same as a caption whose mask is all False.
  zeros = text.replace(embeddings=jnp.zeros_like(text.embeddings))
  c = forward(model, tokens, zeros, keep, fn=call_dropped)
  np.testing.assert_array_equal(a[0], c[0])
  masked = text.replace(mask=text.mask.at[0].set(False))
  np.testing.assert_array_equal(forward(model, tokens, masked)[0], a[0])
  np.testing.assert_array_equal(forward(model, tokens, text)[1], a[1])


def test_padded_text_tokens_are_ignored(model, inputs):
  tokens, text = inputs  # The last two text positions are padding.
  with_emb = lambda e: text.replace(embeddings=e)
  changed = with_emb(text.embeddings.at[:, -2:].set(100.0))
  np.testing.assert_allclose(forward(model, tokens, changed),
                             forward(model, tokens, text),
                             rtol=1e-6, atol=1e-6)
  changed = with_emb(text.embeddings.at[:, 0].set(100.0))
  assert not np.allclose(forward(model, tokens, changed),
                         forward(model, tokens, text))


@pytest.mark.parametrize("length", [15, 17])
def test_wrong_token_length_raises(model, inputs, length):
  _, text = inputs
  tokens = jnp.zeros((2, length), jnp.int32)
  with pytest.raises(ValueError, match=rf"length {length}.*expects 16"):
    model(tokens, model.context(text))


# ---------------------------------------------------------------------------
# The xla_cpu path: same parameters, same function.
# ---------------------------------------------------------------------------


def _loss_problem(cfg, batch=8, seed=2):
  """Inputs of a masked-token loss; rows 3 and 7 unconditional."""
  tokens, text = make_inputs(batch=batch, seed=seed, cfg=cfg)
  targets = jnp.where(tokens == cfg.mask_token_id, 0, tokens)[::-1]
  masked = tokens % 3 != 0
  keep = jnp.arange(batch) % 4 != 3  # These rows attend no key at all.
  return tokens, text, keep, targets, masked


def loss_logits_and_grads(m, problem, loss_impl="plain"):
  """The masked-token loss of `m`, its logits and its parameter gradients."""
  tokens, text, keep, targets, masked = problem
  graphdef, params = nnx.split(m, nnx.Param)

  def loss(params):
    logits = call_dropped(nnx.merge(graphdef, params), tokens, text, keep)
    value, _ = masking.masked_cross_entropy(logits, targets, masked, 0.1,
                                            impl=loss_impl)
    return value, logits

  (value, logits), grads = jax.jit(jax.value_and_grad(
      loss, has_aux=True))(params)
  return value, logits, nnx.to_pure_dict(grads)


def _plain_and_xla_cpu(dtype):
  """Plain and xla_cpu models with the same weights (the xla_cpu one's)."""
  fast = make_model(tiny_cfg(dtype=dtype, attention_impl="xla_cpu",
                             matmul_impl="xla_cpu"), seed=3)
  plain = make_model(tiny_cfg(dtype=dtype), seed=4)
  nnx.update(plain, nnx.state(fast))
  want, got = (nnx.to_pure_dict(nnx.state(m)) for m in (fast, plain))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  return plain, fast


@pytest.fixture(scope="module")
def bf16_xla_cpu_run():
  """(plain model, problem, xla_cpu loss/logits/grads), bf16, unsharded.

  Shared by the plain-vs-xla_cpu test and the sharded-gradients test (one
  bf16 compilation fewer). The xla_cpu path runs the fused loss.
  """
  plain, fast = _plain_and_xla_cpu("bfloat16")
  problem = _loss_problem(fast.cfg)
  return plain, problem, loss_logits_and_grads(fast, problem, "fused")


def _key_bias(name: str) -> bool:
  # The softmax ignores a shift shared by every key: the key biases'
  # gradients are zero in exact arithmetic, and rounding noise in practice.
  return name.endswith("['key']['bias']")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xla_cpu_impls_equal_plain(dtype, request):
  if dtype == "float32":
    plain, fast = _plain_and_xla_cpu(dtype)
    problem = _loss_problem(fast.cfg)
    loss, logits, grads = loss_logits_and_grads(fast, problem, "fused")
    tol = 1e-5
  else:
    plain, problem, (loss, logits, grads) = request.getfixturevalue(
        "bf16_xla_cpu_run")
    tol = 5e-2
  ref_loss, ref_logits, ref_grads = loss_logits_and_grads(plain, problem)
  assert logits.dtype == ref_logits.dtype == jnp.float32
  scale = float(np.max(np.abs(ref_logits)))
  np.testing.assert_allclose(logits, ref_logits, rtol=tol, atol=tol * scale)
  np.testing.assert_allclose(loss, ref_loss, rtol=tol)
  # Gradients leaf by leaf, atol relative to each leaf's largest entry;
  # the key biases' (noise) must be small next to the largest gradient.
  largest = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  assert len(flat) == len(jax.tree.leaves(ref_grads)) > 10
  for path, r in jax.tree_util.tree_leaves_with_path(ref_grads):
    g, name = flat[path], jax.tree_util.keystr(path)
    assert g.dtype == r.dtype == jnp.float32, name
    if _key_bias(name):
      assert max(float(np.max(np.abs(g))), float(np.max(np.abs(r)))) <= (
          tol * largest), name
      continue
    leaf_scale = float(np.max(np.abs(r)))
    assert leaf_scale > 0, name
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol * leaf_scale,
                               err_msg=name)


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
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(matmul_impl="xla_gpu"), "matmul_impl"),
])
def test_bad_config_raises_naming_field(overrides, field):
  with pytest.raises(ValueError, match=rf"TransformerConfig\.{field}\b"):
    tiny_cfg(**overrides)


@pytest.mark.parametrize("field", ["attention_impl", "matmul_impl"])
def test_bad_impl_names_the_value_and_choices(field):
  with pytest.raises(ValueError, match=rf"{field}='fast' not in "
                     r"\('plain', 'xla_cpu'\)"):
    tiny_cfg(**{field: "fast"})


@pytest.mark.parametrize("qk_norm,normed", [
    ("none", set()), ("cross", {"cross_attn"}),
    ("all", {"cross_attn", "self_attn"})])
def test_qk_norm_placement(qk_norm, normed):
  model = make_model(tiny_cfg(qk_norm=qk_norm))
  blocks = model.blocks
  have = {name for name in ("self_attn", "cross_attn")
          if getattr(blocks, name).query_norm is not None}
  assert have == normed
  tokens, text = make_inputs()
  logits = call_on_text(model, tokens, text)
  assert logits.shape == (2, 16, CODEBOOK) and bool(jnp.all(
      jnp.isfinite(logits)))
  with pytest.raises(ValueError, match=r"TransformerConfig\.qk_norm='some'"):
    tiny_cfg(qk_norm="some")


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
    ("conditioner.proj.kernel", P(None, "fsdp")),
    ("conditioner.norm.scale", P("fsdp")),
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
  tokens, text = make_inputs(batch=8, seed=1)
  ref = forward(unsharded, tokens, text)
  with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(rules):
    out = forward(sharded_model, tokens, text)
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_sharded_bfloat16_gradients_equal_unsharded(mesh_and_rules,
                                                    bf16_xla_cpu_run):
  # The xla_cpu bf16 path has its own attention and loss gradients, with
  # reshapes that merge the (data-sharded) batch with the (tensor-sharded)
  # heads: on a 2x2x2 mesh they must give the single-device gradients.
  mesh, rules = mesh_and_rules
  _, problem, (ref_loss, _, ref) = bf16_xla_cpu_run
  cfg = tiny_cfg(dtype="bfloat16", attention_impl="xla_cpu",
                 matmul_impl="xla_cpu")
  with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(rules):
    sharded = sharding.create_sharded(
        lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(3)), mesh, rules)
    loss, _, got = loss_logits_and_grads(sharded, problem, "fused")
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-3)
  largest = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(ref))
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    r = np.asarray(functools.reduce(lambda n, k: n[k.key], path, ref))
    name = jax.tree_util.keystr(path)
    scale = largest if _key_bias(name) else float(np.max(np.abs(r))) + 1e-12
    np.testing.assert_allclose(np.asarray(g), r, rtol=0, atol=2e-2 * scale,
                               err_msg=name)
