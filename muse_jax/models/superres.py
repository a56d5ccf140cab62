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

    @nnx.split_rngs(splits=lowres.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return EncoderBlock(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
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
    graphdef, state = nnx.split(self.blocks)

    def body(h, layer_state):
      return nnx.merge(graphdef, layer_state)(h), None

    if self.cfg.remat_policy != "none":
      body = jax.checkpoint(
          body, policy=transformer_lib.REMAT_POLICIES[self.cfg.remat_policy])
    if self.cfg.scan_layers:
      x, _ = jax.lax.scan(body, x, state)
    else:
      for i in range(self.lowres.depth):
        x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], state))
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

  def context(self, condition: conditioning.LowRes) -> conditioning.Context:
    """[low-res encoder output; projected text]: guidance drops the text."""
    if not isinstance(condition, conditioning.LowRes):
      raise TypeError(
          "the super-res model is conditioned on conditioning.LowRes(text, "
          f"low-res tokens), got {type(condition).__name__}")
    return conditioning.concat(self.lowres_encoder(condition.tokens),
                               self.conditioner(condition.text))
