"""The masked-transformer task (Muse P§2.3, §2.4, §2.6): base and super-res.

Training data are pre-tokenized: VQ token ids of each image and either the
frozen text encoder's per-token embeddings of its caption (computed once,
so the text encoder never occupies training memory: Muse's way) or the
caption's token ids, which the frozen encoder, a frozen input of the step,
embeds on the fly (`text_encoder=`; for caption augmentation or datasets too
large to store embeddings for). The objective is Muse's: a
cosine-drawn fraction of tokens masked, cross-entropy on the masked tokens,
and the condition dropped for 10% of examples (`Context.drop`) to enable
classifier-free guidance. The super-res model (`lowres=`) trains on the same
objective over the high-res tokens, its batches also carrying the low-res
tokens of the same image, which the text dropout leaves in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from muse_jax import masking
from muse_jax.models import conditioning
from muse_jax.models import superres
from muse_jax.models.transformer import MaskedTransformer, TransformerConfig
from muse_jax.training import optimizer as optimizer_lib
from muse_jax.training import task as task_lib

PART = "transformer"
TEXT_ENCODER = "text_encoder"


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The masked-token objective's knobs."""

  schedule: str = "cosine"
  label_smoothing: float = 0.1
  text_dropout: float = 0.1
  loss_impl: str = "plain"  # or "fused" (masking.masked_cross_entropy).
  # Positions per output-projection + loss chunk (0 = all at once): the
  # super-res model's 4096 x 8192 logits never exist whole.
  loss_chunk: int = 0

  def __post_init__(self):
    if self.schedule not in masking.SCHEDULES:
      raise ValueError(f"ObjectiveConfig.schedule={self.schedule!r} not in "
                       f"{masking.SCHEDULES}")
    if not 0.0 <= self.text_dropout <= 1.0:
      raise ValueError("ObjectiveConfig.text_dropout must be in [0, 1]")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError("ObjectiveConfig.label_smoothing must be in [0, 1)")
    if self.loss_chunk < 0:
      raise ValueError("ObjectiveConfig.loss_chunk must be >= 0")
    if self.loss_impl not in masking.LOSS_IMPLS:
      raise ValueError(f"ObjectiveConfig.loss_impl={self.loss_impl!r} not in "
                       f"{masking.LOSS_IMPLS}")


def condition_of(batch: Any) -> conditioning.Text | conditioning.LowRes:
  """The condition of a batch {text_emb, text_mask[, lowres_tokens]}: the
  text, and for the super-res model the low-res image tokens too."""
  text = conditioning.Text(batch["text_emb"], batch["text_mask"])
  if "lowres_tokens" in batch:
    return conditioning.LowRes(text, batch["lowres_tokens"])
  return text


def loss_fn(model: MaskedTransformer, batch: Any, rng: jax.Array,
            objective: ObjectiveConfig):
  """Muse's masked-token loss of `batch` {tokens, text_emb, text_mask} (and
  `lowres_tokens` for the super-res model, whose low-res context survives
  the text dropout)."""
  mask_rng, drop_rng = jax.random.split(rng)
  tokens = batch["tokens"].astype(jnp.int32)
  inputs, mask = masking.random_mask(
      mask_rng, tokens, model.cfg.mask_token_id, objective.schedule)
  context = model.context(condition_of(batch))
  keep = jax.random.uniform(drop_rng, (tokens.shape[0],)) >= (
      objective.text_dropout)
  features = model.features(inputs, model.context_kv(context.drop(keep)))
  loss, accuracy = masking.chunked_masked_cross_entropy(
      model.head_logits, features, tokens, mask, objective.label_smoothing,
      objective.loss_impl, objective.loss_chunk)
  return loss, {"masked_accuracy": accuracy,
                "mask_rate": jnp.mean(mask.astype(jnp.float32))}


class MaskedTransformerTask(task_lib.Task):
  """One part, the (base or super-res) transformer, trained on the
  masked-token loss."""

  def __init__(self, model: TransformerConfig,
               optimizer: optimizer_lib.OptimizerConfig,
               objective: ObjectiveConfig, *, num_steps: int,
               seed: int = 0, text_encoder: nnx.Module | None = None,
               lowres: superres.LowResConfig | None = None):
    """`text_encoder`: a frozen `(ids, mask) -> embeddings` module
    (`TextEncoder.frozen_module`) for batches of {tokens, text_ids,
    text_mask}; None for batches that carry `text_emb`. `lowres`: train
    the super-res model (`models.superres`) on batches that also carry
    `lowres_tokens`."""
    if text_encoder is not None and text_encoder.dim != model.text_dim:
      raise ValueError(f"the text encoder's width {text_encoder.dim} != "
                       f"the transformer's text_dim {model.text_dim}")
    self.text_encoder = text_encoder
    self.lowres = lowres
    self.model_cfg = model
    self.optimizer_cfg = optimizer
    self.objective = objective
    self.num_steps = num_steps
    self.seed = seed

  def make_model(self) -> MaskedTransformer:
    if self.lowres is not None:
      return superres.SuperResTransformer(self.model_cfg, self.lowres,
                                          rngs=nnx.Rngs(self.seed))
    return MaskedTransformer(self.model_cfg, rngs=nnx.Rngs(self.seed))

  def parts(self) -> dict[str, task_lib.Part]:
    return {PART: task_lib.Part(self.make_model,
                                self.optimizer_cfg.make(self.num_steps))}

  def frozen(self) -> dict[str, nnx.Module]:
    return {} if self.text_encoder is None else {
        TEXT_ENCODER: self.text_encoder}

  def step(self, parts, frozen, batch, rng):
    if TEXT_ENCODER in frozen:
      batch = dict(batch, text_emb=frozen[TEXT_ENCODER](batch["text_ids"],
                                                       batch["text_mask"]))
    elif "text_emb" not in batch:
      raise ValueError("a batch without text_emb needs the task's "
                       "text_encoder (text embedded on the fly)")
    loss, metrics = parts[PART].minimize(loss_fn, batch, rng, self.objective)
    return dict(metrics, loss=loss)
