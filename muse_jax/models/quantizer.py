"""Vector quantizer of the VQ tokenizers: nearest-code lookup and its losses.

Two lookups (`QuantizerConfig.kind`):

* ``"euclidean"``: plain nearest neighbour in the latent space, as VQGAN,
  MaskGIT and diffusers' ``VQModel`` do (and so what their checkpoints need).
* ``"l2_normalized"``: the factorized, l2-normalized codes of ViT-VQGAN
  (arXiv 2110.04627): latents and codes are projected onto the unit sphere
  and the lookup is a cosine-similarity nearest neighbour. With a small
  ``code_dim`` (4-8) it converges quickly from scratch.

Both use a straight-through estimator and the VQ-VAE codebook (codes pulled
toward the encoder outputs) and commitment (encoder pulled toward its code)
losses. An optional entropy regularizer on soft assignments (MaskGIT's and
MAGVIT-v2's) asks each latent to pick one code confidently while the batch
as a whole spreads over the codebook, which gives unused codes a gradient.

Dead codes are also restarted (``restart_threshold > 0``): the quantizer
keeps an exponential moving average of how often each code is picked (a
`CodeUsage` variable, checkpointed with the model and never trained), and
`restart_dead_codes` moves every code whose average falls below the
threshold onto a randomly chosen encoder output of the current batch
(Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream). The
training task calls it after the optimizer step.

Distances, losses and statistics are float32 whatever the compute dtype: a
nearest-code search over near-ties in bfloat16 makes assignments noisy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

KINDS = ('l2_normalized', 'euclidean')
CODEBOOK_AXES = ('codebook', 'code_dim')


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """The quantizer's lookup, losses and dead-code remedy.

  Attributes:
    codebook_size: Number of codes (the image-token vocabulary).
    code_dim: Dimension of each code.
    kind: ``"l2_normalized"`` or ``"euclidean"`` (see the module docstring).
    commitment_cost: Weight of the commitment loss (VQ-VAE's beta).
    codebook_cost: Weight of the codebook loss.
    entropy_weight: Weight of the entropy regularizer (0 disables it).
    entropy_temperature: Softmax temperature over negative distances
      (cosine similarities for ``l2_normalized``) for the regularizer.
    restart_threshold: Codes whose moving-average count per batch falls
      below this are restarted from encoder outputs (0 disables restarts).
    usage_decay: Decay of that moving average.
    param_dtype: Storage dtype of the codebook.
  """

  codebook_size: int = 8192
  code_dim: int = 32
  kind: str = 'l2_normalized'
  commitment_cost: float = 0.25
  codebook_cost: float = 1.0
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.05
  restart_threshold: float = 0.0
  usage_decay: float = 0.99
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'quantizer kind {self.kind!r} is not one of {KINDS}')
    if not isinstance(self.codebook_size, int) or self.codebook_size < 2:
      raise ValueError('codebook_size must be an int >= 2, got '
                       f'{self.codebook_size!r}')
    if not isinstance(self.code_dim, int) or self.code_dim < 1:
      raise ValueError(f'code_dim must be a positive int, got '
                       f'{self.code_dim!r}')
    for name in ('commitment_cost', 'codebook_cost', 'entropy_weight',
                 'restart_threshold'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)!r}')
    if self.entropy_temperature <= 0:
      raise ValueError('entropy_temperature must be > 0, got '
                       f'{self.entropy_temperature!r}')
    if not 0 <= self.usage_decay < 1:
      raise ValueError(f'usage_decay must be in [0, 1), got '
                       f'{self.usage_decay!r}')


class CodeUsage(nnx.Variable):
  """Moving average of per-code counts per batch: state, never trained."""


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis, keepdims=True) + eps)


class Quantizer(nnx.Module):
  """Latents [..., code_dim] -> (straight-through codes, indices, aux)."""

  def __init__(self, config: QuantizerConfig, rngs: nnx.Rngs):
    self.config = config
    if config.kind == 'l2_normalized':
      init = nnx.initializers.normal(1.0)
    else:
      # Codes on the scale of unit-variance latents.
      init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
    init = nnx.with_partitioning(init, CODEBOOK_AXES)
    self.codebook = nnx.Param(
        init(rngs.params(), (config.codebook_size, config.code_dim),
             config.param_dtype))
    # Zero: with restarts on, the first step moves every code onto a latent
    # of the first batch, a data-dependent initialisation.
    self.usage = CodeUsage(
        jnp.zeros((config.codebook_size,), jnp.float32),
        out_sharding=('codebook',))

  def codes(self) -> Array:
    """The codebook as looked up [codebook_size, code_dim], float32."""
    codes = self.codebook[...].astype(jnp.float32)
    if self.config.kind == 'l2_normalized':
      codes = l2_normalize(codes)
    return codes

  def project(self, z_e: Array) -> Array:
    """Latents in the lookup space, float32."""
    z = z_e.astype(jnp.float32)
    return l2_normalize(z) if self.config.kind == 'l2_normalized' else z

  def lookup(self, indices: Array) -> Array:
    """Codes for integer ``indices`` (any shape), float32."""
    return jnp.take(self.codes(), indices, axis=0)

  def logits(self, z: Array, codes: Array) -> Array:
    """Similarity of projected latents to every code: larger is nearer."""
    dot = jnp.einsum('...d,kd->...k', z, codes)
    if self.config.kind == 'l2_normalized':
      return dot
    # -|z - c|^2 up to the per-latent constant |z|^2.
    return 2.0 * dot - jnp.sum(jnp.square(codes), -1)

  def __call__(self, z_e: Array) -> tuple[Array, Array, dict[str, Array]]:
    """Quantizes ``z_e`` [..., code_dim].

    Returns the straight-through codes (float32, forward value = the
    nearest codes), int32 indices [...], and ``aux``: float32 scalars
    ``codebook_loss``, ``commitment_loss``, ``entropy_loss`` (unweighted,
    >= 0), ``perplexity`` and ``codebook_usage`` (fraction of codes used in
    the batch), ``code_counts`` [codebook_size], and ``latents``
    [N, code_dim] (the projected latents, gradient stopped, for restarts).
    """
    cfg = self.config
    z = self.project(z_e)
    codes = self.codes()
    sim = self.logits(z, codes)
    indices = jnp.argmax(sim, axis=-1).astype(jnp.int32)
    z_q = jnp.take(codes, indices, axis=0)
    codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(z_q)))
    z_st = z + jax.lax.stop_gradient(z_q - z)
    counts = jnp.zeros((cfg.codebook_size,), jnp.float32).at[
        indices.reshape(-1)].add(1.0)
    probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0))
    aux = {
        'codebook_loss': codebook_loss,
        'commitment_loss': commitment_loss,
        'perplexity': jnp.exp(entropy),
        'codebook_usage': jnp.mean((counts > 0).astype(jnp.float32)),
        'code_counts': counts,
        'latents': jax.lax.stop_gradient(z.reshape(-1, cfg.code_dim)),
    }
    if cfg.entropy_weight:
      aux['entropy_loss'] = entropy_loss(
          sim.reshape(-1, cfg.codebook_size), cfg.entropy_temperature)
    else:
      aux['entropy_loss'] = jnp.zeros((), jnp.float32)
    return z_st, indices, aux

  def loss(self, aux: dict[str, Array]) -> Array:
    """The weighted quantizer loss from ``aux``."""
    cfg = self.config
    total = (cfg.codebook_cost * aux['codebook_loss'] +
             cfg.commitment_cost * aux['commitment_loss'])
    if cfg.entropy_weight:
      total = total + cfg.entropy_weight * aux['entropy_loss']
    return total

  def restart_dead_codes(self, counts: Array, latents: Array,
                         rng: Array) -> Array:
    """Updates the usage average; moves dead codes onto batch latents.

    Args:
      counts: This batch's per-code counts [codebook_size].
      latents: This batch's projected latents [N, code_dim].
      rng: Key choosing which latents replace the dead codes.

    Returns:
      The number of codes restarted (float32 scalar).
    """
    cfg = self.config
    usage = cfg.usage_decay * self.usage[...] + (1 - cfg.usage_decay) * counts
    dead = usage < cfg.restart_threshold
    picks = jax.random.randint(rng, (cfg.codebook_size,), 0, latents.shape[0])
    # A little noise, so codes restarted from one latent separate.
    noise = 1e-3 * jax.random.normal(jax.random.fold_in(rng, 1),
                                     (cfg.codebook_size, cfg.code_dim))
    fresh = (latents[picks] + noise).astype(self.codebook[...].dtype)
    self.codebook[...] = jnp.where(dead[:, None], fresh, self.codebook[...])
    # A restarted code gets the threshold's grace before it can die again.
    self.usage[...] = jnp.where(dead, 1.0 + cfg.restart_threshold, usage)
    return jnp.sum(dead.astype(jnp.float32))


def entropy_loss(logits: Array, temperature: float) -> Array:
  """Per-latent entropy minus the entropy of the mean assignment (+ log K).

  ``logits`` [N, K] (larger = nearer). Low per-latent entropy asks each
  latent to pick one code; high entropy of the batch-mean assignment asks
  the batch to use many. Both terms are >= 0 (log K bounds the second).
  """
  k = logits.shape[-1]
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  p = jnp.exp(logp)
  per_sample = -jnp.mean(jnp.sum(p * logp, axis=-1))
  avg_p = jnp.mean(p, axis=0)
  batch = -jnp.sum(avg_p * jnp.log(avg_p + 1e-9))
  return per_sample + jnp.log(float(k)) - batch
