"""Muse's training objective: random masking and the masked-token loss.

Per example a masking rate r = cos(pi/2 * u), u ~ U(0, 1) is drawn (the
truncated arccos density of P§2.6, mean 0.64), that fraction of the image
tokens (at least one) is replaced by [MASK], and cross-entropy is taken on
the masked positions only. The same cosine curve, read as a function of the
decoding progress, is the sampler's re-masking schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCHEDULES = ("cosine", "linear", "square")


def mask_ratio(progress: jax.Array, method: str = "cosine") -> jax.Array:
  """Fraction of tokens still masked at `progress` in [0, 1]."""
  progress = jnp.clip(progress, 0.0, 1.0)
  if method == "cosine":
    return jnp.maximum(jnp.cos(0.5 * jnp.pi * progress), 0.0)
  if method == "linear":
    return 1.0 - progress
  if method == "square":
    return 1.0 - progress**2
  raise ValueError(f"unknown mask schedule {method!r}; expected {SCHEDULES}")


def random_mask(
    rng: jax.Array,
    tokens: jax.Array,
    mask_token_id: int,
    method: str = "cosine",
) -> tuple[jax.Array, jax.Array]:
  """Masks a schedule-drawn fraction of each row of `tokens` [B, N].

  Returns (inputs with [MASK] at masked positions, boolean mask [B, N]).
  """
  batch, n = tokens.shape
  rate_rng, pos_rng = jax.random.split(rng)
  u = jax.random.uniform(rate_rng, (batch,))
  num_masked = jnp.clip(jnp.ceil(mask_ratio(u, method) * n), 1, n)
  # The positions with the num_masked smallest random scores get masked.
  scores = jax.random.uniform(pos_rng, (batch, n))
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  mask = ranks < num_masked[:, None]
  return jnp.where(mask, mask_token_id, tokens), mask


def masked_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy over masked positions, in float32."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_token = -jnp.sum(onehot * log_probs, axis=-1)
  weights = mask.astype(jnp.float32)
  denom = jnp.maximum(weights.sum(), 1.0)
  loss = jnp.sum(per_token * weights) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * weights) / denom
  return loss, accuracy


def drop_text(rng: jax.Array, text_mask: jax.Array, rate: float) -> jax.Array:
  """Drops the caption of a `rate` fraction of examples (for guidance).

  A dropped caption has an all-False key mask, so cross-attention contributes
  nothing: exactly the unconditional input the sampler uses.
  """
  keep = jax.random.uniform(rng, (text_mask.shape[0],)) >= rate
  return text_mask & keep[:, None]
