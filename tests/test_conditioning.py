"""Tests of the conditioning context (muse_jax.models.conditioning)."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import conditioning

WIDTH = 4


def make_context(batch=3, length=5, seed=0, keep_unconditional=None):
  rng = np.random.default_rng(seed)
  emb = jnp.asarray(rng.normal(size=(batch, length, WIDTH)), jnp.float32)
  mask = rng.random((batch, length)) < 0.7
  mask[:, 0] = True  # Every row has at least one valid position.
  keep = (None if keep_unconditional is None
          else jnp.asarray(keep_unconditional))
  return conditioning.Context(emb, jnp.asarray(mask), keep)


def low_res_and_text(batch=3):
  """A super-res-like context: 2 low-res positions kept, then 5 of text."""
  low_res = make_context(batch, 2, seed=1,
                         keep_unconditional=np.ones((batch, 2), bool))
  low_res = low_res.replace(mask=jnp.ones((batch, 2), bool))  # All valid.
  text = make_context(batch, 5, seed=2)
  return low_res, text, conditioning.concat(low_res, text)


# ---------------------------------------------------------------------------
# drop and unconditional.
# ---------------------------------------------------------------------------


def _keep_at_rate(rng, batch, rate):
  # What the training loss does: keep each row with probability 1 - rate.
  return jax.random.uniform(rng, (batch,)) >= rate


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_drops_whole_rows_at_rate(rate):
  ctx = make_context(batch=4096, length=6)
  keep = _keep_at_rate(jax.random.key(0), 4096, rate)
  out = ctx.drop(keep)
  mask, orig = np.asarray(out.mask), np.asarray(ctx.mask)
  assert out.mask.shape == ctx.mask.shape and out.mask.dtype == bool
  dropped = ~mask.any(axis=-1)
  np.testing.assert_array_equal(dropped, ~np.asarray(keep))
  # Kept rows are unchanged; dropped rows are entirely False.
  np.testing.assert_array_equal(mask[~dropped], orig[~dropped])
  assert not mask[dropped].any()
  # The dropping rate is ~rate (binomial std ~0.008 at rate 0.5).
  assert abs(dropped.mean() - rate) < 0.03, dropped.mean()
  # Only the mask changes.
  assert out.embeddings is ctx.embeddings
  assert out.keep_unconditional is None and out.keyed_rows is None


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_drop_extreme_rates(rate):
  ctx = make_context(batch=64, length=3)
  out = ctx.drop(_keep_at_rate(jax.random.key(1), 64, rate))
  expected = ctx.mask if rate == 0.0 else np.zeros_like(ctx.mask)
  np.testing.assert_array_equal(out.mask, expected)


def test_drop_keeps_the_unconditional_positions():
  _, text, ctx = low_res_and_text()
  keep = jnp.array([True, False, True])
  out = ctx.drop(keep)
  mask = np.asarray(out.mask)
  np.testing.assert_array_equal(mask[[0, 2]], np.asarray(ctx.mask)[[0, 2]])
  # The dropped row keeps its low-res positions and loses its text.
  np.testing.assert_array_equal(mask[1, :2], np.asarray(ctx.mask)[1, :2])
  assert mask[1, :2].all()
  assert not mask[1, 2:].any() and np.asarray(text.mask)[1].any()
  np.testing.assert_array_equal(out.keep_unconditional,
                                ctx.keep_unconditional)


def test_unconditional_keeps_only_the_kept_positions():
  ctx = make_context()
  assert not np.asarray(ctx.unconditional().mask).any()
  _, _, both = low_res_and_text()
  uncond = np.asarray(both.unconditional().mask)
  np.testing.assert_array_equal(uncond[:, :2], np.asarray(both.mask)[:, :2])
  assert not uncond[:, 2:].any()
  # keep_unconditional only ever removes positions: a kept position that is
  # not valid stays invalid.
  keep = np.ones((3, 5), bool)
  masked = make_context(keep_unconditional=keep)
  np.testing.assert_array_equal(masked.unconditional().mask, masked.mask)
  assert not np.asarray(masked.mask).all()


# ---------------------------------------------------------------------------
# guidance_pair.
# ---------------------------------------------------------------------------


def test_guidance_pair_without_kept_positions_keys_the_conditional_rows():
  ctx = make_context()
  pair = ctx.guidance_pair()
  # Only the conditional rows are stored; the unconditional ones attend
  # nothing, so they need no keys.
  assert pair.keyed_rows == 3 and pair.batch_size == 6
  assert ctx.batch_size == 3
  np.testing.assert_array_equal(pair.embeddings, ctx.embeddings)
  np.testing.assert_array_equal(pair.mask, ctx.mask)


def test_guidance_pair_with_negative_concatenates_rows():
  ctx, neg = make_context(seed=0), make_context(seed=5)
  pair = ctx.guidance_pair(neg)
  assert pair.keyed_rows is None and pair.batch_size == 6
  np.testing.assert_array_equal(
      pair.embeddings, np.concatenate([ctx.embeddings, neg.embeddings]))
  np.testing.assert_array_equal(pair.mask,
                                np.concatenate([ctx.mask, neg.mask]))
  assert pair.keep_unconditional is None


def test_guidance_pair_with_kept_positions_has_unconditional_rows():
  _, _, ctx = low_res_and_text()
  pair = ctx.guidance_pair()
  # The unconditional rows attend their kept positions: every row has keys.
  assert pair.keyed_rows is None and pair.batch_size == 6
  np.testing.assert_array_equal(
      pair.embeddings, np.concatenate([ctx.embeddings, ctx.embeddings]))
  mask = np.asarray(pair.mask)
  np.testing.assert_array_equal(mask[:3], ctx.mask)
  np.testing.assert_array_equal(mask[3:], ctx.unconditional().mask)
  assert mask[3:, :2].all() and not mask[3:, 2:].any()
  np.testing.assert_array_equal(
      pair.keep_unconditional,
      np.concatenate([ctx.keep_unconditional, ctx.keep_unconditional]))


@pytest.mark.parametrize("method", ["guidance_pair", "drop", "unconditional"])
def test_a_pair_is_not_paired_or_dropped_again(method):
  pair = make_context().guidance_pair()
  args = {"drop": (jnp.ones((3,), bool),)}.get(method, ())
  with pytest.raises(ValueError, match=rf"Context\.{method}.*already a "
                     "guidance pair"):
    getattr(pair, method)(*args)


@pytest.mark.parametrize("shape", [(3, 4), (2, 5)])  # (batch, length)
def test_negative_of_another_shape_raises(shape):
  ctx = make_context()
  neg = make_context(*shape)
  with pytest.raises(ValueError, match="negative context"):
    ctx.guidance_pair(neg)


# ---------------------------------------------------------------------------
# concat and concat_rows.
# ---------------------------------------------------------------------------


def test_concat_positions():
  a, b = make_context(length=2, seed=1), make_context(length=5, seed=2)
  both = conditioning.concat(a, b)
  assert both.embeddings.shape == (3, 7, WIDTH)
  np.testing.assert_array_equal(both.embeddings[:, :2], a.embeddings)
  np.testing.assert_array_equal(both.embeddings[:, 2:], b.embeddings)
  np.testing.assert_array_equal(both.mask,
                                np.concatenate([a.mask, b.mask], axis=1))
  assert both.keep_unconditional is None
  # With a kept part, the other part's positions are not kept.
  low_res, text, mixed = low_res_and_text()
  keep = np.asarray(mixed.keep_unconditional)
  assert keep.shape == (3, 7) and keep.dtype == bool
  assert keep[:, :2].all() and not keep[:, 2:].any()
  with pytest.raises(ValueError, match="concat"):
    conditioning.concat(low_res, text.guidance_pair())


def test_concat_rows():
  a, b = make_context(batch=2, seed=1), make_context(batch=3, seed=2)
  rows = conditioning.concat_rows(a, b)
  assert rows.batch_size == 5 and rows.keyed_rows is None
  np.testing.assert_array_equal(
      rows.embeddings, np.concatenate([a.embeddings, b.embeddings]))
  np.testing.assert_array_equal(rows.mask, np.concatenate([a.mask, b.mask]))
  assert rows.keep_unconditional is None
  kept = make_context(batch=2, keep_unconditional=np.ones((2, 5), bool))
  mixed = conditioning.concat_rows(kept, b)
  keep = np.asarray(mixed.keep_unconditional)
  assert keep[:2].all() and not keep[2:].any()


def test_context_is_a_pytree_with_static_keyed_rows():
  pair = make_context().guidance_pair()
  leaves, treedef = jax.tree.flatten(pair)
  assert len(leaves) == 2  # embeddings, mask; keyed_rows is static.
  assert jax.tree.unflatten(treedef, leaves).keyed_rows == 3
  out = jax.jit(lambda c: c.replace(mask=~c.mask))(pair)
  assert out.keyed_rows == 3


# ---------------------------------------------------------------------------
# TextConditioner.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditioner():
  with nnx.use_eager_sharding(False):
    return conditioning.TextConditioner(6, WIDTH, rngs=nnx.Rngs(0))


def _text(batch=2, length=3, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)[:batch, :length]
  return conditioning.Text(
      jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32),
      jnp.asarray(mask.astype(np.int32)))  # A non-bool mask, as fed.


def test_text_conditioner_projects_and_normalises(conditioner):
  text = _text()
  ctx = conditioner(text)
  assert isinstance(ctx, conditioning.Context)
  assert ctx.embeddings.shape == (2, 3, WIDTH)
  assert ctx.mask.dtype == bool
  np.testing.assert_array_equal(ctx.mask, text.mask.astype(bool))
  # The whole text is dropped in the unconditional branch.
  assert ctx.keep_unconditional is None and ctx.keyed_rows is None
  # Muse's linear projection, then a LayerNorm (scale 1, bias 0 at init).
  proj = (np.asarray(text.embeddings) @ np.asarray(conditioner.proj.kernel)
          + np.asarray(conditioner.proj.bias))
  mean = proj.mean(-1, keepdims=True)
  var = proj.var(-1, keepdims=True)
  np.testing.assert_allclose(ctx.embeddings,
                             (proj - mean) / np.sqrt(var + 1e-6),
                             rtol=1e-4, atol=1e-4)


def test_text_conditioner_rejects_other_width(conditioner):
  with pytest.raises(ValueError, match=r"width 5.*text_dim=6"):
    conditioner(_text(dim=5))


def test_text_conditioner_xla_cpu_matmul_equals_plain(conditioner):
  with nnx.use_eager_sharding(False):
    fast = conditioning.TextConditioner(6, WIDTH, rngs=nnx.Rngs(1),
                                        matmul_impl="xla_cpu")
  nnx.update(fast, nnx.state(conditioner))
  text = _text(seed=3)
  np.testing.assert_allclose(fast(text).embeddings,
                             conditioner(text).embeddings,
                             rtol=1e-5, atol=1e-5)
