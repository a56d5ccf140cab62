"""Tests of the VQGAN tokenizer task (muse_jax/tasks/vq.py): generator and
discriminator with two optimizers, adaptive adversarial weight, dead-code
restarts, EMA, LPIPS as a frozen argument, and decoder fine-tuning."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from muse_jax.losses import adversarial
from muse_jax.losses import lpips as lpips_lib
from muse_jax.models import discriminator as disc_lib
from muse_jax.models import vqgan
from muse_jax.stages import tokenizer as tokenizer_stage
from muse_jax.tasks import vq as vq_task
from muse_jax.training import optimizer as optimizer_lib
from muse_jax.training import task as task_lib

CFG = vqgan.VQConfig(patch_size=4, base_channels=8, channel_mult=(1, 2),
                     num_res_blocks=(0, 1), codebook_size=32, code_dim=4,
                     num_groups=4)
DISC = disc_lib.DiscriminatorConfig(base_channels=4, channel_mult=(1, 2),
                                    max_channels=8)
OPT = optimizer_lib.OptimizerConfig(learning_rate=3e-3, weight_decay=0.0,
                                    grad_clip_norm=0.0)


def _images(n=4, size=32, seed=0):
  rng = np.random.default_rng(seed)
  x = np.full((n, size, size, 3), -0.8, np.float32)
  for i in range(n):
    s = size // 4
    y, z = rng.integers(0, size - s, 2)
    x[i, y:y + s, z:z + s] = rng.uniform(-1, 1, 3)
  return jnp.asarray(x)


class Runner:
  """A task's parts built unsharded, and its step jitted."""

  def __init__(self, task):
    self.task = task
    with nnx.use_eager_sharding(False):
      self.parts = {}
      for name, part in task.parts().items():
        model = part.make()
        self.parts[name] = (model, nnx.Optimizer(model, part.optimizer,
                                                 wrt=part.wrt))
      self.frozen = task.frozen()
    wrts = {n: p.wrt for n, p in task.parts().items()}

    @nnx.jit(static_argnums=(4,))
    def step(parts, frozen, images, rng, phase):
      trainables = {n: task_lib.Trainable(m, o, wrts[n])
                    for n, (m, o) in parts.items()}
      return task.step_for_phase(phase)(trainables, frozen,
                                        {'images': images}, rng)

    self._step = step

  def step(self, images, i=0):
    """Step `i` (its phase as the loop would pick it)."""
    with nnx.use_eager_sharding(False):
      return jax.tree.map(np.asarray, self._step(
          self.parts, self.frozen, images, jax.random.key(i),
          self.task.phase(i)))

  def model(self, name=vq_task.PART):
    return self.parts[name][0]


def _task(**kw):
  args = dict(num_steps=100, seed=0, discriminator=DISC,
              adversarial_cfg=adversarial.AdversarialConfig(
                  weight=0.1, start_step=1))
  args.update(kw)
  return vq_task.VQTask(kw.pop('model', CFG), OPT, **{
      k: v for k, v in args.items() if k != 'model'})


def _params(module):
  return [np.asarray(x).copy()
          for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def test_generator_and_discriminator_train_with_their_own_optimizers():
  r = Runner(_task())
  vq0, d0 = _params(r.model()), _params(r.model(vq_task.DISC))
  d_before = _params(r.model(vq_task.DISC))
  m0 = r.step(_images())
  # Delayed start: step 0 computes no adversarial term and leaves the
  # discriminator alone (phase 0 has none); from step 1 both train.
  assert r.task.phase(0) == 0 and r.task.phase(1) == 1
  assert 'adversarial_loss' not in m0 and 'disc/disc_loss' not in m0
  assert all(np.array_equal(a, b) for a, b in
             zip(d_before, _params(r.model(vq_task.DISC))))
  m1 = r.step(_images(), 1)
  assert float(m1['adversarial_loss']) != 0.0
  assert np.isfinite(float(m1['disc/disc_loss']))
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(a, b))
  assert changed(vq0, _params(r.model()))
  assert changed(d0, _params(r.model(vq_task.DISC)))
  assert 'vq/grad_norm' not in m1  # The loop adds norms; the task does not.
  for key in ('recon', 'code_counts', 'latents'):
    assert key not in m1  # Arrays are used, not logged.


