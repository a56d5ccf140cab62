"""Tests for the conv VQ tokenizer (muse_jax/models/vqgan.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from muse_jax.models import vqgan
from muse_jax.tasks import vq as vq_task

# f = 2 ** 3 = 8 with the plain (patch 1) stem: 64 px -> 8 x 8 tokens.
TINY_F8 = vqgan.VQConfig(
    base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=(0, 1, 1, 1),
    codebook_size=64, code_dim=4, num_groups=4)
# f = 2 (patch) * 2 ** 3 = 16: 256 px -> 16 x 16 tokens.
TINY_F16 = vqgan.VQConfig(
    patch_size=2, base_channels=8, channel_mult=(1, 1, 2, 2),
    num_res_blocks=(0, 1, 1, 1), codebook_size=32, code_dim=4, num_groups=4,
    decoder_base_channels=16, decoder_num_res_blocks=1)
# A shallow f = 4 * 2 = 8 model (patchify stem) with a wider decoder, for the
# tests that differentiate: it keeps compile times low.
SMALL = vqgan.VQConfig(
    patch_size=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=(0, 1),
    codebook_size=32, code_dim=4, num_groups=4, entropy_weight=0.01,
    decoder_base_channels=16)

CONV_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')


def _build(cfg: vqgan.VQConfig, seed: int = 0) -> vqgan.VQModel:
  # 'rbg' keys: on XLA:CPU each threefry initializer shape takes seconds to
  # compile, which would dominate the runtime of these tests.
  with nnx.use_eager_sharding(False):
    return vqgan.VQModel(
        cfg, rngs=nnx.Rngs(jax.random.key(seed, impl='rbg')))


def _images(n: int, size: int, seed: int = 0) -> jax.Array:
  """Flat-coloured squares on a dark background, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  imgs = np.full((n, size, size, 3), -0.85, np.float32)
  for i in range(n):
    s = size // 4
    y, x = rng.integers(0, size - s, 2)
    imgs[i, y:y + s, x:x + s] = rng.uniform(-1, 1, 3)
  return jnp.asarray(imgs)


@nnx.jit
def _forward_all(model, x):
  """Every public entry point in one compiled call (eager is slow on CPU)."""
  z_e = model.encode(x)
  z_q, idx, qaux = model.quantize(z_e)
  recon, aux = model(x)
  ids = model.encode_to_indices(x)
  return dict(z_e=z_e, z_q=z_q, idx=idx, counts=qaux['code_counts'],
              recon=recon, call_idx=aux['indices'], ids=ids,
              decoded=model.decode_from_indices(ids),
              lookup=model.quantizer.lookup(idx))


@nnx.jit
def _loss_and_grads(model, x):
  return nnx.value_and_grad(vq_task.vq_loss, has_aux=True)(model, x)


@pytest.fixture(scope='module')
def f8_model():
  return _build(TINY_F8)


@pytest.fixture(scope='module')
def f16_model():
  return _build(TINY_F16)


@pytest.fixture(scope='module')
def f8_outputs(f8_model):
  return jax.tree.map(np.asarray, _forward_all(f8_model, _images(2, 64)))


@pytest.fixture(scope='module')
def f16_outputs(f16_model):
  return jax.tree.map(np.asarray, _forward_all(f16_model, _images(2, 256)))


@pytest.mark.parametrize('name,size,tokens', [('f8', 64, 8), ('f16', 256, 16)])
def test_shapes_and_dtypes(name, size, tokens, request):
  cfg = request.getfixturevalue(f'{name}_model').config
  out = request.getfixturevalue(f'{name}_outputs')
  assert cfg.downsample_factor == size // tokens
  x = _images(2, size)
  shape = (2, tokens, tokens)
  assert out['z_e'].shape == shape + (cfg.code_dim,)
  assert out['z_q'].shape == shape + (cfg.code_dim,)
  assert out['z_q'].dtype == jnp.float32
  for key in ('idx', 'call_idx', 'ids'):
    assert out[key].shape == shape and out[key].dtype == jnp.int32, key
  assert int(out['idx'].min()) >= 0
  assert int(out['idx'].max()) < cfg.codebook_size
  assert out['counts'].shape == (cfg.codebook_size,)
  for key in ('recon', 'decoded'):
    assert out[key].shape == x.shape and out[key].dtype == jnp.float32, key
    assert float(np.max(np.abs(out[key]))) <= 1.0, key


