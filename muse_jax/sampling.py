"""Muse's iterative parallel decoding (P§2.8), one compiled program.

Algorithm, for T steps (24 base / 8 super-res in the paper):
1. Start from all-[MASK] tokens, or from given tokens with [MASK] where the
   image is unknown (inpainting/outpainting are generation with some tokens
   fixed).
2. Step k (progress p = (k+1)/T): one batched forward over [cond; uncond]
   gives logits; guided logits l = (1+t)*l_c - t*l_u, with t ramped linearly
   from 0 to `guidance_scale` (or constant). A negative prompt replaces l_u.
   (The output projection is affine, so the features are guided and
   projected once: the same logits at half the projection's cost.)
3. Sample a token for every masked position (temperature, optional top-k),
   by inverse CDF with one uniform per position.
4. Confidence = log p(sampled) + tau*(1-p)*Gumbel (MaskGIT's annealed choice
   noise), with p the untempered guided distribution (before temperature
   and top-k, as MaskGIT; `confidence="tempered"` takes the sampling
   distribution instead); tokens already known have infinite confidence.
5. Re-mask the n = floor(U * cos(pi/2 * p)) least confident (U = tokens
   unknown at the start), clamped to [1, unknown now - 1]; the last step
   re-masks nothing, so every token is fixed.

The guidance pair comes from the conditioning context
(`conditioning.Context.guidance_pair`): its keys/values are computed once
per request (for text alone the unconditional half attends nothing, so it
needs none and skips cross-attention); the loop is a `lax.fori_loop`, so
the whole decode is a single XLA program.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from muse_jax import masking
from muse_jax.models import conditioning
from muse_jax.models.transformer import MaskedTransformer

GUIDANCE_SCHEDULES = ("constant", "linear")
CONFIDENCES = ("untempered", "tempered")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Decoding hyperparameters (all static: part of the compiled program)."""

  num_steps: int = 24
  schedule: str = "cosine"
  guidance_scale: float = 3.0
  guidance_schedule: str = "linear"
  temperature: float = 1.0
  choice_temperature: float = 4.5
  top_k: int = 0  # 0 = sample from the full distribution.
  confidence: str = "untempered"

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"SamplerConfig.num_steps must be >= 1, "
                       f"got {self.num_steps}")
    if self.guidance_schedule not in GUIDANCE_SCHEDULES:
      raise ValueError(f"SamplerConfig.guidance_schedule="
                       f"{self.guidance_schedule!r} not in "
                       f"{GUIDANCE_SCHEDULES}")
    if self.schedule not in masking.SCHEDULES:
      raise ValueError(f"SamplerConfig.schedule={self.schedule!r} not in "
                       f"{masking.SCHEDULES}")
    if self.temperature <= 0:
      raise ValueError("SamplerConfig.temperature must be > 0")
    if self.top_k < 0:
      raise ValueError(f"SamplerConfig.top_k must be >= 0, got {self.top_k}")
    if self.guidance_scale < 0:
      raise ValueError(f"SamplerConfig.guidance_scale must be >= 0, got "
                       f"{self.guidance_scale}")
    if self.choice_temperature < 0:
      raise ValueError(f"SamplerConfig.choice_temperature must be >= 0, got "
                       f"{self.choice_temperature}")
    if self.confidence not in CONFIDENCES:
      raise ValueError(f"SamplerConfig.confidence={self.confidence!r} not in "
                       f"{CONFIDENCES}")

  def check_codebook(self, codebook_size: int) -> None:
    """Raises ValueError if `top_k` exceeds the model's codebook."""
    if self.top_k > codebook_size:
      raise ValueError(f"SamplerConfig.top_k={self.top_k} exceeds the "
                       f"codebook size {codebook_size}")

  def guided(self, negative: bool = False) -> bool:
    """Whether each forward runs the [cond; uncond] pair (batch 2B)."""
    return self.guidance_scale != 0 or negative


def guidance_at(cfg: SamplerConfig, progress: jax.Array) -> jax.Array:
  if cfg.guidance_schedule == "linear":
    return cfg.guidance_scale * progress
  return jnp.asarray(cfg.guidance_scale, jnp.float32)


def guidance_kv(model: MaskedTransformer, cfg: SamplerConfig,
                condition: conditioning.Text,
                negative: conditioning.Text | None = None):
  """The context keys/values every decoding forward sees.

  Guided decoding runs one forward over the context's guidance pair
  (batch 2B): the conditional rows, then the unconditional ones, or the
  negative prompt's. Unguided decoding runs the conditional rows alone.
  """
  context = model.context(condition)
  if cfg.guided(negative is not None):
    neg = None if negative is None else model.context(negative)
    context = context.guidance_pair(neg)
  return model.context_kv(context)


def _top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def _num_blocks(vocab: int) -> int:
  """The largest divisor of `vocab` not above its square root."""
  for g in range(math.isqrt(vocab), 0, -1):
    if vocab % g == 0:
      return g
  return 1


def _last_positive(x: jax.Array) -> jax.Array:
  """Index of the last entry > 0 along the last axis."""
  return x.shape[-1] - 1 - jnp.argmax(x[..., ::-1] > 0, axis=-1)


