"""Tests for the parameter EMA (muse_jax/training/ema.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from muse_jax import sharding
from muse_jax.training import ema as ema_lib

AXES = ('conv_in', 'conv_out')


def _linear(value, param_dtype=jnp.float32):
  """A 2 -> 3 Linear whose kernel and bias are all `value`."""
  init = nnx.initializers.constant(value)
  with nnx.use_eager_sharding(False):
    return nnx.Linear(
        2, 3, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(init, AXES),
        bias_init=nnx.with_partitioning(init, ('conv_out',)),
        rngs=nnx.Rngs(0))


def _kernel(state):
  return np.asarray(state['kernel'].get_value())


def test_init_is_a_float32_non_param_copy_with_metadata():
  model = _linear(1.5, param_dtype=jnp.bfloat16)
  ema = ema_lib.init(model)
  for var in jax.tree.leaves(ema, is_leaf=lambda v: isinstance(v,
                                                               nnx.Variable)):
    assert isinstance(var, ema_lib.EmaParam)
    assert not isinstance(var, nnx.Param)
    assert var.get_value().dtype == jnp.float32
  np.testing.assert_array_equal(_kernel(ema), np.full((2, 3), 1.5))
  assert ema['kernel'].get_metadata()['out_sharding'] == AXES
  assert ema['bias'].get_metadata()['out_sharding'] == ('conv_out',)


def test_update_math_is_pure_and_jittable():
  ema = ema_lib.init(_linear(1.0))
  params = nnx.state(_linear(3.0), nnx.Param)
  new = jax.jit(lambda e, p: ema_lib.update(e, p, 0.9))(ema, params)
  np.testing.assert_allclose(_kernel(new), 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(new['bias'].get_value(), 1.2, rtol=1e-6)
  np.testing.assert_array_equal(_kernel(ema), 1.0)  # Input untouched.
  assert isinstance(new['kernel'], ema_lib.EmaParam)
  assert new['kernel'].get_metadata()['out_sharding'] == AXES
  # Two more steps: the EMA of a constant target converges geometrically.
  for _ in range(2):
    new = ema_lib.update(new, params, 0.9)
  np.testing.assert_allclose(_kernel(new), 3.0 - 2.0 * 0.9 ** 3, rtol=1e-6)


def test_warmup_decay():
  np.testing.assert_allclose(ema_lib.decay_at(0.999), 0.999, rtol=1e-7)
  np.testing.assert_allclose(ema_lib.decay_at(0.999, 0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(ema_lib.decay_at(0.999, 10), 11 / 20, rtol=1e-6)
  np.testing.assert_allclose(ema_lib.decay_at(0.9, 1000), 0.9, rtol=1e-6)
  ema = ema_lib.init(_linear(1.0))
  params = _linear(3.0)
  # step 0: decay min(0.9, 1/10) = 0.1, so the EMA jumps to the weights.
  step = jax.jit(lambda e, p, s: ema_lib.update(e, p, 0.9, step=s))
  new = step(ema, nnx.state(params, nnx.Param), jnp.int32(0))
  np.testing.assert_allclose(_kernel(new), 0.1 * 1.0 + 0.9 * 3.0, rtol=1e-6)
  new = step(ema, nnx.state(params, nnx.Param), jnp.int32(100))
  np.testing.assert_allclose(_kernel(new), 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)


def test_bf16_params_average_in_float32():
  # A 0.1% step per update is below bf16 resolution near 1 but not float32's.
  ema = ema_lib.init(_linear(1.0, param_dtype=jnp.bfloat16))
  target = _linear(2.0, param_dtype=jnp.bfloat16)
  for _ in range(3):
    ema = ema_lib.update(ema, target, 0.999)
  np.testing.assert_allclose(_kernel(ema), 2.0 - 0.999 ** 3, rtol=1e-6)
  assert _kernel(ema).dtype == np.float32


def test_apply_returns_a_copy_with_ema_weights():
  model = _linear(1.0, param_dtype=jnp.bfloat16)
  ema = ema_lib.update(ema_lib.init(model), _linear(3.0), 0.5)  # 2.0
  ema_model = ema_lib.apply(model, ema)
  assert isinstance(ema_model.kernel, nnx.Param)
  assert ema_model.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ema_model.kernel[...], np.float32),
                                2.0)
  np.testing.assert_array_equal(np.asarray(model.kernel[...], np.float32),
                                1.0)
  x = jnp.ones((1, 2), jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(ema_model(x), np.float32), 6.0)
  # Still independent of the original afterwards.
  model.kernel[...] = jnp.zeros((2, 3), jnp.bfloat16)
  assert float(ema_model.kernel[0, 0]) == 2.0


def test_structure_mismatch_raises():
  ema = ema_lib.init(_linear(1.0))
  with nnx.use_eager_sharding(False):
    other = nnx.Linear(2, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='shape'):
    ema_lib.update(ema, other, 0.9)
  with nnx.use_eager_sharding(False):
    no_bias = nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='bias'):
    ema_lib.update(ema, no_bias, 0.9)


class _WithEma(nnx.Module):
  """A task part's module: the model plus its EMA."""

  def __init__(self, value=1.0, decay=0.5, warmup=False):
    self.model = _linear(value)
    self.ema = ema_lib.Ema(self.model, decay=decay, warmup=warmup)


