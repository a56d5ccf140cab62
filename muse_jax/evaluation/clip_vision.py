"""CLIP's ViT image tower in Flax NNX, and its checkpoint layouts.

The tower (OpenAI CLIP `VisionTransformer`, open_clip's, HF
`CLIPVisionModelWithProjection`):

    patches   conv p x p / p without bias (here an einsum over the
              non-overlapping patches), one token per patch
    tokens    [class embedding; patches] + learned position embedding
    ln_pre    LayerNorm
    layers    pre-LayerNorm transformer layers (`clip.CLIPLayer`, shared
              with the text tower), bidirectional attention
    pooled    ln_post of the class token
    embeds    pooled @ proj (no bias)

Images are CLIP-normalised float [B, H, W, 3] (see `clip_score.preprocess`);
H, W equal the configured image size. Matmuls run in `dtype`; LayerNorm,
softmax and the residual stream stay float32.

`entries(model, layout)` maps a checkpoint's vision tensors to parameters,
for `clip_weights.fill`: OpenAI / open_clip names (`visual.conv1.weight`,
`visual.transformer.resblocks.N.attn.in_proj_weight`, `visual.proj`) or
HF's (`vision_model.embeddings.patch_embedding.weight`,
`vision_model.pre_layrnorm.weight` -- sic --, `visual_projection.weight`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models import layers
from muse_jax.text_encoders import clip
from muse_jax.text_encoders import clip_weights

Entry = clip_weights.Entry


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Sizes of a CLIP ViT image tower and its dtypes.

  Field names follow `clip.CLIPTextConfig` where they mean the same, so
  both towers build `clip.CLIPLayer`s.
  """

  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  projection_dim: int = 512
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "plain"  # Or "xla_cpu": see `clip.CLIPTextConfig.impl`.

  def __post_init__(self):
    if self.hidden_act not in clip.ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act={self.hidden_act!r} is not one of "
                       f"{sorted(clip.ACTIVATIONS)}")
    layers.check_impl("CLIP impl", self.impl)
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIP image_size={self.image_size} is not a "
                       f"multiple of patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"CLIP hidden_size={self.hidden_size} is not "
                       f"divisible by num_heads={self.num_heads}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


class CLIPVisionOutputs(NamedTuple):
  pooled: jax.Array  # [B, D] float32: ln_post of the class token.
  image_embeds: jax.Array  # [B, P] float32: pooled @ proj.


class CLIPVisionTransformer(nnx.Module):
  """CLIP's image tower; random until loaded (`entries` + `fill`)."""

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    mm = dict(kw, impl=config.impl)
    d, p = config.hidden_size, config.patch_size
    self.patch_embed = layers.Einsum(
        "bhwpqc,pqcd->bhwd", (p, p, 3, d), (None, None, None, "embed"),
        fan_in_ndim=3, **mm)
    init = nnx.initializers.normal(d**-0.5)
    self.class_embed = nnx.Param(nnx.with_partitioning(init, ("embed",))(
        rngs.params(), (d,), config.param_dtype))
    self.position_embed = nnx.Param(
        nnx.with_partitioning(init, ("positions", "embed"))(
            rngs.params(), (config.grid**2 + 1, d), config.param_dtype))
    self.pre_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, **kw)
    self.layers = nnx.List(
        [clip.CLIPLayer(config, rngs=rngs, masked=False)
         for _ in range(config.num_layers)])
    self.post_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, **kw)
    self.projection = layers.Einsum("bd,dp->bp", (d, config.projection_dim),
                                    ("embed", "text_embed"), **mm)

  def __call__(self, pixels: jax.Array) -> CLIPVisionOutputs:
    """pixels: CLIP-normalised float [B, S, S, 3], S = image_size."""
    cfg = self.config
    b, h, w, c = pixels.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"CLIP image tower takes [B, {cfg.image_size}, "
                       f"{cfg.image_size}, 3] pixels, got {pixels.shape}")
    g, p = cfg.grid, cfg.patch_size
    patches = pixels.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch_embed(patches).reshape(b, g * g, -1).astype(jnp.float32)
    cls = jnp.broadcast_to(self.class_embed[...].astype(jnp.float32),
                           (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position_embed[...].astype(jnp.float32)[None]
    x = self.pre_norm(x).astype(jnp.float32)
    for layer in self.layers:
      x = layer(x, None)  # Bidirectional: no mask.
    pooled = self.post_norm(x[:, 0]).astype(jnp.float32)
    return CLIPVisionOutputs(pooled,
                             self.projection(pooled).astype(jnp.float32))


def _ident(a: np.ndarray) -> np.ndarray:
  return a


def _conv_kernel(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0)  # torch [D, 3, p, p] -> [p, p, 3, D].


def entries(model: CLIPVisionTransformer, layout: str) -> dict[str, Entry]:
  """The image tower's tensors in `layout` ("hf" or "open_clip", the
  latter being OpenAI's names too)."""
  cfg = model.config
  d, f, p = cfg.hidden_size, cfg.mlp_dim, cfg.patch_size
  n, proj = cfg.grid**2 + 1, cfg.projection_dim
  norm = lambda m: ((m.scale, _ident),)
  bias = lambda m: ((m.bias, _ident),)
  if layout == "hf":
    e = "vision_model.embeddings."
    out = {
        f"{e}class_embedding": Entry((d,), ((model.class_embed, _ident),)),
        f"{e}patch_embedding.weight": Entry(
            (d, 3, p, p), ((model.patch_embed.kernel, _conv_kernel),)),
        f"{e}position_embedding.weight": Entry(
            (n, d), ((model.position_embed, _ident),)),
        "vision_model.pre_layrnorm.weight": Entry((d,), norm(model.pre_norm)),
        "vision_model.pre_layrnorm.bias": Entry((d,), bias(model.pre_norm)),
        "vision_model.post_layernorm.weight":
            Entry((d,), norm(model.post_norm)),
        "vision_model.post_layernorm.bias": Entry((d,), bias(model.post_norm)),
        "visual_projection.weight": Entry(
            (proj, d), ((model.projection.kernel, lambda a: a.T),)),
    }
    for i, layer in enumerate(model.layers):
      out.update(clip_weights.hf_layer_entries(
          layer, f"vision_model.encoder.layers.{i}.", d, f, cfg.num_heads))
    return out
  out = {
      "visual.class_embedding": Entry((d,), ((model.class_embed, _ident),)),
      "visual.conv1.weight": Entry(
          (d, 3, p, p), ((model.patch_embed.kernel, _conv_kernel),)),
      "visual.positional_embedding": Entry(
          (n, d), ((model.position_embed, _ident),)),
      "visual.ln_pre.weight": Entry((d,), norm(model.pre_norm)),
      "visual.ln_pre.bias": Entry((d,), bias(model.pre_norm)),
      "visual.ln_post.weight": Entry((d,), norm(model.post_norm)),
      "visual.ln_post.bias": Entry((d,), bias(model.post_norm)),
      "visual.proj": Entry((d, proj), ((model.projection.kernel, _ident),)),
  }
  for i, layer in enumerate(model.layers):
    out.update(clip_weights.open_clip_layer_entries(
        layer, f"visual.transformer.resblocks.{i}.", d, f, cfg.num_heads))
  return out
