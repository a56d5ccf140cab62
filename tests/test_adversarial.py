"""Tests for the adversarial losses (muse_jax/losses/adversarial.py)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muse_jax.losses import adversarial as adv
from muse_jax.models import discriminator as disc_lib

REAL = jnp.asarray([2.0, 0.5, -1.0])
FAKE = jnp.asarray([-3.0, 0.0, 1.5])


def _softplus(x):
  return math.log1p(math.exp(x))


def test_hinge_losses_on_hand_values():
  # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2.5].
  d = adv.discriminator_loss(REAL, FAKE, 'hinge')
  assert d.dtype == jnp.float32 and d.shape == ()
  np.testing.assert_allclose(d, 2.5 / 3 + 3.5 / 3, rtol=1e-6)
  np.testing.assert_allclose(adv.generator_loss(FAKE, 'hinge'), 0.5,
                             rtol=1e-6)


def test_non_saturating_losses_on_hand_values():
  want_d = (sum(_softplus(-r) for r in (2.0, 0.5, -1.0)) / 3 +
            sum(_softplus(f) for f in (-3.0, 0.0, 1.5)) / 3)
  want_g = sum(_softplus(-f) for f in (-3.0, 0.0, 1.5)) / 3
  np.testing.assert_allclose(
      adv.discriminator_loss(REAL, FAKE, 'non_saturating'), want_d, rtol=1e-6)
  np.testing.assert_allclose(adv.generator_loss(FAKE, 'non_saturating'),
                             want_g, rtol=1e-6)


def test_losses_are_float32_for_bf16_logits():
  real, fake = REAL.astype(jnp.bfloat16), FAKE.astype(jnp.bfloat16)
  for kind in adv.KINDS:
    assert adv.discriminator_loss(real, fake, kind).dtype == jnp.float32
    assert adv.generator_loss(fake, kind).dtype == jnp.float32


def test_unknown_kind_raises_naming_it_and_the_choices():
  with pytest.raises(ValueError, match=r"'wasserstein'.*hinge.*non_saturating"):
    adv.discriminator_loss(REAL, FAKE, 'wasserstein')
  with pytest.raises(ValueError, match=r"'lsgan'.*hinge"):
    adv.generator_loss(FAKE, 'lsgan')


class _Linear(nnx.Module):
  """D(x) = sum(w * x) per image."""

  def __init__(self, w):
    self.w = nnx.Param(jnp.asarray(w, jnp.float32))

  def __call__(self, x):
    return jnp.sum(x * self.w[...], axis=(1, 2, 3))


def test_r1_penalty_of_a_linear_discriminator_and_its_param_gradient():
  w = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 10 - 0.5
  d = _Linear(w)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 3)),
                  jnp.float32)
  # Every image's input gradient is w, so the batch mean of ||w||^2 is
  # ||w||^2 (a sum over the batch would double it).
  np.testing.assert_allclose(adv.r1_penalty(d, x), np.sum(w ** 2), rtol=1e-6)
  # Differentiable in the discriminator's parameters: d||w||^2/dw = 2w.
  value, grads = nnx.jit(nnx.value_and_grad(
      lambda d: adv.r1_penalty(d, x)))(d)
  np.testing.assert_allclose(value, np.sum(w ** 2), rtol=1e-6)
  np.testing.assert_allclose(grads.w[...], 2 * w, rtol=1e-6)


def test_r1_penalty_is_a_batch_mean_of_per_image_norms():
  # D(x) = c * sum(x^2): input gradient 2 c x, penalty mean_b 4c^2 ||x_b||^2.
  c = 0.3
  x = np.random.default_rng(1).normal(size=(3, 2, 2, 1)).astype(np.float32)
  want = np.mean(4 * c ** 2 * np.sum(x ** 2, axis=(1, 2, 3)))
  got = adv.r1_penalty(lambda x: c * jnp.sum(x ** 2, axis=(1, 2, 3)),
                       jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_lazy_r1_penalty():
  d = _Linear(np.full((1, 1, 2), 0.5, np.float32))  # ||w||^2 = 0.5.
  x = jnp.ones((2, 1, 1, 2))
  lazy = jax.jit(lambda step: adv.lazy_r1_penalty(d, x, step, every=4))
  np.testing.assert_allclose(lazy(8), 4 * 0.5, rtol=1e-6)
  assert float(lazy(9)) == 0.0
  np.testing.assert_allclose(adv.lazy_r1_penalty(d, x, 7, every=1), 0.5,
                             rtol=1e-6)
  # Inside nnx.value_and_grad of the discriminator (lax.cond over a closed
  # module): the gradient is every * 2w on due steps, 0 otherwise.
  grad_fn = nnx.jit(lambda d, s: nnx.value_and_grad(
      lambda d: adv.lazy_r1_penalty(d, x, s, every=4))(d))
  _, grads = grad_fn(d, 4)
  np.testing.assert_allclose(grads.w[...], 4 * 2 * 0.5, rtol=1e-6)
  _, grads = grad_fn(d, 5)
  np.testing.assert_array_equal(grads.w[...], 0.0)


def test_r1_penalty_through_the_real_discriminator():
  # The double backward pass inside nnx.value_and_grad of the discriminator.
  cfg = disc_lib.DiscriminatorConfig(base_channels=4, channel_mult=(1, 2))
  with nnx.use_eager_sharding(False):
    d = disc_lib.Discriminator(
        cfg, rngs=nnx.Rngs(jax.random.key(0, impl='rbg')))
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3)),
                  jnp.float32)
  value, grads = nnx.jit(nnx.value_and_grad(
      lambda d: adv.r1_penalty(d, x)))(d)
  assert value.dtype == jnp.float32 and float(value) > 0
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert float(jnp.abs(grads.conv_in.kernel[...]).sum()) > 0


def test_lecam_penalty_on_hand_values_and_its_gradients():
  real = jnp.asarray([1.0, -1.0])
  fake = jnp.asarray([0.5, -2.0])
  # relu(real + 0.3) = [1.3, 0]; relu(0.2 - fake) = [0, 2.2].
  want = 1.3 ** 2 / 2 + 2.2 ** 2 / 2
  np.testing.assert_allclose(adv.lecam_penalty(real, fake, 0.2, -0.3), want,
                             rtol=1e-6)
  g_real, g_fake, g_er, g_ef = jax.grad(adv.lecam_penalty,
                                        argnums=(0, 1, 2, 3))(
                                            real, fake, jnp.float32(0.2),
                                            jnp.float32(-0.3))
  np.testing.assert_allclose(g_real, [1.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(g_fake, [0.0, -2.2], rtol=1e-6)
  assert float(g_er) == 0.0 and float(g_ef) == 0.0  # EMAs are constants.


def test_update_lecam_emas():
  real = jnp.asarray([1.0, -1.0])  # mean 0
  fake = jnp.asarray([0.5, -2.0])  # mean -0.75
  new_real, new_fake = adv.update_lecam_emas(0.2, -0.3, real, fake, 0.9)
  np.testing.assert_allclose(new_real, 0.9 * 0.2, rtol=1e-6)
  np.testing.assert_allclose(new_fake, 0.9 * -0.3 + 0.1 * -0.75, rtol=1e-6)
  assert new_real.dtype == jnp.float32


def test_adaptive_weight_on_hand_grads():
  nll = {'kernel': jnp.asarray([[3.0]]), 'bias': jnp.asarray([4.0])}  # 5
  gan = {'kernel': jnp.asarray([[0.0]]), 'bias': jnp.asarray([2.0])}  # 2
  np.testing.assert_allclose(adv.adaptive_weight(nll, gan), 5 / (2 + 1e-4),
                             rtol=1e-6)
  # Clipped to max_weight, and to the default 1e4 for vanishing GAN grads.
  np.testing.assert_allclose(adv.adaptive_weight(nll, gan, max_weight=1.5),
                             1.5)
  zero = jax.tree.map(jnp.zeros_like, gan)
  np.testing.assert_allclose(adv.adaptive_weight(nll, zero), 1e4)
  # Not differentiated through (VQGAN detaches it).
  g = jax.grad(lambda n: adv.adaptive_weight(n, gan))(nll)
  assert all(float(jnp.abs(v).sum()) == 0.0 for v in jax.tree.leaves(g))


def test_adaptive_weight_accepts_nnx_gradient_states():
  lin = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 2))
  g_nll = nnx.grad(lambda m: jnp.sum(m(x)) * 3.0)(lin)
  g_gan = nnx.grad(lambda m: jnp.sum(m(x)))(lin)
  np.testing.assert_allclose(
      adv.adaptive_weight(nnx.state(g_nll), nnx.state(g_gan)),
      3.0 * np.sqrt(3) / (np.sqrt(3) + 1e-4), rtol=1e-5)


def test_adversarial_weight_schedule():
  sched = jax.jit(lambda s: adv.adversarial_weight_schedule(s, 10, 0.25))
  assert float(sched(0)) == 0.0 and float(sched(9)) == 0.0
  assert float(sched(10)) == 0.25 and float(sched(1000)) == 0.25
  assert sched(3).dtype == jnp.float32
  assert float(adv.adversarial_weight_schedule(0, 0, 0.5)) == 0.5


def test_config_defaults_and_flags():
  cfg = adv.AdversarialConfig()
  assert cfg.kind == 'hinge' and not cfg.use_r1 and not cfg.use_lecam
  cfg = adv.AdversarialConfig(r1_weight=1.0, lecam_weight=0.001)
  assert cfg.use_r1 and cfg.use_lecam
  hash(cfg)


@pytest.mark.parametrize('field,value', [
    ('weight', -0.1), ('kind', 'wgan'), ('start_step', -1),
    ('start_step', 1.5), ('adaptive', 1), ('max_adaptive_weight', 0.0),
    ('r1_weight', -1.0), ('r1_every', 0), ('lecam_weight', -1e-3),
    ('lecam_decay', 1.0), ('lecam_decay', -0.1), ('weight', 'big'),
])
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=f'AdversarialConfig.{field}'):
    dataclasses.replace(adv.AdversarialConfig(), **{field: value})