def sample_categorical(rng: jax.Array, logits: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """One draw per position from softmax(logits) [..., V], and its log-prob.

  Inverse-CDF sampling with one uniform per position, in two levels: the
  vocabulary is cut into G blocks (G ~ sqrt(V)); a block is chosen from the
  cumulative block masses, then a token from the cumulative masses inside
  it. Exactly the categorical distribution (`jax.random.categorical`'s
  Gumbel-max draws V random numbers per position instead, which at V = 8192
  costs more than the rest of a decoding step together), and every pass
  over the [..., V] logits is a cheap elementwise one or a reduction.

  Returns (int32 ids [...], float32 log-probabilities [...]).
  """
  vocab = logits.shape[-1]
  g = _num_blocks(vocab)
  width = vocab // g
  top = jnp.max(logits, axis=-1, keepdims=True)
  mass = jnp.exp(logits - top).reshape(*logits.shape[:-1], g, width)
  block_mass = jnp.sum(mass, axis=-1)
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  total = block_cdf[..., -1]
  u = jax.random.uniform(rng, logits.shape[:-1]) * total
  # The first block whose cumulative mass exceeds u, then the first token
  # in it; rounding can carry u past the end, so both are clamped to the
  # last entry with mass (top-k leaves most of them empty).
  block = jnp.minimum(jnp.sum(block_cdf <= u[..., None], axis=-1),
                      _last_positive(block_mass))
  pick = lambda a, i: jnp.take_along_axis(a, i[..., None], axis=-1)[..., 0]
  before = pick(block_cdf, block) - pick(block_mass, block)
  inner = jnp.take_along_axis(mass, block[..., None, None], axis=-2)[..., 0, :]
  inner_cdf = jnp.cumsum(inner, axis=-1) + before[..., None]
  offset = jnp.minimum(jnp.sum(inner_cdf <= u[..., None], axis=-1),
                       _last_positive(inner))
  ids = block * width + offset
  log_prob = pick(logits, ids) - top[..., 0] - jnp.log(total)
  return ids.astype(jnp.int32), log_prob


@functools.partial(jax.jit, static_argnames=("cfg",))
def sample(
    model: MaskedTransformer,
    rng: jax.Array,
    condition: conditioning.Text,
    *,
    cfg: SamplerConfig,
    init_tokens: jax.Array | None = None,
    negative: conditioning.Text | None = None,
) -> jax.Array:
  """Decodes image tokens [B, N] for the given condition.

  Args:
    model: the masked transformer.
    rng: PRNG key; the same key gives the same images.
    condition: the raw condition (text embeddings [B, L, D] and mask).
    cfg: decoding hyperparameters.
    init_tokens: optional [B, N] tokens with the mask id where unknown; known
      tokens are kept unchanged.
    negative: optional negative prompt (same shapes as `condition`)
      replacing the unconditional logits.

  Returns:
    int32 [B, N] tokens, none of them the mask id.
  """
  mcfg = model.cfg
  cfg.check_codebook(mcfg.codebook_size)
  mask_id = mcfg.mask_token_id
  batch = condition.batch_size
  if init_tokens is None:
    tokens = jnp.full((batch, mcfg.seq_len), mask_id, jnp.int32)
  else:
    tokens = init_tokens.astype(jnp.int32)
  use_guidance = cfg.guided(negative is not None)
  kv = guidance_kv(model, cfg, condition, negative)

  unknown_at_start = jnp.sum(tokens == mask_id, axis=-1)
  steps = cfg.num_steps

  def step(k, carry):
    tokens, rng = carry
    rng, sample_rng, choice_rng = jax.random.split(rng, 3)
    progress = (k + 1) / steps
    inputs = jnp.concatenate([tokens, tokens]) if use_guidance else tokens
    features = model.features(inputs, kv)
    if use_guidance:
      # Logits are affine in the features: guide them, then project once.
      cond, uncond = jnp.split(features.astype(jnp.float32), 2, axis=0)
      t = guidance_at(cfg, progress)
      features = (1.0 + t) * cond - t * uncond
    logits = model.head_logits(features)
    tempered = logits / cfg.temperature
    if cfg.top_k:
      tempered = _top_k_filter(tempered, cfg.top_k)
    is_masked = tokens == mask_id
    sampled, log_prob = sample_categorical(sample_rng, tempered)
    if cfg.confidence == "untempered":
      log_prob = (jnp.take_along_axis(logits, sampled[..., None], axis=-1)
                  [..., 0] - jax.nn.logsumexp(logits, axis=-1))
    sampled = jnp.where(is_masked, sampled, tokens)
    noise = jax.random.gumbel(choice_rng, log_prob.shape)
    confidence = log_prob + cfg.choice_temperature * (1.0 - progress) * noise
    confidence = jnp.where(is_masked, confidence, jnp.inf)
    # How many of the still-unknown tokens go back to [MASK].
    masked_now = jnp.sum(is_masked, axis=-1)
    # The epsilon keeps float32 rounding from flooring an exact integer down.
    n = jnp.floor(unknown_at_start * masking.mask_ratio(
        progress, cfg.schedule) + 1e-4).astype(jnp.int32)
    n = jnp.clip(n, 1, masked_now - 1)
    n = jnp.where(k == steps - 1, 0, jnp.maximum(n, 0))
    cutoff = jnp.take_along_axis(
        jnp.sort(confidence, axis=-1), n[:, None], axis=-1)
    remask = confidence < cutoff
    return jnp.where(remask, mask_id, sampled), rng

  tokens, _ = jax.lax.fori_loop(0, steps, step, (tokens, rng))
  return tokens
