"""Adversarial losses and regularizers for VQGAN tokenizer training.

The tokenizer (generator) and a discriminator
(``muse_jax.models.discriminator``) are trained in alternation: the
discriminator learns to tell real images from reconstructions, and the
tokenizer adds ``weight * generator_loss`` to its reconstruction objective.
Everything here is a pure float32 function of logits, images or gradient
pytrees, so it can sit inside ``nnx.value_and_grad`` (a task's
``Trainable.minimize``) and under ``jax.jit``:

* ``discriminator_loss`` / ``generator_loss``: the hinge loss (VQGAN,
  MaskGIT) or the non-saturating logistic loss (StyleGAN, MAGVIT).
* ``r1_penalty``: R1 gradient penalty on real images (Mescheder et al. 2018),
  ``E ||d sum(D(x)) / dx||^2``; ``lazy_r1_penalty`` evaluates it every
  ``every`` steps only, scaled by ``every`` (StyleGAN2's lazy
  regularization).
* ``lecam_penalty``: LeCAM regularization (Tseng et al. 2021), which anchors
  the discriminator's logits to running means of the other class's logits
  and keeps it from over-fitting small data sets; ``update_lecam_emas``
  advances those running means.
* ``adaptive_weight``: VQGAN's balance between the reconstruction and GAN
  gradients at the decoder's last layer.
* ``adversarial_weight_schedule``: the delayed start (the GAN loss is off
  until the tokenizer reconstructs reasonably).

``AdversarialConfig`` gathers the knobs of one run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
KINDS = ('hinge', 'non_saturating')
ADAPTIVE_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
  """Configuration of the adversarial part of tokenizer training.

  Attributes:
    weight: Weight of the generator's adversarial loss (after the delayed
      start, and times the adaptive weight when ``adaptive``).
    kind: 'hinge' or 'non_saturating' (both losses use the same kind).
    start_step: First step at which the generator's adversarial loss is on
      (the discriminator may train before it; the caller decides).
    adaptive: Scale the generator's adversarial loss by VQGAN's adaptive
      weight (``adaptive_weight``), which needs the gradients of both loss
      terms at the decoder's last layer.
    max_adaptive_weight: Upper clip of the adaptive weight.
    r1_weight: Weight of the R1 penalty in the discriminator loss (0 off).
      The penalty is ``E ||grad||^2`` without StyleGAN's 1/2, so StyleGAN's
      ``gamma`` corresponds to ``r1_weight = gamma / 2``.
    r1_every: Evaluate R1 every this many steps, scaled by this factor (lazy
      R1; 1 evaluates it every step).
    lecam_weight: Weight of the LeCAM penalty in the discriminator loss (0
      off).
    lecam_decay: Decay of LeCAM's running means of the logits.
  """

  weight: float = 0.1
  kind: str = 'hinge'
  start_step: int = 0
  adaptive: bool = False
  max_adaptive_weight: float = 1e4
  r1_weight: float = 0.0
  r1_every: int = 1
  lecam_weight: float = 0.0
  lecam_decay: float = 0.999

  def __post_init__(self):
    self.validate()

  @property
  def use_r1(self) -> bool:
    return self.r1_weight > 0

  @property
  def use_lecam(self) -> bool:
    return self.lecam_weight > 0

  def validate(self) -> None:
    """Raises ValueError, naming the field, for an inconsistent config."""
    def number(name: str) -> float:
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(
            f'AdversarialConfig.{name} must be a number, got {value!r}')
      return value

    def integer(name: str, low: int) -> None:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f'AdversarialConfig.{name} must be an int >= {low}, '
                         f'got {value!r}')

    for name in ('weight', 'r1_weight', 'lecam_weight'):
      if number(name) < 0:
        raise ValueError(f'AdversarialConfig.{name} must be >= 0, got '
                         f'{getattr(self, name)!r}')
    if self.kind not in KINDS:
      raise ValueError(f'AdversarialConfig.kind must be one of {KINDS}, got '
                       f'{self.kind!r}')
    integer('start_step', 0)
    integer('r1_every', 1)
    if not isinstance(self.adaptive, bool):
      raise ValueError('AdversarialConfig.adaptive must be a bool, got '
                       f'{self.adaptive!r}')
    if number('max_adaptive_weight') <= 0:
      raise ValueError('AdversarialConfig.max_adaptive_weight must be > 0, '
                       f'got {self.max_adaptive_weight!r}')
    if not 0 <= number('lecam_decay') < 1:
      raise ValueError('AdversarialConfig.lecam_decay must be in [0, 1), got '
                       f'{self.lecam_decay!r}')


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f'unknown adversarial loss kind {kind!r}; expected one '
                     f'of {KINDS}')


def _f32(x: Any) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def discriminator_loss(real_logits: Array, fake_logits: Array,
                       kind: str = 'hinge') -> Array:
  """The discriminator's loss on real and fake logits, a float32 scalar.

  hinge: ``mean(relu(1 - real)) + mean(relu(1 + fake))``;
  non_saturating: ``mean(softplus(-real)) + mean(softplus(fake))``, i.e.
  the binary cross-entropy with real = 1, fake = 0.
  """
  _check_kind(kind)
  real, fake = _f32(real_logits), _f32(fake_logits)
  if kind == 'hinge':
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
  return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def generator_loss(fake_logits: Array, kind: str = 'hinge') -> Array:
  """The generator's adversarial loss on fake logits, a float32 scalar.

  hinge: ``-mean(fake)``; non_saturating: ``mean(softplus(-fake))``.
  """
  _check_kind(kind)
  fake = _f32(fake_logits)
  if kind == 'hinge':
    return -jnp.mean(fake)
  return jnp.mean(jax.nn.softplus(-fake))


def r1_penalty(discriminator_fn: Callable[[Array], Array],
               real_images: Array) -> Array:
  """R1 penalty ``mean_b ||d sum(D(x)) / dx_b||^2`` on real images, float32.

  ``discriminator_fn`` maps images to per-image logits; it may close over a
  discriminator whose parameters an outer ``nnx.value_and_grad`` is
  differentiating (the penalty is then differentiated twice), e.g.
  ``r1_penalty(disc, images)`` inside the discriminator's loss. Each image's
  logit depends only on that image, so the gradient of the summed logits is
  every image's own input gradient.
  """
  x = _f32(real_images)
  grads = jax.grad(lambda x: jnp.sum(_f32(discriminator_fn(x))))(x)
  per_image = jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim)))
  return jnp.mean(per_image)


def lazy_r1_penalty(discriminator_fn: Callable[[Array], Array],
                    real_images: Array, step: Array, every: int) -> Array:
  """``every * r1_penalty`` on steps divisible by ``every``, else 0.

  The penalty is only computed on those steps (``lax.cond``), so the other
  steps skip its double backward pass; scaling by ``every`` keeps the
  average strength of the regularizer unchanged (StyleGAN2).
  """
  if every == 1:
    return r1_penalty(discriminator_fn, real_images)
  return jax.lax.cond(
      jnp.asarray(step) % every == 0,
      lambda x: every * r1_penalty(discriminator_fn, x),
      lambda x: jnp.zeros((), jnp.float32),
      real_images)


def lecam_penalty(real_logits: Array, fake_logits: Array, ema_real: Array,
                  ema_fake: Array) -> Array:
  """LeCAM regularization, a float32 scalar:
  ``mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)``.

  ``ema_real`` / ``ema_fake`` are running means of the discriminator's real
  and fake logits (``update_lecam_emas``); they are constants here (no
  gradient flows into them).
  """
  real, fake = _f32(real_logits), _f32(fake_logits)
  ema_real = jax.lax.stop_gradient(_f32(ema_real))
  ema_fake = jax.lax.stop_gradient(_f32(ema_fake))
  return (jnp.mean(jnp.square(jax.nn.relu(real - ema_fake))) +
          jnp.mean(jnp.square(jax.nn.relu(ema_real - fake))))


def update_lecam_emas(ema_real: Array, ema_fake: Array, real_logits: Array,
                      fake_logits: Array, decay: float
                      ) -> tuple[Array, Array]:
  """New ``(ema_real, ema_fake)``: ``decay * ema + (1 - decay) * mean(logits)``.

  Float32 and gradient-free; the caller carries them as state (e.g. two
  non-``nnx.Param`` variables of the discriminator part).
  """
  def ema(old, logits):
    new = jnp.mean(_f32(logits))
    return jax.lax.stop_gradient(decay * _f32(old) + (1.0 - decay) * new)

  return ema(ema_real, real_logits), ema(ema_fake, fake_logits)


def _global_norm(tree: Any) -> Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError('adaptive_weight needs non-empty gradient pytrees')
  return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(g))) for g in leaves))


def adaptive_weight(nll_grads: Any, gan_grads: Any,
                    max_weight: float = 1e4) -> Array:
  """VQGAN's adaptive GAN weight ``||g_nll|| / (||g_gan|| + 1e-4)``.

  ``nll_grads`` and ``gan_grads`` are the gradients of the reconstruction
  (+ perceptual) loss and of the generator's adversarial loss with respect
  to the same parameters, VQGAN uses the decoder's last layer; the caller
  chooses. The norms are global over each pytree. The result is clipped to
  ``[0, max_weight]`` and is a constant for differentiation
  (stop-gradient), a float32 scalar.
  """
  weight = _global_norm(nll_grads) / (_global_norm(gan_grads) + ADAPTIVE_EPS)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def adversarial_weight_schedule(step: Array, start_step: int,
                                weight: float) -> Array:
  """``weight`` from ``start_step`` on, 0 before; float32, traceable."""
  return jnp.where(jnp.asarray(step) >= start_step,
                   jnp.float32(weight), jnp.float32(0.0))