def test_decode_from_indices_matches_call(f8_outputs):
  out = f8_outputs
  np.testing.assert_array_equal(out['ids'], out['call_idx'])
  # Equal up to the rounding of the straight-through estimator z + (z_q - z).
  np.testing.assert_allclose(out['decoded'], out['recon'], atol=1e-5)


def test_quantized_codes_are_codebook_entries(f8_outputs):
  np.testing.assert_allclose(f8_outputs['z_q'], f8_outputs['lookup'],
                             atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(f8_outputs['z_q'], axis=-1), 1.0,
                             atol=1e-5)


def test_straight_through_gradient_reaches_encoder():
  # A pure reconstruction loss reaches the encoder only through the
  # straight-through estimator (argmax has no gradient).
  @nnx.jit
  def grads_fn(model, x):
    return nnx.grad(lambda m: jnp.mean(jnp.abs(m(x)[0] - x)))(model)

  grads = grads_fn(_build(SMALL), _images(2, 32))
  enc = jax.tree.leaves(nnx.state(grads.encoder, nnx.Param))
  assert enc and all(np.all(np.isfinite(g)) for g in enc)
  assert float(jnp.abs(grads.encoder.conv_in.kernel[...]).sum()) > 0
  assert float(jnp.abs(grads.decoder.conv_in.kernel[...]).sum()) > 0
  # The codebook is trained only by the codebook (and entropy) losses.
  assert float(jnp.abs(grads.quantizer.codebook[...]).sum()) == 0


def test_bf16_compute_keeps_f32_params_and_losses():
  cfg = dataclasses.replace(SMALL, dtype='bfloat16')  # Names are accepted.
  model = _build(cfg)
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  x = _images(2, 32)
  out = nnx.eval_shape(lambda m, x: (m.encode(x), m(x)), model, x)
  (z_e, (recon, aux)) = out
  assert z_e.dtype == jnp.bfloat16
  assert recon.dtype == jnp.float32
  assert aux['codebook_loss'].dtype == jnp.float32
  (loss, metrics), grads = _loss_and_grads(model, x)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  for name, value in metrics.items():
    assert value.dtype == jnp.float32, name
  assert float(metrics['entropy_loss']) >= 0
  for leaf in jax.tree.leaves(nnx.state(grads, nnx.Param)):
    assert leaf.dtype == jnp.float32


def test_params_carry_logical_axes(f8_model):
  allowed = set(CONV_AXES) | {'embed', 'codebook', 'code_dim'}
  params = nnx.state(f8_model, nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v,
                                                                nnx.Variable))
  assert leaves
  for var in leaves:
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var.ndim, var
    assert set(names) <= allowed, names
  assert f8_model.quantizer.codebook.get_metadata()['out_sharding'] == (
      'codebook', 'code_dim')
  assert (f8_model.encoder.conv_in.kernel.get_metadata()['out_sharding'] ==
          CONV_AXES)


def test_tiny_model_overfits_two_images():
  model = _build(SMALL)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  x = _images(2, 32, seed=3)

  @nnx.jit
  def step(model, opt, x):
    (loss, metrics), grads = nnx.value_and_grad(
        vq_task.vq_loss, has_aux=True)(model, x)
    opt.update(model, grads)
    return metrics

  first = step(model, opt, x)
  for _ in range(59):
    last = step(model, opt, x)
  assert float(last['recon_mse']) < 0.2 * float(first['recon_mse'])
  assert float(last['loss']) < 0.2 * float(first['loss'])