def test_discriminator_learns_to_separate_real_from_reconstructions():
  r = Runner(_task())
  x = _images(8)
  first = r.step(x, 1)
  for i in range(2, 25):
    last = r.step(x, i)
  assert float(last['disc/logits_real']) > float(last['disc/logits_fake'])
  assert float(last['disc/disc_loss']) < float(first['disc/disc_loss'])


def test_adaptive_weight_balances_the_last_layer_gradients():
  task = _task(adversarial_cfg=adversarial.AdversarialConfig(
      weight=1.0, adaptive=True, start_step=0))
  assert task.phase(0) == 1
  r = Runner(task)
  x = _images()
  model, critic = r.model(), r.model(vq_task.DISC)
  last = nnx.All(nnx.Param, nnx.PathContains('decoder'),
                 nnx.PathContains('conv_out'))

  def grads(loss_fn):
    return nnx.grad(loss_fn, argnums=nnx.DiffState(0, last))(model)

  def nll(m):
    recon, aux = m(x)
    return jnp.mean(jnp.square(recon - x))

  def gan(m):
    return adversarial.generator_loss(critic.net(m(x)[0]), 'hinge')

  with nnx.use_eager_sharding(False):
    g_nll = jax.tree.leaves(nnx.state(grads(nll), nnx.Param))
    g_gan = jax.tree.leaves(nnx.state(grads(gan), nnx.Param))
  norm = lambda g: np.sqrt(sum(float(jnp.sum(v ** 2)) for v in g))
  want = norm(g_nll) / (norm(g_gan) + 1e-4)
  got = r.step(x)['adaptive_weight']
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_generator_gradient_equals_differentiating_through_the_critic():
  """The GAN term enters the loss via the critic's input gradient (one
  critic pass serves the update and the adaptive weight); its parameter
  gradient must equal the plain loss differentiated through the critic."""
  task = _task(adversarial_cfg=adversarial.AdversarialConfig(
      weight=0.5, adaptive=True, start_step=0))
  r = Runner(task)
  x = _images()
  model, critic = r.model(), r.model(vq_task.DISC)
  step = jnp.asarray(3, jnp.int32)

  def ours(m):
    return task.generator_loss(m, critic, None, x, step)

  def plain(m, scale):
    z_q, _, aux = m.quantize(m.encode(x))
    recon = vqgan.straight_through_clip(
        m.decoder(z_q).astype(jnp.float32))
    gan = adversarial.generator_loss(critic.net(recon), 'hinge')
    return (jnp.mean(jnp.square(recon - x)) + m.quantizer.loss(aux)
            + 0.5 * scale * gan)

  with nnx.use_eager_sharding(False):
    (loss, metrics), g_ours = nnx.value_and_grad(ours, has_aux=True)(model)
    scale = metrics['adaptive_weight']
    want_loss, g_plain = nnx.value_and_grad(plain)(model, scale)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(g_ours, nnx.Param)),
                  jax.tree.leaves(nnx.state(g_plain, nnx.Param))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)


def test_dead_code_restarts_raise_codebook_usage():
  x = _images(8, seed=3)

  def usage(threshold):
    model = dataclasses.replace(CFG, restart_threshold=threshold,
                                usage_decay=0.9)
    r = Runner(_task(model=model, adversarial_cfg=None))
    for i in range(30):
      m = r.step(x, i)
    ids = nnx.jit(lambda m, v: m.encode_to_indices(v))(r.model(), x)
    return len(np.unique(np.asarray(ids))), m

  plain, _ = usage(0.0)
  restarted, metrics = usage(0.5)
  assert 'restarted_codes' in metrics
  assert restarted > plain


