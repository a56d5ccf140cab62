"""Tests of Muse's masking objective (muse_jax.masking)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import masking

MASK_ID = 16

# One compiled program per shape instead of op-by-op dispatch (faster).
random_mask = jax.jit(masking.random_mask, static_argnums=(2, 3))


# ---------------------------------------------------------------------------
# mask_ratio.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", masking.SCHEDULES)
def test_mask_ratio_endpoints_monotone_and_bounded(method):
  p = jnp.linspace(0.0, 1.0, 101)
  r = np.asarray(masking.mask_ratio(p, method))
  np.testing.assert_allclose(r[0], 1.0, atol=1e-6)
  np.testing.assert_allclose(r[-1], 0.0, atol=1e-6)
  assert np.all(np.diff(r) < 0), "ratio must strictly decrease with progress"
  # cos(pi/2) rounds to -4.4e-8 in float32: allow float rounding only.
  assert np.all((r >= -1e-6) & (r <= 1.0))
  # Out-of-range progress is clipped, not extrapolated.
  np.testing.assert_allclose(
      masking.mask_ratio(jnp.array([-0.5, 1.5]), method), [1.0, 0.0],
      atol=1e-6)


def test_mask_ratio_cosine_values():
  p = np.array([0.25, 0.5, 0.75], np.float32)
  np.testing.assert_allclose(
      masking.mask_ratio(jnp.asarray(p), "cosine"), np.cos(np.pi / 2 * p),
      rtol=1e-6)


def test_mask_ratio_unknown_schedule():
  with pytest.raises(ValueError, match="bogus"):
    masking.mask_ratio(jnp.array(0.5), "bogus")


# ---------------------------------------------------------------------------
# random_mask.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_mask_replaces_exactly_masked_positions(seed):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, MASK_ID, (64, 16)), jnp.int32)
  inputs, mask = random_mask(jax.random.key(seed), tokens, MASK_ID)
  inputs, mask, tokens = map(np.asarray, (inputs, mask, tokens))
  assert inputs.shape == tokens.shape and mask.shape == tokens.shape
  assert mask.dtype == bool
  assert np.all(mask.sum(axis=-1) >= 1), "every row masks >= 1 token"
  np.testing.assert_array_equal(inputs[mask], MASK_ID)
  np.testing.assert_array_equal(inputs[~mask], tokens[~mask])
  # No original token is the mask id, so mask ids appear exactly where masked.
  np.testing.assert_array_equal(inputs == MASK_ID, mask)


def test_random_mask_masks_at_least_one_even_for_tiny_rates():
  # With N=1, the ceil(ratio * N) >= 1 guarantee is the only thing masking it.
  tokens = jnp.zeros((256, 1), jnp.int32)
  _, mask = random_mask(jax.random.key(3), tokens, MASK_ID)
  assert np.all(np.asarray(mask))


def test_random_mask_rate_matches_arccos_distribution():
  # r = cos(pi/2 u), u ~ U(0,1): E[r] = 2/pi. ceil(r*N)/N is at most 1/N
  # above r, so E[masked fraction] is in [2/pi, 2/pi + 1/N].
  n, batch = 32, 4096
  tokens = jnp.zeros((batch, n), jnp.int32)
  _, mask = random_mask(jax.random.key(0), tokens, MASK_ID)
  rates = np.asarray(mask).mean(axis=-1)
  mean = rates.mean()
  assert 2 / np.pi - 0.01 < mean < 2 / np.pi + 1 / n + 0.01, mean
  # The distribution, not just the mean: P(r > cos(pi/2 * 0.5)) = 0.5.
  frac_above = np.mean(rates > np.cos(np.pi / 4) + 1 / n)
  assert 0.45 < frac_above < 0.52, frac_above


def test_random_mask_rows_differ_and_depend_on_rng():
  tokens = jnp.zeros((64, 16), jnp.int32)
  _, m1 = random_mask(jax.random.key(0), tokens, MASK_ID)
  _, m2 = random_mask(jax.random.key(1), tokens, MASK_ID)
  _, m1b = random_mask(jax.random.key(0), tokens, MASK_ID)
  m1, m2, m1b = map(np.asarray, (m1, m2, m1b))
  np.testing.assert_array_equal(m1, m1b)
  assert not np.array_equal(m1, m2)
  assert len({row.tobytes() for row in m1}) > 16


# ---------------------------------------------------------------------------
# masked_cross_entropy.
# ---------------------------------------------------------------------------


def _ce_inputs(seed=0, b=3, n=5, v=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, n, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, n))
  mask = rng.random((b, n)) < 0.5
  mask[0, 0] = True
  return logits, targets, mask


def _ref_ce(logits, targets, mask, smoothing=0.0):
  logits = logits.astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  v = logits.shape[-1]
  q = np.eye(v)[targets] * (1 - smoothing) + smoothing / v
  per_tok = -(q * logp).sum(-1)
  loss = per_tok[mask].mean()
  acc = (logits.argmax(-1) == targets)[mask].mean()
  return loss, acc


@pytest.mark.parametrize("impl", masking.LOSS_IMPLS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_cross_entropy_matches_hand_computation(smoothing, impl):
  logits, targets, mask = _ce_inputs()
  loss, acc = masking.masked_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), smoothing,
      impl=impl)
  ref_loss, ref_acc = _ref_ce(logits, targets, mask, smoothing)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)


@pytest.mark.parametrize("impl", masking.LOSS_IMPLS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_cross_entropy_gradient_matches_autodiff(smoothing, impl):
  # The fused loss has its own backward pass (softmax - smoothed one-hot,
  # one pass over the logits); it, and the plain path's autodiff, must
  # equal JAX's differentiation of the textbook formula.
  logits, targets, mask = _ce_inputs(seed=3, v=11)
  v = logits.shape[-1]

  def textbook(z):
    logp = jax.nn.log_softmax(z, axis=-1)
    q = jax.nn.one_hot(targets, v) * (1 - smoothing) + smoothing / v
    w = jnp.asarray(mask, jnp.float32)
    return jnp.sum(-jnp.sum(q * logp, -1) * w) / jnp.sum(w)

  ours = lambda z: masking.masked_cross_entropy(z, targets, mask,
                                                 smoothing, impl=impl)[0]
  z = jnp.asarray(logits)
  np.testing.assert_allclose(ours(z), textbook(z), rtol=1e-6)
  grad = jax.grad(ours)(z)
  np.testing.assert_allclose(grad, jax.grad(textbook)(z), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_array_equal(grad[~mask], 0.0)


def test_masked_cross_entropy_ignores_unmasked_positions():
  logits, targets, mask = _ce_inputs(seed=1)
  changed = logits.copy()
  changed[~mask] = np.random.default_rng(9).normal(
      size=changed[~mask].shape) * 100
  l1, a1 = masking.masked_cross_entropy(logits, targets, mask)
  l2, a2 = masking.masked_cross_entropy(changed, targets, mask)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(a1, a2)
  # ...but changing a masked position does change it.
  changed[mask] += np.random.default_rng(10).normal(size=changed[mask].shape)
  l3, _ = masking.masked_cross_entropy(changed, targets, mask)
  assert abs(float(l3) - float(l1)) > 1e-4


def test_masked_cross_entropy_bf16_logits_computed_in_f32():
  logits, targets, mask = _ce_inputs(seed=2)
  loss, _ = masking.masked_cross_entropy(
      jnp.asarray(logits, jnp.bfloat16), targets, mask)
  assert loss.dtype == jnp.float32
  ref, _ = _ref_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32),
                   targets, mask)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_masked_cross_entropy_empty_mask_is_zero_not_nan():
  logits, targets, mask = _ce_inputs()
  loss, acc = masking.masked_cross_entropy(logits, targets, np.zeros_like(mask))
  assert float(loss) == 0.0 and float(acc) == 0.0


def test_label_smoothing_penalises_perfect_prediction():
  v = 8
  targets = np.arange(4) % v
  logits = np.full((1, 4, v), -50.0, np.float32)
  logits[0, np.arange(4), targets] = 50.0
  mask = np.ones((1, 4), bool)
  plain, acc = masking.masked_cross_entropy(logits, targets[None], mask)
  smooth, _ = masking.masked_cross_entropy(logits, targets[None], mask, 0.1)
  assert float(acc) == 1.0
  assert float(plain) < 1e-6
  assert float(smooth) > 1.0  # ~0.1 * (v-1)/v * 100 nats.
  ref, _ = _ref_ce(logits, targets[None], mask, 0.1)
  np.testing.assert_allclose(smooth, ref, rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_plain_and_fused_cross_entropy_agree(smoothing, seed):
  # Same loss, accuracy and gradient; the fused backward is hand-written.
  logits, targets, mask = _ce_inputs(seed=seed + 4, b=4, n=6, v=13)
  logits = logits * 3  # Sharper distributions, some confident hits.
  targets = np.where(np.random.default_rng(seed).random(targets.shape) < 0.3,
                     logits.argmax(-1), targets)

  def run(impl):
    def loss(z):
      return masking.masked_cross_entropy(z, targets, mask, smoothing,
                                          impl=impl)
    (value, acc), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        jnp.asarray(logits))
    return value, acc, grad

  plain, fused = run("plain"), run("fused")
  np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
  np.testing.assert_array_equal(fused[1], plain[1])
  assert 0.0 < float(plain[1]) < 1.0  # Some hits, some misses.
  np.testing.assert_allclose(fused[2], plain[2], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(plain[2][~mask], 0.0)
  assert float(jnp.max(jnp.abs(plain[2]))) > 1e-3


def test_unknown_loss_impl_raises_naming_it():
  logits, targets, mask = _ce_inputs()
  with pytest.raises(ValueError, match="'cuda'"):
    masking.masked_cross_entropy(logits, targets, mask, impl="cuda")
