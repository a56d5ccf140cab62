"""Tests for the vector quantizer (muse_jax/models/quantizer.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax.models import quantizer as q_lib


def _build(**kw) -> q_lib.Quantizer:
  cfg = q_lib.QuantizerConfig(**dict(dict(codebook_size=16, code_dim=3), **kw))
  with nnx.use_eager_sharding(False):
    return q_lib.Quantizer(cfg, nnx.Rngs(jax.random.key(0, impl='rbg')))


def test_euclidean_lookup_is_the_nearest_code():
  q = _build(kind='euclidean')
  codes = np.asarray(q.codebook[...])
  z = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
  z_st, idx, aux = q(jnp.asarray(z))
  d = ((z[..., None, :] - codes) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(idx), d.argmin(-1))
  np.testing.assert_allclose(np.asarray(z_st), codes[d.argmin(-1)],
                             atol=1e-6)
  # Codebook loss = commitment loss = mean squared distance to the code.
  want = np.mean((z - codes[d.argmin(-1)]) ** 2)
  np.testing.assert_allclose(float(aux['codebook_loss']), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux['commitment_loss']), want, rtol=1e-5)
  assert aux['latents'].shape == (20, 3)


def test_l2_normalized_lookup_is_the_largest_cosine():
  q = _build(kind='l2_normalized')
  codes = np.asarray(q.codebook[...])
  codes = codes / np.linalg.norm(codes, axis=-1, keepdims=True)
  z = np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32) * 5
  _, idx, _ = q(jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(idx), (z @ codes.T).argmax(-1))


def test_straight_through_gradient_is_identity():
  q = _build(kind='euclidean')
  z = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)), jnp.float32)
  g = jax.grad(lambda z: jnp.sum(q(z)[0] * jnp.arange(3.0)))(z)
  np.testing.assert_allclose(np.asarray(g), np.tile(np.arange(3.0), (6, 1)))


def test_entropy_loss_prefers_confident_spread_assignments():
  k = 4
  spread = jnp.eye(k) * 10.0  # Each latent picks a different code.
  collapsed = jnp.tile(jnp.eye(k)[:1] * 10.0, (k, 1))  # All pick code 0.
  uniform = jnp.zeros((k, k))  # No latent is confident.
  lo = float(q_lib.entropy_loss(spread, 1.0))
  assert lo < 0.01
  assert float(q_lib.entropy_loss(collapsed, 1.0)) > np.log(k) - 0.01
  assert float(q_lib.entropy_loss(uniform, 1.0)) > np.log(k) - 0.01


def test_restart_moves_only_dead_codes_onto_latents():
  q = _build(kind='euclidean', restart_threshold=0.6, usage_decay=0.5)
  before = np.asarray(q.codebook[...]).copy()
  counts = jnp.zeros((16,)).at[jnp.array([0, 3])].set(5.0)
  latents = jnp.asarray(np.full((10, 3), 7.0, np.float32))
  n = q.restart_dead_codes(counts, latents, jax.random.key(0))
  after = np.asarray(q.codebook[...])
  assert float(n) == 14
  np.testing.assert_array_equal(after[[0, 3]], before[[0, 3]])
  dead = [i for i in range(16) if i not in (0, 3)]
  np.testing.assert_allclose(after[dead], 7.0, atol=0.01)
  # Restarted codes get a grace period; the used ones decay slower.
  n = q.restart_dead_codes(jnp.zeros((16,)), latents, jax.random.key(1))
  assert float(n) == 0
  n = q.restart_dead_codes(jnp.zeros((16,)), latents, jax.random.key(2))
  assert float(n) == 14


@pytest.mark.parametrize('field,value', [
    ('kind', 'cosine'), ('codebook_size', 1), ('code_dim', 0),
    ('restart_threshold', -1.0), ('usage_decay', 1.0),
    ('entropy_temperature', 0.0)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field if field != 'kind' else 'kind'):
    q_lib.QuantizerConfig(**{field: value})
