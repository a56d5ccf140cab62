"""Trainer for Muse's masked image transformer (base stage).

Training data are pre-tokenized: VQ token ids of each image and the frozen
text encoder's per-token embeddings of its caption (computed once, so the
text encoder never occupies training memory). The objective is Muse's: a
cosine-drawn fraction of tokens masked, cross-entropy on the masked tokens,
and the caption dropped for 10% of examples to enable classifier-free
guidance.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from muse_jax import masking
from muse_jax.models.transformer import MaskedTransformer


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The masked-token objective's knobs."""

  schedule: str = "cosine"
  label_smoothing: float = 0.1
  text_dropout: float = 0.1

  def __post_init__(self):
    if self.schedule not in masking.SCHEDULES:
      raise ValueError(f"ObjectiveConfig.schedule={self.schedule!r} not in "
                       f"{masking.SCHEDULES}")
    if not 0.0 <= self.text_dropout <= 1.0:
      raise ValueError("ObjectiveConfig.text_dropout must be in [0, 1]")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError("ObjectiveConfig.label_smoothing must be in [0, 1)")


def make_loss_fn(objective: ObjectiveConfig):
  """loss_fn(model, batch, rng) for batches {tokens, text_emb, text_mask}."""

  def loss_fn(model: MaskedTransformer, batch: dict[str, Any],
              rng: jax.Array):
    mask_rng, drop_rng = jax.random.split(rng)
    tokens = batch["tokens"].astype(jnp.int32)
    inputs, mask = masking.random_mask(
        mask_rng, tokens, model.cfg.mask_token_id, objective.schedule)
    text_mask = masking.drop_text(
        drop_rng, batch["text_mask"].astype(bool), objective.text_dropout)
    logits = model(inputs, batch["text_emb"], text_mask)
    loss, accuracy = masking.masked_cross_entropy(
        logits, tokens, mask, objective.label_smoothing)
    return loss, {"masked_accuracy": accuracy,
                  "mask_rate": jnp.mean(mask.astype(jnp.float32))}

  return loss_fn