def test_ema_module_rides_in_the_part_state():
  part = _WithEma()
  opt = nnx.Optimizer(part, optax.sgd(1.0), wrt=nnx.Param)
  # The optimizer (and gradients) see the model's parameters only.
  params = nnx.state(part, nnx.Param)
  assert set(params.keys()) == {'model'}
  assert 'ema' in nnx.state(part).keys()
  x = jnp.ones((1, 2))

  @nnx.jit
  def step(part, opt):
    grads = nnx.grad(lambda p: jnp.sum(p.model(x)), argnums=nnx.DiffState(
        0, nnx.Param))(part)
    opt.update(part, grads)
    part.ema.update(part.model, step=opt.step[...])

  step(part, opt)  # Weights 1 -> 0 (gradient 1, lr 1); EMA 0.5 * 1 + 0.5 * 0.
  np.testing.assert_allclose(part.model.kernel[...], 0.0, atol=1e-7)
  np.testing.assert_allclose(_kernel(part.ema.params), 0.5, rtol=1e-6)
  step(part, opt)  # Weights -1; EMA 0.5 * 0.5 + 0.5 * -1.
  np.testing.assert_allclose(_kernel(part.ema.params), -0.25, rtol=1e-6)
  np.testing.assert_allclose(part.ema.apply_to(part.model).kernel[...], -0.25,
                             rtol=1e-6)


def test_ema_module_warmup_and_validation():
  part = _WithEma(decay=0.9, warmup=True)
  part.ema.update(_linear(3.0), step=0)  # Decay 0.1 at step 0.
  np.testing.assert_allclose(_kernel(part.ema.params), 2.8, rtol=1e-6)
  with pytest.raises(ValueError, match='Ema.decay'):
    ema_lib.Ema(_linear(1.0), decay=1.0)


def test_ema_is_sharded_like_its_parameter():
  mesh = sharding.make_mesh([('data', 4), ('fsdp', 1), ('tensor', 2)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)

  def make():
    init = nnx.initializers.constant(1.0)
    model = nnx.Module()
    model.model = nnx.Linear(
        4, 6, kernel_init=nnx.with_partitioning(init, AXES),
        bias_init=nnx.with_partitioning(init, ('conv_out',)),
        rngs=nnx.Rngs(0))
    model.ema = ema_lib.Ema(model.model)
    return model

  part = sharding.create_sharded(make, mesh, rules)
  spec = part.model.kernel[...].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, 'tensor')
  assert part.ema.params['kernel'].get_value().sharding.spec == spec
  assert part.ema.params['bias'].get_value().sharding.spec == (
      part.model.bias[...].sharding.spec)
