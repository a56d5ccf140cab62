"""Muse's masked image transformer (the base model, P§2.3).

Image tokens (codebook ids, plus one [MASK] id) are embedded, given learned 2D
positional embeddings and processed by pre-LN blocks of self-attention over
image tokens, cross-attention to a conditioning context
(`muse_jax.models.conditioning`: for the base model, the linearly projected text
embeddings), and an MLP. An MLP head turns each position into logits over
the codebook.

Layers are stacked along a leading `layers` axis and applied with
`jax.lax.scan` (one compiled block: fast to compile, constant program size);
`scan_layers=False` unrolls them. `remat_policy` chooses what the backward
pass recomputes. The context's keys/values of every layer can be computed
once (`context_kv`) and reused by every decoding step (`logits`,
`features`). `attention_impl` / `matmul_impl` pick the plain JAX path
(default) or the XLA:CPU one (`muse_jax.models.layers`).
`self_attention="multi_axis"` replaces full self-attention over the image
tokens by multi-axis attention (`muse_jax.models.multi_axis`), whose memory
grows with the grid's area times `attention_window**2` rather than with its
area squared; the parameters are the same, so either runs a checkpoint.
"""

from __future__ import annotations

import dataclasses

import flax
from flax import nnx
import jax
import jax.numpy as jnp

from muse_jax.config_types import dtype_from_name
from muse_jax.models import conditioning
from muse_jax.models import layers
from muse_jax import sharding

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

QK_NORMS = ("none", "cross", "all")

SELF_ATTENTIONS = ("full", "multi_axis")


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
  attention_impl: str = "plain"
  matmul_impl: str = "plain"
  # QK-norm (layers.Attention): "none", "cross" (cross-attention only) or
  # "all" (self- and cross-attention).
  qk_norm: str = "none"
  # Image self-attention: "full", or "multi_axis" (muse_jax.models.
  # multi_axis: half the heads within attention_window**2 blocks of
  # neighbours, half within a dilated grid of as many tokens).
  self_attention: str = "full"
  attention_window: int = 8

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
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"TransformerConfig.qk_norm={self.qk_norm!r} not in "
                       f"{QK_NORMS}")
    if self.self_attention not in SELF_ATTENTIONS:
      raise ValueError(f"TransformerConfig.self_attention="
                       f"{self.self_attention!r} not in {SELF_ATTENTIONS}")
    if int(self.attention_window) < 1:
      raise ValueError(f"TransformerConfig.attention_window must be >= 1, "
                       f"got {self.attention_window}")
    if self.self_attention == "multi_axis":
      if self.grid_size % self.attention_window:
        raise ValueError(
            f"TransformerConfig.grid_size={self.grid_size} is not divisible "
            f"by attention_window={self.attention_window} "
            "(self_attention='multi_axis')")
      if self.num_heads % 2:
        raise ValueError(
            f"TransformerConfig.num_heads={self.num_heads} must be even for "
            "self_attention='multi_axis' (half the heads attend locally, "
            "half globally)")
    layers.check_impl("TransformerConfig.attention_impl", self.attention_impl)
    layers.check_impl("TransformerConfig.matmul_impl", self.matmul_impl)
    dtype_from_name(self.dtype)
    dtype_from_name(self.param_dtype)

  @property
  def mask_token_id(self) -> int:
    return self.codebook_size

  @property
  def seq_len(self) -> int:
    return self.grid_size**2

  @property
  def stack_kwargs(self) -> dict[str, object]:
    """How `layers.apply_stacked` runs this model's layer stacks."""
    return dict(scan=self.scan_layers, remat=self.remat_policy != "none",
                remat_policy=REMAT_POLICIES[self.remat_policy])

  @property
  def multi_axis(self) -> tuple[int, int, int] | None:
    """The image self-attention's `layers.Attention(multi_axis=...)`."""
    if self.self_attention != "multi_axis":
      return None
    return (self.grid_size, self.grid_size, self.attention_window)


@flax.struct.dataclass
class ContextKV:
  """A context's cross-attention keys and values for every layer.

  keys, values: [depth, B', ...] in the attention impl's layout; mask:
  [B', S]; `keyed_rows` as in `conditioning.Context` (B' = keyed_rows rows
  have keys, the batch's further rows attend nothing); `aligned` the
  context's features on the token grid ([B', N, D] or None), added to the
  token embeddings.
  """

  keys: jax.Array
  values: jax.Array
  mask: jax.Array
  keyed_rows: int | None = flax.struct.field(pytree_node=False, default=None)
  aligned: jax.Array | None = None


class Block(nnx.Module):
  """Pre-LN self-attention, cross-attention to the context, and MLP."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=dtype_from_name(cfg.dtype),
              param_dtype=dtype_from_name(cfg.param_dtype))
    attn_kw = dict(impl=cfg.attention_impl, matmul_impl=cfg.matmul_impl,
                   **kw)
    d = cfg.width
    # XLA:CPU runs the norm-fused up-projection of a 2-D [B*T, D] operand
    # markedly faster than of [B, T, D] (the reshape is free).
    self.flat_mlp = cfg.matmul_impl == "xla_cpu"
    self.norm1 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.self_attn = layers.Attention(d, cfg.num_heads, rngs=rngs,
                                      qk_norm=cfg.qk_norm == "all",
                                      multi_axis=cfg.multi_axis, **attn_kw)
    self.norm2 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.cross_attn = layers.Attention(d, cfg.num_heads, rngs=rngs,
                                       qk_norm=cfg.qk_norm != "none",
                                       **attn_kw)
    self.norm3 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.mlp = layers.Mlp(d, cfg.mlp_dim, rngs=rngs, impl=cfg.matmul_impl,
                          **kw)

  def cross(self, x, kv, mask, keyed_rows: int | None):
    """Cross-attention of `x` [B, T, D] to one layer's context keys/values."""
    if keyed_rows is None or keyed_rows == x.shape[0]:
      return self.cross_attn(x, mask=mask, cached_kv=kv)
    with_keys = self.cross_attn(x[:keyed_rows], mask=mask, cached_kv=kv)
    without = self.cross_attn.output_without_keys(
        (x.shape[0] - keyed_rows, *x.shape[1:]))
    return jnp.concatenate([with_keys, without.astype(with_keys.dtype)])

  def __call__(self, x, kv, mask, keyed_rows: int | None = None):
    x = x + self.self_attn(self.norm1(x))
    x = x + self.cross(self.norm2(x), kv, mask, keyed_rows)
    if self.flat_mlp:
      flat = x.reshape(-1, x.shape[-1])
      x = (flat + self.mlp(self.norm3(flat))).reshape(x.shape)
    else:
      x = x + self.mlp(self.norm3(x))
    return sharding.constrain(x, ("batch", "length", "act_embed"))