def test_decoder_only_finetuning_leaves_encoder_and_codebook():
  model = _build(SMALL, seed=1)
  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(np.asarray, before)
  opt = nnx.Optimizer(model, optax.sgd(0.1),
                      wrt=nnx.All(nnx.Param, nnx.PathContains('decoder')))
  x = _images(1, 32)

  @nnx.jit
  def step(model, opt, x):
    grads = nnx.grad(lambda m: vq_task.vq_loss(m, x)[0],
                     argnums=nnx.DiffState(0, opt.wrt))(model)
    opt.update(model, grads)

  step(model, opt, x)
  after = nnx.state(model, nnx.Param)
  np.testing.assert_array_equal(np.asarray(after['quantizer']['codebook']),
                                before['quantizer']['codebook'])
  np.testing.assert_array_equal(
      np.asarray(after['encoder']['conv_in']['kernel']),
      before['encoder']['conv_in']['kernel'])
  assert not np.array_equal(np.asarray(after['decoder']['conv_in']['kernel']),
                            before['decoder']['conv_in']['kernel'])


@pytest.mark.parametrize('field,value', [
    ('channel_mult', ()),
    ('codebook_size', 1),
    ('num_groups', 3),
    ('num_res_blocks', (1, 1)),
    ('decoder_channel_mult', (1, 2)),
    ('patch_size', 0),
    ('code_dim', 0),
    ('commitment_cost', -1.0),
])
def test_bad_config_raises_naming_field(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(TINY_F8, **{field: value})


def test_bad_image_shape_raises(f8_model):
  with pytest.raises(ValueError, match='multiple of'):
    f8_model.encode(jnp.zeros((1, 60, 60, 3)))


def test_local_encoder_codes_depend_only_on_the_own_patch():
  cfg = dataclasses.replace(SMALL, local_encoder=True)
  model = _build(cfg)
  x = np.array(_images(2, 32, seed=3))
  # Image b: same patch (1, 2) as image a, everything else different.
  b = np.array(_images(1, 32, seed=9))[0]
  b[8:16, 16:24] = x[0, 8:16, 16:24]
  x[1] = b
  z = np.asarray(nnx.jit(lambda m, v: m.encode(v))(model, jnp.asarray(x)))
  np.testing.assert_allclose(z[0, 1, 2], z[1, 1, 2], rtol=1e-5, atol=1e-6)
  assert not np.allclose(z[0], z[1])  # The other patches did change.
  # The default (3x3, GroupNorm) encoder mixes neighbourhoods and statistics.
  conv = _build(SMALL)
  z = np.asarray(nnx.jit(lambda m, v: m.encode(v))(conv, jnp.asarray(x)))
  assert not np.allclose(z[0, 1, 2], z[1, 1, 2], atol=1e-4)


@pytest.mark.parametrize('name,f,params_m', [
    ('muse-f16', 16, None), ('muse-f8', 8, None),
    ('muse-f16-decoder', 16, None), ('amused-f16', 16, None)])
def test_paper_variants_build_shape_first(name, f, params_m):
  cfg = vqgan.variant(name)
  assert cfg.downsample_factor == f
  assert cfg.codebook_size == 8192
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: vqgan.VQModel(cfg, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(
      nnx.state(model, nnx.Param)))
  dec = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(
      nnx.state(model.decoder, nnx.Param)))
  assert n > 20e6
  if name.endswith('-decoder'):
    # The fine-tuned decoder is the larger part (Muse Sec. 2.5).
    assert dec > 0.6 * n
  out = jax.eval_shape(lambda m, x: m(x), model,
                       jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert out[0].shape == (1, 256, 256, 3)
  assert out[1]['indices'].shape == (1, 256 // f, 256 // f)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match='muse-f32'):
    vqgan.variant('muse-f32')
