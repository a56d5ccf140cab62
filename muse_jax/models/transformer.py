"""Muse's masked image transformer (the base model, P§2.3).

Image tokens (codebook ids, plus one [MASK] id) are embedded, given learned 2D
positional embeddings and processed by pre-LN blocks of self-attention over
image tokens, cross-attention to the linearly projected text embeddings, and
an MLP. An MLP head turns each position into logits over the codebook.

Layers are stacked along a leading `layers` axis and applied with
`jax.lax.scan` (one compiled block: fast to compile, constant program size);
`scan_layers=False` unrolls them. `remat_policy` chooses what the backward
pass recomputes. The text keys/values of every layer can be computed once
(`text_kv`) and reused by every decoding step (`decode`).
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from muse_jax import sharding
from muse_jax.config_types import dtype_from_name
from muse_jax.models import layers

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes and numerics of a masked image transformer."""

  codebook_size: int
  grid_size: int  # image tokens per side; the sequence has grid_size**2.
  text_dim: int  # width of the frozen text encoder's embeddings.
  width: int = 512
  depth: int = 8
  num_heads: int = 8
  mlp_dim: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    for name in ("codebook_size", "grid_size", "text_dim", "width", "depth",
                 "num_heads", "mlp_dim"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"TransformerConfig.{name} must be >= 1, "
                         f"got {getattr(self, name)}")
    if self.width % self.num_heads:
      raise ValueError(f"TransformerConfig.width={self.width} is not "
                       f"divisible by num_heads={self.num_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"TransformerConfig.remat_policy={self.remat_policy!r}"
                       f" not in {sorted(REMAT_POLICIES)}")
    dtype_from_name(self.dtype)
    dtype_from_name(self.param_dtype)

  @property
  def mask_token_id(self) -> int:
    return self.codebook_size

  @property
  def seq_len(self) -> int:
    return self.grid_size**2