class MaskedTransformer(nnx.Module):
  """Predicts logits over the codebook for every image-token position."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=dtype_from_name(cfg.dtype),
              param_dtype=dtype_from_name(cfg.param_dtype))
    dense_kw = dict(impl=cfg.matmul_impl, **kw)
    d = cfg.width
    # codebook_size + 1 rows rarely divide a mesh axis: rows stay unsharded.
    self.token_embed = layers.Embed(
        cfg.codebook_size + 1, d, rngs=rngs, table_axis=None, **kw)
    self.pos_embed = nnx.Param(
        nnx.with_partitioning(
            nnx.initializers.truncated_normal(stddev=0.02),
            ("positions", "embed"))(
                rngs.params(), (cfg.seq_len, d), kw["param_dtype"]))
    self.conditioner = conditioning.TextConditioner(
        cfg.text_dim, d, rngs=rngs, matmul_impl=cfg.matmul_impl, **kw)

    self.blocks = layers.stacked(lambda r: Block(cfg, rngs=r), cfg.depth,
                                 rngs)
    self.final_norm = layers.LayerNorm(d, rngs=rngs, **kw)
    # Muse's output head: an MLP from each embedding to codebook logits.
    self.head_dense = layers.Einsum(
        "btd,de->bte", (d, d), ("mlp", "embed"), rngs=rngs, use_bias=True,
        **dense_kw)
    self.head_norm = layers.LayerNorm(d, rngs=rngs, **kw)
    self.head_out = layers.Einsum(
        "bte,ev->btv", (d, cfg.codebook_size), ("embed", "vocab"), rngs=rngs,
        use_bias=True, **dense_kw)

  def context(self, condition: conditioning.Text) -> conditioning.Context:
    """The conditioning context of raw condition inputs."""
    return self.conditioner(condition)

  def context_kv(self, context: conditioning.Context) -> ContextKV:
    """Every layer's cross-attention keys and values of `context`."""
    graphdef, state = nnx.split(self.blocks)

    def kv(layer_state):
      return nnx.merge(graphdef, layer_state).cross_attn.kv(
          context.embeddings)

    if self.cfg.scan_layers:
      keys, values = jax.lax.map(kv, state)
    else:
      outs = [kv(jax.tree.map(lambda a, i=i: a[i], state))
              for i in range(self.cfg.depth)]
      keys, values = (jnp.stack(parts) for parts in zip(*outs))
    return ContextKV(keys, values, context.mask, context.keyed_rows,
                     context.aligned)

  def features(self, tokens: jax.Array, kv: ContextKV) -> jax.Array:
    """The output head's last hidden states [B, N, D], before `head_logits`.

    Logits are affine in these, so a guided sampler can mix the conditional
    and unconditional features and project once, at half the cost of
    projecting both onto the codebook.
    """
    if tokens.shape[-1] != self.cfg.seq_len:
      raise ValueError(
          f"tokens have length {tokens.shape[-1]}, the model expects "
          f"{self.cfg.seq_len} (= grid_size**2)")
    rows = kv.mask.shape[0] * (2 if kv.keyed_rows is not None else 1)
    if tokens.shape[0] != rows:
      raise ValueError(f"{tokens.shape[0]} token rows but the context "
                       f"conditions {rows}")
    x = self.token_embed(tokens) + self.pos_embed[...].astype(
        self.token_embed.dtype)
    if kv.aligned is not None:
      aligned = kv.aligned.astype(x.dtype)
      if aligned.shape[0] != x.shape[0]:  # keyed_rows: both halves.
        aligned = jnp.concatenate([aligned, aligned], axis=0)
      x = x + aligned
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    x = layers.apply_stacked(
        self.blocks,
        lambda block, h, k, v: block(h, (k, v), kv.mask, kv.keyed_rows),
        x, (kv.keys, kv.values), **self.cfg.stack_kwargs)
    x = self.final_norm(x)
    h = jax.nn.gelu(self.head_dense(x))
    return sharding.constrain(self.head_norm(h),
                              ("batch", "length", "act_embed"))

  def head_logits(self, features: jax.Array) -> jax.Array:
    """Logits [B, N, codebook] (f32): the affine map of `features`."""
    logits = self.head_out(features).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))

  def logits(self, tokens: jax.Array, kv: ContextKV) -> jax.Array:
    """Logits [B, N, codebook] (f32) given precomputed context keys/values."""
    return self.head_logits(self.features(tokens, kv))

  def __call__(self, tokens: jax.Array,
               context: conditioning.Context) -> jax.Array:
    """Logits [B, N, codebook] for image `tokens` [B, N] given a context."""
    return self.logits(tokens, self.context_kv(context))
