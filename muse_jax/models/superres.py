"""Muse's super-resolution transformer (P§2.4).

The super-res model is the base masked transformer over the high-res token
grid (`transformer.MaskedTransformer`: its blocks, head and sampler
interface are unchanged) with a second source of context: the low-res image
tokens pass through their own transformer encoder (`LowResEncoder`:
embedding, 2D positions, pre-LN self-attention + MLP blocks; 16 layers in
the paper), and its output is concatenated with the projected text
embeddings. The high-res tokens cross-attend to that concatenation.

Classifier-free guidance drops the text only: the low-res positions are
marked `keep_unconditional`, so the unconditional branch (training's 10%
text dropout, the sampler's guidance pair) still sees the low-res image.
The context is computed once per request; every decoding step reuses its
keys/values (`MaskedTransformer.context_kv`).

With `LowResConfig.aligned` the encoder's output is also projected,
upsampled onto the high-res grid and added to the high-res token
embeddings (`conditioning.Context.aligned`), so each high-res token starts
from the low-res token it refines; cross-attention to the context is
unchanged. Without it a small model trained briefly learns the low-res ->
high-res alignment poorly (shapes demo: sampled high-res images lost their
objects' positions), since both grids' positions are learned embeddings.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from muse_jax import sharding
from muse_jax.config_types import dtype_from_name
from muse_jax.models import conditioning
from muse_jax.models import layers
from muse_jax.models import transformer as transformer_lib


@dataclasses.dataclass(frozen=True)
class LowResConfig:
  """The low-res tokens the super-res model is conditioned on, and the
  depth of their encoder (its width, heads and MLP are the model's)."""

  codebook_size: int  # the base tokenizer's codebook.
  grid_size: int  # low-res tokens per side.
  depth: int = 16
  # Also add the encoder's output, projected and upsampled onto the
  # high-res grid, to the high-res token embeddings (`Context.aligned`):
  # each high-res token starts from the low-res token above it instead of
  # having to learn where that is through cross-attention.
  aligned: bool = False

  def __post_init__(self):
    for name in ("codebook_size", "grid_size", "depth"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"LowResConfig.{name} must be >= 1, got "
                         f"{getattr(self, name)}")

  @property
  def seq_len(self) -> int:
    return self.grid_size**2


class EncoderBlock(nnx.Module):
  """Pre-LN self-attention and MLP (no cross-attention)."""

  def __init__(self, cfg: transformer_lib.TransformerConfig, *,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype_from_name(cfg.dtype),
              param_dtype=dtype_from_name(cfg.param_dtype))
    d = cfg.width
    self.norm1 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.self_attn = layers.Attention(
        d, cfg.num_heads, rngs=rngs, impl=cfg.attention_impl,
        matmul_impl=cfg.matmul_impl, qk_norm=cfg.qk_norm == "all", **kw)
    self.norm2 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.mlp = layers.Mlp(d, cfg.mlp_dim, rngs=rngs, impl=cfg.matmul_impl,
                          **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))
    return sharding.constrain(x, ("batch", "length", "act_embed"))


class LowResEncoder(nnx.Module):
  """Low-res token ids [B, n] -> a `Context` [B, n, width] that guidance
  keeps (every position valid, `keep_unconditional` everywhere)."""

  def __init__(self, cfg: transformer_lib.TransformerConfig,
               lowres: LowResConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.lowres = lowres
    kw = dict(dtype=dtype_from_name(cfg.dtype),
              param_dtype=dtype_from_name(cfg.param_dtype))
    d = cfg.width
    self.token_embed = layers.Embed(lowres.codebook_size, d, rngs=rngs,
                                    table_axis=None, **kw)
    self.pos_embed = nnx.Param(
        nnx.with_partitioning(
            nnx.initializers.truncated_normal(stddev=0.02),
            ("positions", "embed"))(
                rngs.params(), (lowres.seq_len, d), kw["param_dtype"]))

    self.blocks = layers.stacked(lambda r: EncoderBlock(cfg, rngs=r),
                                 lowres.depth, rngs)
    self.final_norm = layers.LayerNorm(d, rngs=rngs, **kw)

  def __call__(self, tokens: jax.Array) -> conditioning.Context:
    if tokens.ndim != 2 or tokens.shape[-1] != self.lowres.seq_len:
      raise ValueError(
          f"low-res tokens have shape {tokens.shape}, the super-res model "
          f"expects [batch, {self.lowres.seq_len}] (a "
          f"{self.lowres.grid_size}x{self.lowres.grid_size} grid)")
    x = self.token_embed(tokens.astype(jnp.int32)) + self.pos_embed[
        ...].astype(self.token_embed.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    x = layers.apply_stacked(self.blocks, lambda block, h: block(h), x,
                             **self.cfg.stack_kwargs)
    x = self.final_norm(x)
    valid = jnp.ones(tokens.shape, bool)
    return conditioning.Context(x, valid, keep_unconditional=valid)


class SuperResTransformer(transformer_lib.MaskedTransformer):
  """The high-res masked transformer conditioned on `conditioning.LowRes`.

  `cfg` describes the high-res grid and codebook (the high-res tokenizer's);
  `lowres` the base tokenizer's grid and codebook. Sampling, guidance and
  the training objective are the base model's: only `context` differs.
  """

  def __init__(self, cfg: transformer_lib.TransformerConfig,
               lowres: LowResConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.lowres_cfg = lowres
    self.lowres_encoder = LowResEncoder(cfg, lowres, rngs=rngs)
    self.aligned_proj = nnx.data(None)
    if lowres.aligned:
      if cfg.grid_size % lowres.grid_size:
        raise ValueError(
            f"LowResConfig.aligned needs the high-res grid ({cfg.grid_size})"
            f" to be a multiple of the low-res grid ({lowres.grid_size})")
      self.aligned_proj = layers.Einsum(
          "bnd,de->bne", (cfg.width, cfg.width), ("mlp", "embed"),
          rngs=rngs, use_bias=True, impl=cfg.matmul_impl,
          dtype=dtype_from_name(cfg.dtype),
          param_dtype=dtype_from_name(cfg.param_dtype))

  def context(self, condition: conditioning.LowRes) -> conditioning.Context:
    """[low-res encoder output; projected text]: guidance drops the text."""
    if not isinstance(condition, conditioning.LowRes):
      raise TypeError(
          "the super-res model is conditioned on conditioning.LowRes(text, "
          f"low-res tokens), got {type(condition).__name__}")
    lowres = self.lowres_encoder(condition.tokens)
    context = conditioning.concat(lowres, self.conditioner(condition.text))
    if self.aligned_proj is None:
      return context
    g, f = self.lowres_cfg.grid_size, self.cfg.grid_size // (
        self.lowres_cfg.grid_size)
    x = self.aligned_proj(lowres.embeddings)
    b, _, d = x.shape
    x = x.reshape(b, g, 1, g, 1, d)
    x = jnp.broadcast_to(x, (b, g, f, g, f, d)).reshape(b, g * f * g * f, d)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    return context.replace(aligned=x)