def test_ema_part_follows_the_generator():
  r = Runner(_task(ema_decay=0.5, adversarial_cfg=None))
  before = _params(r.model(vq_task.EMA))
  for i in range(3):
    r.step(_images(), i)
  ema, gen = _params(r.model(vq_task.EMA)), _params(r.model())
  moved = [not np.array_equal(a, b) for a, b in zip(before, ema)]
  assert any(moved)
  # Between the start and the generator, not equal to either.
  assert any(not np.allclose(a, b) for a, b in zip(ema, gen))


def test_lpips_is_a_frozen_argument_and_adds_a_perceptual_term():
  with nnx.use_eager_sharding(False):
    net = lpips_lib.Lpips(rngs=nnx.Rngs(0))
  task = _task(adversarial_cfg=None, perceptual=net,
               loss=vq_task.LossConfig(l2_weight=1.0, perceptual_weight=0.5))
  assert set(task.frozen()) == {vq_task.LPIPS}
  r = Runner(task)
  lp0 = _params(net)
  m = r.step(_images())
  assert float(m['perceptual_loss']) > 0
  assert all(np.array_equal(a, b) for a, b in zip(lp0, _params(net)))


def test_perceptual_loss_is_off_with_a_message_without_vgg_weights(tmp_path):
  said = []
  t = ml_collections.ConfigDict(dict(
      loss=dict(perceptual_weight=0.1),
      perceptual=dict(vgg16_path=str(tmp_path / 'missing.pth'))))
  assert tokenizer_stage.perceptual_network(t, say=said.append) is None
  assert 'perceptual loss OFF' in said[0] and 'missing.pth' in said[0]


def test_decoder_finetuning_keeps_encoder_codebook_and_tokens():
  x = _images(8, seed=5)
  base = Runner(_task(adversarial_cfg=None))
  for i in range(10):
    base.step(x, i)
  trained = base.model()
  bigger = dataclasses.replace(CFG, decoder_base_channels=16,
                               decoder_num_res_blocks=2)
  r = Runner(_task(model=bigger, adversarial_cfg=None, train='decoder',
                   init_from=trained))
  enc0 = _params(trained.encoder) + _params(trained.quantizer)
  first = r.step(x)
  for i in range(1, 40):
    last = r.step(x, i)
  tuned = r.model()
  after = _params(tuned.encoder) + _params(tuned.quantizer)
  assert all(np.array_equal(a, b) for a, b in zip(enc0, after))
  ids = nnx.jit(lambda m, v: m.encode_to_indices(v))
  np.testing.assert_array_equal(np.asarray(ids(trained, x)),
                                np.asarray(ids(tuned, x)))
  assert float(last['recon_mse']) < 0.5 * float(first['recon_mse'])


def test_decoder_finetuning_rejects_a_changed_encoder():
  with nnx.use_eager_sharding(False):
    trained = vqgan.VQModel(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='code_dim'):
    _task(model=dataclasses.replace(CFG, code_dim=8), train='decoder',
          init_from=trained)
  with pytest.raises(ValueError, match='init_from'):
    _task(train='decoder')


def test_a_deeper_decoder_starts_as_the_trained_one():
  x = _images(4, seed=7)
  base = dataclasses.replace(CFG, decoder_num_res_blocks=1)
  with nnx.use_eager_sharding(False):
    trained = vqgan.VQModel(base,
                            rngs=nnx.Rngs(jax.random.key(1, impl='rbg')))
  deeper = dataclasses.replace(CFG, decoder_num_res_blocks=(2, 3))
  task = _task(model=deeper, adversarial_cfg=None, train='decoder',
               init_from=trained)
  with nnx.use_eager_sharding(False):
    grown = task.make_model()
  run = nnx.jit(lambda m, v: m(v)[0])
  assert len(grown.decoder.blocks) > len(trained.decoder.blocks)
  np.testing.assert_allclose(np.asarray(run(grown, x)),
                             np.asarray(run(trained, x)), atol=1e-6)
  wider = dataclasses.replace(base, decoder_base_channels=16)
  with nnx.use_eager_sharding(False):
    fresh = _task(model=wider, adversarial_cfg=None, train='decoder',
                  init_from=trained).make_model()
  assert not vq_task.grow_decoder(fresh, trained)
