"""Tests for the StyleGAN-style discriminator (models/discriminator.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from muse_jax.losses import adversarial
from muse_jax.models import discriminator as disc_lib

# Two residual blocks (f = 4), channels 8 -> 8 -> 16 (capped at 16).
TINY = disc_lib.DiscriminatorConfig(base_channels=8, channel_mult=(1, 4),
                                    max_channels=16)
CONV_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')


def _build(cfg=TINY, seed=0):
  # 'rbg' keys: threefry initializers compile slowly on XLA:CPU.
  with nnx.use_eager_sharding(False):
    return disc_lib.Discriminator(
        cfg, rngs=nnx.Rngs(jax.random.key(seed, impl='rbg')))


def _images(n, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(
      -1, 1, (n, size, size, 3)).astype(np.float32))


@nnx.jit
def _forward(model, x):
  return model(x)


@pytest.fixture(scope='module')
def model():
  return _build()


@pytest.mark.parametrize('size', [32, 64])
def test_logit_shape_and_dtype_at_two_resolutions(model, size):
  logits = _forward(model, _images(3, size))
  assert logits.shape == (3,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # Different images get different logits (the head is not constant).
  assert float(jnp.max(logits) - jnp.min(logits)) > 1e-6


def test_logits_are_per_image(model):
  # No batch statistics: permuting the batch permutes the logits, so the
  # R1 penalty's gradient of the summed logits is each image's own.
  x = _images(4, 32, seed=1)
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(_forward(model, x[perm]),
                             np.asarray(_forward(model, x))[perm], rtol=1e-5,
                             atol=1e-6)


def test_wrong_channels_and_size_raise(model):
  with pytest.raises(ValueError, match=r'expects 3 image channels.*got 4'):
    model(jnp.zeros((1, 32, 32, 4)))
  with pytest.raises(ValueError, match=r'divisible by 4'):
    model(jnp.zeros((1, 30, 32, 3)))
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    model(jnp.zeros((32, 32, 3)))


def test_channels_follow_mult_and_cap(model):
  assert TINY.block_channels == (8, 16)
  assert model.conv_in.kernel.shape == (3, 3, 3, 8)
  assert model.blocks[0].conv2.kernel.shape == (3, 3, 8, 8)
  assert model.blocks[1].conv2.kernel.shape == (3, 3, 8, 16)
  assert model.blocks[1].skip.kernel.shape == (1, 1, 8, 16)
  assert model.blocks[1].skip.bias is None
  assert model.logit.kernel.shape == (16, 1)


def test_params_carry_logical_axes(model):
  allowed = set(CONV_AXES)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param),
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert len(leaves) == 2 + 2 * 5 + 2 + 4  # stem, blocks, conv_out, dense x2
  for var in leaves:
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var.ndim, var
    assert set(names) <= allowed, names
  assert model.conv_in.kernel.get_metadata()['out_sharding'] == CONV_AXES
  assert model.dense.kernel.get_metadata()['out_sharding'] == ('conv_in',
                                                               'conv_out')
  assert model.logit.bias.get_metadata()['out_sharding'] == ('conv_out',)


def test_bf16_compute_gives_f32_logits_and_params():
  model = _build(dataclasses.replace(TINY, dtype='bfloat16'))
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  out = nnx.eval_shape(lambda m, x: m(x), model, _images(2, 32))
  assert out.shape == (2,) and out.dtype == jnp.float32


def test_blur_downsample():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 6, 3)).astype(np.float32))
  # Taps (1, 1) are a 2x2 average pool.
  avg = np.asarray(x).reshape(2, 4, 2, 3, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(disc_lib.blur_downsample(x, (1, 1)), avg,
                             rtol=1e-5, atol=1e-6)
  # The normalized [1, 3, 3, 1] blur keeps a constant image constant away
  # from the zero-padded border, and halves every (even) size.
  const = jnp.full((1, 8, 8, 2), 0.7)
  out = disc_lib.blur_downsample(const, (1, 3, 3, 1))
  assert out.shape == (1, 4, 4, 2)
  np.testing.assert_allclose(out[:, 1:-1, 1:-1], 0.7, rtol=1e-6)
  assert float(out[0, 0, 0, 0]) < 0.7
  assert disc_lib.blur_downsample(x, (1, 2, 1)).shape == (2, 4, 3, 3)


@pytest.mark.parametrize('field,value,match', [
    ('in_channels', 0, 'in_channels'),
    ('base_channels', 2.5, 'base_channels'),
    ('max_channels', -1, 'max_channels'),
    ('channel_mult', (), 'channel_mult'),
    ('channel_mult', (1, 0), 'channel_mult'),
    ('blur_kernel', (1,), 'blur_kernel'),
    ('blur_kernel', (1, -1), 'blur_kernel'),
    ('dtype', 'float64', 'float64'),
])
def test_config_validation_names_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **{field: value})


def test_config_accepts_lists_and_dtype_names():
  cfg = disc_lib.DiscriminatorConfig(channel_mult=[1, 2], blur_kernel=[1, 1],
                                     dtype='bfloat16')
  assert cfg.channel_mult == (1, 2) and cfg.blur_kernel == (1, 1)
  assert cfg.dtype == jnp.bfloat16 and cfg.downsample_factor == 4
  hash(cfg)


def test_hinge_training_separates_real_from_fake():
  model = _build(seed=1)
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  real = jnp.full((4, 16, 16, 3), 0.5)
  fake = jnp.full((4, 16, 16, 3), -0.5)

  def loss_fn(model):
    real_logits, fake_logits = model(real), model(fake)
    loss = adversarial.discriminator_loss(real_logits, fake_logits, 'hinge')
    return loss, (real_logits, fake_logits)

  @nnx.jit
  def step(model, opt):
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return loss, logits

  first, _ = step(model, opt)
  for _ in range(14):
    loss, (real_logits, fake_logits) = step(model, opt)
  assert float(loss) < 0.5 * float(first), (float(first), float(loss))
  assert float(jnp.min(real_logits)) > float(jnp.max(fake_logits))