class Block(nnx.Module):
  """Pre-LN self-attention, cross-attention to text, and MLP."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=dtype_from_name(cfg.dtype),
              param_dtype=dtype_from_name(cfg.param_dtype))
    d = cfg.width
    self.norm1 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.self_attn = layers.Attention(d, cfg.num_heads, rngs=rngs, **kw)
    self.norm2 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.cross_attn = layers.Attention(d, cfg.num_heads, rngs=rngs, **kw)
    self.norm3 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.mlp = layers.Mlp(d, cfg.mlp_dim, rngs=rngs, **kw)

  def __call__(self, x, text_kv, text_mask, text_rows: int | None = None):
    x = x + self.self_attn(self.norm1(x))
    if text_rows is None or text_rows == x.shape[0]:
      x = x + self.cross_attn(self.norm2(x), mask=text_mask,
                              cached_kv=text_kv)
    else:  # Rows from text_rows on attend no text: a constant output.
      with_text = self.cross_attn(self.norm2(x[:text_rows]), mask=text_mask,
                                  cached_kv=text_kv)
      without = self.cross_attn.output_without_keys(
          (x.shape[0] - text_rows, *x.shape[1:]))
      x = x + jnp.concatenate([with_text, without.astype(with_text.dtype)])
    # The MLP sees [B*T, D]: XLA:CPU runs the norm-fused up-projection of a
    # 2-D operand markedly faster than of [B, T, D] (a bitcast, free).
    flat = x.reshape(-1, x.shape[-1])
    x = (flat + self.mlp(self.norm3(flat))).reshape(x.shape)
    return sharding.constrain(x, ("batch", "length", "act_embed"))


class MaskedTransformer(nnx.Module):
  """Predicts logits over the codebook for every image-token position."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=dtype_from_name(cfg.dtype),
              param_dtype=dtype_from_name(cfg.param_dtype))
    d = cfg.width
    # codebook_size + 1 rows rarely divide a mesh axis: rows stay unsharded.
    self.token_embed = layers.Embed(
        cfg.codebook_size + 1, d, rngs=rngs, table_axis=None, **kw)
    self.pos_embed = nnx.Param(
        nnx.with_partitioning(
            nnx.initializers.truncated_normal(stddev=0.02),
            ("positions", "embed"))(
                rngs.params(), (cfg.seq_len, d), kw["param_dtype"]))
    self.text_proj = layers.Einsum(
        "bld,de->ble", (cfg.text_dim, d), ("text_embed", "embed"), rngs=rngs,
        use_bias=True, **kw)
    self.text_norm = layers.LayerNorm(d, rngs=rngs, **kw)

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = layers.LayerNorm(d, rngs=rngs, **kw)
    # Muse's output head: an MLP from each embedding to codebook logits.
    self.head_dense = layers.Einsum(
        "btd,de->bte", (d, d), ("mlp", "embed"), rngs=rngs, use_bias=True,
        **kw)
    self.head_norm = layers.LayerNorm(d, rngs=rngs, **kw)
    self.head_out = layers.Einsum(
        "bte,ev->btv", (d, cfg.codebook_size), ("embed", "vocab"), rngs=rngs,
        use_bias=True, **kw)

  def _layer_states(self):
    return nnx.split(self.blocks)

  def text_kv(self, text_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-layer cross-attention keys and values [depth, B, H, L, K] each."""
    ctx = self.text_norm(self.text_proj(text_emb))
    ctx = sharding.constrain(ctx, ("batch", "text_length", "act_embed"))
    graphdef, state = self._layer_states()

    def kv(layer_state):
      return nnx.merge(graphdef, layer_state).cross_attn.kv(ctx)

    if self.cfg.scan_layers:
      return jax.lax.map(kv, state)
    outs = [kv(jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.cfg.depth)]
    return tuple(jnp.stack(parts) for parts in zip(*outs))

  def decode(self, tokens: jax.Array, text_kv, text_mask: jax.Array, *,
             text_rows: int | None = None) -> jax.Array:
    """Logits [B, N, codebook] (f32) given precomputed text keys/values."""
    return self.head_logits(self.decode_features(
        tokens, text_kv, text_mask, text_rows=text_rows))

  def decode_features(self, tokens: jax.Array, text_kv,
                      text_mask: jax.Array, *,
                      text_rows: int | None = None) -> jax.Array:
    """The output head's last hidden states [B, N, D], before `head_logits`.

    Logits are affine in these, so a guided sampler can mix the conditional
    and unconditional features and project once, at half the cost of
    projecting both onto the codebook. With `text_rows` = R only the first
    R rows of `tokens` have text (`text_kv`, `text_mask` have R rows); the
    others are unconditional, exactly as with an all-False text mask, and
    skip cross-attention (the sampler's [cond; uncond] batch).
    """
    if text_rows is not None and text_mask.shape[0] != text_rows:
      raise ValueError(f"text_rows={text_rows} but the text mask has "
                       f"{text_mask.shape[0]} rows")
    if tokens.shape[-1] != self.cfg.seq_len:
      raise ValueError(
          f"tokens have length {tokens.shape[-1]}, the model expects "
          f"{self.cfg.seq_len} (= grid_size**2)")
    x = self.token_embed(tokens) + self.pos_embed[...].astype(
        self.token_embed.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    graphdef, state = self._layer_states()

    def body(h, xs):
      layer_state, k, v = xs
      block = nnx.merge(graphdef, layer_state)
      return block(h, (k, v), text_mask, text_rows), None

    policy = REMAT_POLICIES[self.cfg.remat_policy]
    if self.cfg.remat_policy != "none":
      body = jax.checkpoint(body, policy=policy)
    keys, values = text_kv
    if self.cfg.scan_layers:
      x, _ = jax.lax.scan(body, x, (state, keys, values))
    else:
      for i in range(self.cfg.depth):
        xs = jax.tree.map(lambda a, i=i: a[i], (state, keys, values))
        x, _ = body(x, xs)
    x = self.final_norm(x)
    h = jax.nn.gelu(self.head_dense(x))
    return sharding.constrain(self.head_norm(h),
                              ("batch", "length", "act_embed"))

  def head_logits(self, features: jax.Array) -> jax.Array:
    """Logits [B, N, codebook] (f32): the affine map of `decode_features`."""
    logits = self.head_out(features).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jax.Array, text_emb: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    """Logits [B, N, codebook] for image `tokens` [B, N] given the text."""
    return self.decode(tokens, self.text_kv(text_emb), text_mask)
