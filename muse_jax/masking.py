"""Muse's training objective: random masking and the masked-token loss.

Per example a masking rate r = cos(pi/2 * u), u ~ U(0, 1) is drawn (the
truncated arccos density of P§2.6, mean 0.64), that fraction of the image
tokens (at least one) is replaced by [MASK], and cross-entropy is taken on
the masked positions only. The same cosine curve, read as a function of the
decoding progress, is the sampler's re-masking schedule.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

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


LOSS_IMPLS = ("plain", "fused")


def masked_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
    impl: str = "plain",
) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy over masked positions, in float32.

  The target distribution is (1 - s) * onehot + s / V (label smoothing s).
  `impl="plain"` is the textbook log-softmax; `"fused"` computes the same
  loss with its own one-pass backward (`_token_cross_entropy`), which the
  CPU benchmarks use. A position counts as correct when its target's logit
  is the largest (a tie for the largest counts too, which float logits
  make vanishingly rare).
  """
  if impl not in LOSS_IMPLS:
    raise ValueError(f"loss impl {impl!r} not in {LOSS_IMPLS}")
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.int32)
  if impl == "fused":
    per_token, hit = _token_cross_entropy(float(label_smoothing), logits,
                                          targets)
  else:
    per_token, hit = _plain_cross_entropy(float(label_smoothing), logits,
                                          targets)
  weights = mask.astype(jnp.float32)
  denom = jnp.maximum(weights.sum(), 1.0)
  loss = jnp.sum(per_token * weights) / denom
  accuracy = jnp.sum(hit.astype(jnp.float32) * weights) / denom
  return loss, accuracy


def chunked_masked_cross_entropy(
    head: Callable[[jax.Array], jax.Array],
    features: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
    impl: str = "plain",
    chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """`masked_cross_entropy(head(features), ...)` without all the logits.

  The output projection `head` ([B, n, D] -> [B, n, V] logits) and the
  loss run over `chunk` positions at a time, each chunk rematerialised in
  the backward pass, so at most one chunk's [B, chunk, V] logits are alive:
  the super-res model's 4096 x 8192 logits per image would otherwise be
  the largest tensor of its step. `chunk` must divide the sequence length;
  0 (or the whole length) is the plain call.
  """
  n = features.shape[1]
  if not chunk or chunk >= n:
    return masked_cross_entropy(head(features), targets, mask,
                                label_smoothing, impl)
  if n % chunk:
    raise ValueError(f"loss chunk {chunk} does not divide the sequence "
                     f"length {n}")
  if impl not in LOSS_IMPLS:
    raise ValueError(f"loss impl {impl!r} not in {LOSS_IMPLS}")
  per_token_fn = (_token_cross_entropy if impl == "fused"
                  else _plain_cross_entropy)
  weights = mask.astype(jnp.float32)

  @jax.checkpoint
  def chunk_sums(xs):
    f, t, w = xs
    per_token, hit = per_token_fn(float(label_smoothing),
                                  head(f).astype(jnp.float32),
                                  t.astype(jnp.int32))
    return jnp.sum(per_token * w), jnp.sum(hit.astype(jnp.float32) * w)

  def split(x):  # [B, n, ...] -> [n / chunk, B, chunk, ...]
    x = x.reshape(x.shape[0], n // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  loss_sums, hit_sums = jax.lax.map(
      chunk_sums, (split(features), split(targets), split(weights)))
  denom = jnp.maximum(weights.sum(), 1.0)
  return jnp.sum(loss_sums) / denom, jnp.sum(hit_sums) / denom


def _plain_cross_entropy(smoothing, logits, targets):
  """(per-token smoothed cross-entropy, target logit is the max)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_log_prob = jnp.take_along_axis(log_probs, targets[..., None],
                                        axis=-1)[..., 0]
  per_token = -(1.0 - smoothing) * target_log_prob
  if smoothing:
    per_token = per_token - smoothing * jnp.mean(log_probs, axis=-1)
  hit = target_log_prob >= jnp.max(log_probs, axis=-1)
  return per_token, hit


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_cross_entropy(smoothing, logits, targets):
  """(per-token smoothed cross-entropy, target logit is the max).

  -sum_c q_c log softmax(z)_c with q = (1 - s) onehot + s / V equals
  logsumexp(z) - (1 - s) z_target - s mean(z): no log-probabilities or
  one-hot over the codebook are materialised, and the gradient,
  softmax(z) - q, is one pass over the logits (autodiff takes several).
  """
  return _token_cross_entropy_fwd(smoothing, logits, targets)[0]


def _token_cross_entropy_fwd(smoothing, logits, targets):
  top = jnp.max(logits, axis=-1)
  log_norm = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]),
                                   axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None],
                                     axis=-1)[..., 0]
  per_token = log_norm - (1.0 - smoothing) * target_logit
  if smoothing:
    per_token = per_token - smoothing * jnp.mean(logits, axis=-1)
  hit = target_logit >= top
  return (per_token, hit), (logits, targets, log_norm)


def _token_cross_entropy_bwd(smoothing, residuals, cotangents):
  logits, targets, log_norm = residuals
  g, _ = cotangents
  classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape,
                                     logits.ndim - 1)
  target_weight = jnp.where(classes == targets[..., None],
                            1.0 - smoothing, 0.0)
  grad = (jnp.exp(logits - log_norm[..., None]) - target_weight
          - smoothing / logits.shape[-1]) * g[..., None]
  return grad, None


_token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)
