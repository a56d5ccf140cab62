"""Convolutional VQ image tokenizer of Muse (a VQGAN generator, no attention).

Muse (arXiv 2301.00704, Sec. 2.1) tokenizes images with a fully convolutional
VQGAN: an encoder maps an image to a grid of latent vectors downsampled by a
factor ``f``, each vector is replaced by its nearest codebook entry, and a
decoder maps the quantized grid back to pixels. The integer codebook indices
are the "image tokens" that the masked transformers model.

The architecture follows MaskGIT's VQGAN generator: GroupNorm + swish residual
blocks, downsampling between resolutions, a residual bottleneck, and a mirrored
decoder with nearest-neighbour upsampling followed by a convolution.

The quantizer uses the factorized, l2-normalized codes of ViT-VQGAN
(arXiv 2110.04627): the encoder projects to a low-dimensional ``code_dim``
space, both the projected latents and the codebook entries are l2-normalized,
and the lookup is a cosine-similarity nearest neighbour, with a
straight-through estimator and the usual codebook + commitment losses. Trained
from scratch with low ``code_dim`` (4-8) it converges quickly; an optional
entropy regularizer on soft assignments (MAGVIT-v2, arXiv 2310.05737) keeps
codebook usage high without EMA updates or dead-code restarts, so the loss
stays a pure function usable inside ``nnx.value_and_grad``.

An optional patchify stem (``patch_size``, a lossless space-to-depth as in
ViT-VQGAN) moves every convolution off the full-resolution grid; on small
images and CPUs that is where most FLOPs of a plain VQGAN stem go.

The decoder can be configured independently of the encoder (channels, res
blocks) so that, as in the paper, a larger decoder can later be fine-tuned
with the encoder and codebook frozen: the encoder and codebook live under the
``encoder`` and ``quantizer`` attributes, so an ``nnx.Optimizer`` restricted
with ``nnx.All(nnx.Param, nnx.PathContains('decoder'))`` trains only the
decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from muse_jax.config_types import dtype_from_name

Array = jax.Array
DType = Any

_CONV_KERNEL_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')
_CONV_BIAS_AXES = ('conv_out',)
_CODEBOOK_AXES = ('codebook', 'code_dim')


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """Configuration of the VQ tokenizer.

  Attributes:
    in_channels: Image channels (3 for RGB).
    patch_size: Lossless space-to-depth factor applied to the pixels before
      the first convolution (and depth-to-space after the last decoder
      convolution), as in ViT-VQGAN's patchify stem. 1 keeps the plain VQGAN
      stem; 2 or 4 moves all convolutions off the full-resolution grid, which
      cuts the FLOPs of the most expensive layers on small-image CPU runs.
    base_channels: Channels at full resolution before multipliers.
    channel_mult: Channel multiplier per resolution level. The number of
      downsamplings is ``len(channel_mult) - 1``, so the downsample factor is
      ``f = patch_size * 2 ** (len(channel_mult) - 1)``.
    num_res_blocks: Residual blocks per resolution level of the encoder: one
      int for every level, or a tuple with one entry per level (e.g. 0 at the
      finest level to save FLOPs). The bottleneck gets as many as the coarsest
      level.
    codebook_size: Number of codebook entries (the image-token vocabulary).
    code_dim: Dimension of the (l2-normalized) codes.
    num_groups: GroupNorm groups; must divide every channel count.
    commitment_cost: Weight of the commitment loss (encoder pulled toward its
      code), the ``beta`` of VQ-VAE.
    codebook_cost: Weight of the codebook loss (codes pulled toward encoder
      outputs).
    entropy_weight: Weight of the codebook-usage entropy regularizer (0
      disables it); see ``Quantizer``.
    entropy_temperature: Softmax temperature over cosine similarities for the
      entropy regularizer.
    l1_weight: Weight of the mean absolute reconstruction error.
    l2_weight: Weight of the mean squared reconstruction error. L2 alone
      trained clearly better than L1 on the shapes demo: early on, L1's
      median-seeking optimum paints small objects as background.
    local_encoder: Every token sees only its own ``f x f`` pixel patch: the
      encoder's convolutions are 1x1, its downsamplings 2x2 with stride 2 and
      its normalization per position (no statistics over the image). The
      same patch then always gets the same token wherever it appears, so on
      flat-colour data (the shapes demo) all background patches share one
      token instead of varying with nearby objects and image statistics, and
      the transformer has far less entropy to model. The decoder keeps its
      3x3 convolutions and so still blends across token borders.
    decoder_base_channels: Decoder base channels; ``None`` mirrors the encoder.
    decoder_channel_mult: Decoder multipliers (same length as
      ``channel_mult``, so ``f`` matches); ``None`` mirrors the encoder.
    decoder_num_res_blocks: Decoder residual blocks per level (int or
      per-level tuple, finest level first); ``None`` mirrors the encoder.
    dtype: Compute dtype of convolutions and activations.
    param_dtype: Storage dtype of the parameters.
  """

  in_channels: int = 3
  patch_size: int = 1
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int | tuple[int, ...] = 2
  codebook_size: int = 8192
  code_dim: int = 32
  num_groups: int = 32
  commitment_cost: float = 0.25
  codebook_cost: float = 1.0
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.05
  l1_weight: float = 0.0
  l2_weight: float = 1.0
  local_encoder: bool = False
  decoder_base_channels: int | None = None
  decoder_channel_mult: tuple[int, ...] | None = None
  decoder_num_res_blocks: int | tuple[int, ...] | None = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def __post_init__(self):
    # Accept lists from config files but store hashable tuples.
    object.__setattr__(self, 'channel_mult', tuple(self.channel_mult))
    for name in ('num_res_blocks', 'decoder_num_res_blocks'):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.decoder_channel_mult is not None:
      object.__setattr__(self, 'decoder_channel_mult',
                         tuple(self.decoder_channel_mult))
    # Accept dtype names ('bfloat16') as well as dtype objects, checked as
    # every config's dtypes are (config_types.dtype_from_name).
    for name in ('dtype', 'param_dtype'):
      object.__setattr__(
          self, name, jnp.dtype(dtype_from_name(getattr(self, name))))
    self.validate()

  @property
  def downsample_factor(self) -> int:
    """Spatial reduction from pixels to tokens, ``f``."""
    return self.patch_size * 2 ** (len(self.channel_mult) - 1)

  @property
  def enc_res_blocks(self) -> tuple[int, ...]:
    """Encoder residual blocks per level, finest level first."""
    return _per_level(self.num_res_blocks, len(self.channel_mult))

  @property
  def dec_base_channels(self) -> int:
    """Effective decoder base channels."""
    if self.decoder_base_channels is None:
      return self.base_channels
    return self.decoder_base_channels

  @property
  def dec_channel_mult(self) -> tuple[int, ...]:
    """Effective decoder channel multipliers, finest level first."""
    if self.decoder_channel_mult is None:
      return self.channel_mult
    return self.decoder_channel_mult

  @property
  def dec_res_blocks(self) -> tuple[int, ...]:
    """Decoder residual blocks per level, finest level first."""
    if self.decoder_num_res_blocks is None:
      return self.enc_res_blocks
    return _per_level(self.decoder_num_res_blocks, len(self.channel_mult))

  def validate(self) -> None:
    """Raises ValueError, naming the field, for an inconsistent config."""
    def positive(name: str, value: Any) -> None:
      if not isinstance(value, int) or value < 1:
        raise ValueError(
            f'VQConfig.{name} must be a positive int, got {value!r}')

    positive('in_channels', self.in_channels)
    positive('patch_size', self.patch_size)
    positive('base_channels', self.base_channels)
    positive('code_dim', self.code_dim)
    positive('num_groups', self.num_groups)
    if not isinstance(self.codebook_size, int) or self.codebook_size < 2:
      raise ValueError('VQConfig.codebook_size must be an int >= 2, got '
                       f'{self.codebook_size!r}')
    for name in ('commitment_cost', 'codebook_cost', 'entropy_weight',
                 'l1_weight', 'l2_weight'):
      if getattr(self, name) < 0:
        raise ValueError(f'VQConfig.{name} must be >= 0, got '
                         f'{getattr(self, name)!r}')
    if self.entropy_temperature <= 0:
      raise ValueError('VQConfig.entropy_temperature must be > 0, got '
                       f'{self.entropy_temperature!r}')
    if self.l1_weight == 0 and self.l2_weight == 0:
      raise ValueError('VQConfig.l1_weight and VQConfig.l2_weight are both 0; '
                       'the reconstruction loss would vanish')
    _check_mult('channel_mult', self.channel_mult)
    if self.decoder_channel_mult is not None:
      _check_mult('decoder_channel_mult', self.decoder_channel_mult)
      if len(self.decoder_channel_mult) != len(self.channel_mult):
        raise ValueError(
            'VQConfig.decoder_channel_mult must have the same length as '
            f'channel_mult ({len(self.channel_mult)}) so that the decoder '
            f'upsamples by the same factor, got {self.decoder_channel_mult!r}')
    if self.decoder_base_channels is not None:
      positive('decoder_base_channels', self.decoder_base_channels)
    _check_res_blocks('num_res_blocks', self.num_res_blocks,
                      len(self.channel_mult))
    if self.decoder_num_res_blocks is not None:
      _check_res_blocks('decoder_num_res_blocks', self.decoder_num_res_blocks,
                        len(self.channel_mult))
    channels = {self.base_channels * m for m in self.channel_mult}
    channels |= {self.dec_base_channels * m for m in self.dec_channel_mult}
    bad = sorted(c for c in channels if c % self.num_groups)
    if bad:
      raise ValueError(f'VQConfig.num_groups={self.num_groups} must divide '
                       f'every channel count; it does not divide {bad}')


def _check_mult(name: str, mult: tuple[int, ...]) -> None:
  if not mult:
    raise ValueError(f'VQConfig.{name} must be non-empty')
  if any(not isinstance(m, int) or m < 1 for m in mult):
    raise ValueError(f'VQConfig.{name} must hold positive ints, got {mult!r}')


def _check_res_blocks(name: str, value: Any, levels: int) -> None:
  values = value if isinstance(value, tuple) else (value,)
  if isinstance(value, tuple) and len(value) != levels:
    raise ValueError(f'VQConfig.{name} must be an int or have one entry per '
                     f'level ({levels}), got {value!r}')
  if any(not isinstance(v, int) or v < 0 for v in values):
    raise ValueError(f'VQConfig.{name} must hold non-negative ints, got '
                     f'{value!r}')


def _per_level(value: int | tuple[int, ...], levels: int) -> tuple[int, ...]:
  return tuple(value) if isinstance(value, tuple) else (value,) * levels


# ----------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------


def _conv(in_ch: int, out_ch: int, kernel: int, cfg: VQConfig,
          rngs: nnx.Rngs, strides: int = 1, zero_init: bool = False
          ) -> nnx.Conv:
  """A 'SAME' convolution with annotated kernel and bias."""
  if zero_init:
    kernel_init = nnx.initializers.zeros_init()
  else:
    kernel_init = nnx.initializers.variance_scaling(1.0, 'fan_in',
                                                    'truncated_normal')
  return nnx.Conv(
      in_ch, out_ch, kernel_size=(kernel, kernel), strides=(strides, strides),
      padding='SAME', dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=nnx.with_partitioning(kernel_init, _CONV_KERNEL_AXES),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                      _CONV_BIAS_AXES),
      rngs=rngs)


class GroupNorm(nnx.Module):
  """GroupNorm computed in float32, returning the compute dtype.

  Normalization statistics in low precision are a common source of training
  instability, so they are always taken in float32.
  """

  def __init__(self, channels: int, num_groups: int, cfg: VQConfig,
               rngs: nnx.Rngs, epsilon: float = 1e-6,
               per_position: bool = False):
    self.num_groups = num_groups
    # Statistics over each position's channel group only (no spatial mixing).
    self.axes = (4,) if per_position else (1, 2, 4)
    self.epsilon = epsilon
    self.dtype = cfg.dtype
    ones = nnx.with_partitioning(nnx.initializers.ones_init(), _CONV_BIAS_AXES)
    zeros = nnx.with_partitioning(nnx.initializers.zeros_init(),
                                  _CONV_BIAS_AXES)
    self.scale = nnx.Param(ones(rngs.params(), (channels,), cfg.param_dtype))
    self.bias = nnx.Param(zeros(rngs.params(), (channels,), cfg.param_dtype))

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    g = self.num_groups
    xg = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
    mean = jnp.mean(xg, axis=self.axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=self.axes, keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = xg.reshape(b, h, w, c) * self.scale[...].astype(jnp.float32)
    y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class ResBlock(nnx.Module):
  """Pre-activation residual block: (GroupNorm, swish, conv3x3) x 2 + skip.

  The last convolution of the residual branch starts at zero, so every block
  is the identity (or its 1x1 projection) at initialization; on the shapes
  demo this trained slightly faster than a random init.
  """

  def __init__(self, in_ch: int, out_ch: int, cfg: VQConfig, rngs: nnx.Rngs,
               local: bool = False):
    k = 1 if local else 3
    self.norm1 = GroupNorm(in_ch, cfg.num_groups, cfg, rngs,
                           per_position=local)
    self.conv1 = _conv(in_ch, out_ch, k, cfg, rngs)
    self.norm2 = GroupNorm(out_ch, cfg.num_groups, cfg, rngs,
                           per_position=local)
    self.conv2 = _conv(out_ch, out_ch, k, cfg, rngs, zero_init=True)
    self.skip = _conv(in_ch, out_ch, 1, cfg, rngs) if in_ch != out_ch else None

  def __call__(self, x: Array) -> Array:
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    if self.skip is not None:
      x = self.skip(x)
    return x + h


class Downsample(nnx.Module):
  """Halves the resolution with a stride-2 convolution (3x3, or 2x2 when
  `local`, so that no output sees pixels outside its own 2x2 cell)."""

  def __init__(self, channels: int, cfg: VQConfig, rngs: nnx.Rngs,
               local: bool = False):
    self.conv = _conv(channels, channels, 2 if local else 3, cfg, rngs,
                      strides=2)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Doubles the resolution: nearest-neighbour repeat, then a 3x3 conv."""

  def __init__(self, channels: int, cfg: VQConfig, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg, rngs)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return self.conv(x.reshape(b, 2 * h, 2 * w, c))


def space_to_depth(x: Array, p: int) -> Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C], lossless."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: Array, p: int) -> Array:
  """[B, h, w, p*p*C] -> [B, h*p, w*p, C], the inverse of space_to_depth."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


class Encoder(nnx.Module):
  """Image [B, H, W, C] -> latents [B, H/f, W/f, code_dim] (unnormalized)."""

  def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.patch_size = cfg.patch_size
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    nres = cfg.enc_res_blocks
    in_ch = cfg.in_channels * cfg.patch_size ** 2
    local = cfg.local_encoder
    self.conv_in = _conv(in_ch, chans[0], 1 if local else 3, cfg, rngs)
    blocks = []
    ch = chans[0]
    for level, out_ch in enumerate(chans):
      for _ in range(nres[level]):
        blocks.append(ResBlock(ch, out_ch, cfg, rngs, local=local))
        ch = out_ch
      if level < len(chans) - 1:
        blocks.append(Downsample(ch, cfg, rngs, local=local))
    for _ in range(nres[-1]):
      blocks.append(ResBlock(ch, ch, cfg, rngs, local=local))
    self.blocks = nnx.List(blocks)
    self.norm_out = GroupNorm(ch, cfg.num_groups, cfg, rngs,
                              per_position=local)
    self.conv_out = _conv(ch, cfg.code_dim, 1, cfg, rngs)

  def __call__(self, images: Array) -> Array:
    x = space_to_depth(images.astype(self.dtype), self.patch_size)
    x = self.conv_in(x)
    for block in self.blocks:
      x = block(x)
    return self.conv_out(nnx.swish(self.norm_out(x)))


class Decoder(nnx.Module):
  """Codes [B, h, w, code_dim] -> images [B, h*f, w*f, C] (unclipped)."""

  def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.patch_size = cfg.patch_size
    chans = [cfg.dec_base_channels * m for m in cfg.dec_channel_mult]
    nres = cfg.dec_res_blocks
    ch = chans[-1]
    self.conv_in = _conv(cfg.code_dim, ch, 3, cfg, rngs)
    blocks = [ResBlock(ch, ch, cfg, rngs) for _ in range(nres[-1])]
    for level in reversed(range(len(chans))):
      for _ in range(nres[level]):
        blocks.append(ResBlock(ch, chans[level], cfg, rngs))
        ch = chans[level]
      if level > 0:
        blocks.append(Upsample(ch, cfg, rngs))
    self.blocks = nnx.List(blocks)
    self.norm_out = GroupNorm(ch, cfg.num_groups, cfg, rngs)
    out_ch = cfg.in_channels * cfg.patch_size ** 2
    self.conv_out = _conv(ch, out_ch, 3, cfg, rngs)

  def __call__(self, z: Array) -> Array:
    x = self.conv_in(z.astype(self.dtype))
    for block in self.blocks:
      x = block(x)
    x = self.conv_out(nnx.swish(self.norm_out(x)))
    return depth_to_space(x, self.patch_size)


def _l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis, keepdims=True) + eps)


class Quantizer(nnx.Module):
  """Nearest-neighbour lookup of l2-normalized codes (ViT-VQGAN style).

  Distances, losses and statistics are computed in float32 regardless of the
  compute dtype: a nearest-code search over near-ties in bfloat16 would make
  token assignments noisy.
  """

  def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
    self.codebook_size = cfg.codebook_size
    self.entropy_temperature = cfg.entropy_temperature
    init = nnx.with_partitioning(nnx.initializers.normal(1.0), _CODEBOOK_AXES)
    self.codebook = nnx.Param(
        init(rngs.params(), (cfg.codebook_size, cfg.code_dim),
             cfg.param_dtype))

  def normalized_codebook(self) -> Array:
    """The unit-norm codebook [codebook_size, code_dim] in float32."""
    return _l2_normalize(self.codebook[...].astype(jnp.float32))

  def lookup(self, indices: Array) -> Array:
    """Unit-norm codes for integer ``indices`` (any shape) in float32."""
    return jnp.take(self.normalized_codebook(), indices, axis=0)

  def __call__(self, z_e: Array) -> tuple[Array, Array, dict[str, Array]]:
    z = _l2_normalize(z_e.astype(jnp.float32))
    codes = self.normalized_codebook()
    # Both sides have unit norm, so nearest in l2 == largest dot product.
    sim = jnp.einsum('...d,kd->...k', z, codes)
    indices = jnp.argmax(sim, axis=-1).astype(jnp.int32)
    z_q = jnp.take(codes, indices, axis=0)
    codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(z_q)))
    # Straight-through estimator: forward uses z_q, gradient flows to z.
    z_st = z + jax.lax.stop_gradient(z_q - z)
    counts = jnp.zeros((self.codebook_size,), jnp.float32).at[
        indices.reshape(-1)].add(1.0)
    probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0))
    # Entropy regularizer (MAGVIT-v2 style) on soft assignments: each vector
    # should be confidently assigned (low per-position entropy) while the
    # batch as a whole spreads over the codebook (high entropy of the mean
    # assignment). Unlike hard assignments it gives unused codes a gradient.
    # Both terms are >= 0 (log K is the maximum batch entropy).
    logp = jax.nn.log_softmax(sim.reshape(-1, self.codebook_size) /
                              self.entropy_temperature, axis=-1)
    p = jnp.exp(logp)
    per_sample_entropy = -jnp.mean(jnp.sum(p * logp, axis=-1))
    avg_p = jnp.mean(p, axis=0)
    batch_entropy = -jnp.sum(avg_p * jnp.log(avg_p + 1e-9))
    entropy_gap = jnp.log(float(self.codebook_size)) - batch_entropy
    aux = {
        'codebook_loss': codebook_loss,
        'commitment_loss': commitment_loss,
        'entropy_loss': per_sample_entropy + entropy_gap,
        'perplexity': jnp.exp(entropy),
        'codebook_usage': jnp.mean((counts > 0).astype(jnp.float32)),
        'code_counts': counts,
    }
    return z_st, indices, aux


# ----------------------------------------------------------------------------
# The tokenizer.
# ----------------------------------------------------------------------------


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 images [0, 255] -> float32 [-1, 1], the tokenizer's input range."""
  return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def from_unit_range(images: Any) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0,
                 255).astype(np.uint8)


def _straight_through_clip(x: Array) -> Array:
  """Clips to [-1, 1] in the forward pass, identity gradient.

  Outputs always lie in the image range, while a pixel that overshoots still
  receives a gradient pulling it back toward its (in-range) target.
  """
  return x + jax.lax.stop_gradient(jnp.clip(x, -1.0, 1.0) - x)


class VQModel(nnx.Module):
  """The VQ tokenizer: encoder, quantizer and decoder.

  Images are float NHWC in [-1, 1]; tokens are int32 [B, H/f, W/f].
  """

  def __init__(self, config: VQConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs)
    self.quantizer = Quantizer(config, rngs)
    self.decoder = Decoder(config, rngs)

  def _check_images(self, images: Array) -> None:
    f = self.config.downsample_factor
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f'expected images [B, H, W, {self.config.in_channels}], '
                       f'got shape {images.shape}')
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by '
                       f'the downsample factor {f}')

  def encode(self, images: Array) -> Array:
    """Images [B, H, W, C] -> latents z_e [B, H/f, W/f, code_dim]."""
    self._check_images(images)
    return self.encoder(images)

  def quantize(self, z_e: Array) -> tuple[Array, Array, dict[str, Array]]:
    """Latents -> (straight-through z_q in float32, int32 indices, aux).

    ``aux`` holds float32 scalars ``codebook_loss``, ``commitment_loss``,
    ``entropy_loss`` (unweighted, >= 0), ``perplexity`` and
    ``codebook_usage`` (fraction of codes used in the batch), and
    ``code_counts`` [codebook_size].
    """
    return self.quantizer(z_e)

  def decode(self, z_q: Array) -> Array:
    """Codes [B, h, w, code_dim] -> float32 images in [-1, 1]."""
    return _straight_through_clip(self.decoder(z_q).astype(jnp.float32))

  def encode_to_indices(self, images: Array) -> Array:
    """Images [B, H, W, C] -> int32 tokens [B, H/f, W/f]."""
    _, indices, _ = self.quantize(self.encode(images))
    return indices

  def decode_from_indices(self, indices: Array) -> Array:
    """Int32 tokens [B, h, w] -> float32 images [B, h*f, w*f, C] in [-1, 1]."""
    return self.decode(self.quantizer.lookup(indices))

  def __call__(self, images: Array) -> tuple[Array, dict[str, Array]]:
    """Reconstructs images; returns (recon float32 in [-1, 1], aux).

    ``aux`` is the quantizer's dict plus ``indices``.
    """
    z_q, indices, aux = self.quantize(self.encode(images))
    recon = self.decode(z_q)
    return recon, dict(aux, indices=indices)


# ----------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------


def vq_loss_terms(model: VQModel, images: Array
                  ) -> tuple[dict[str, Array], Array, dict[str, Array]]:
  """Weighted loss terms, the reconstruction, and the quantizer aux.

  This is the extension point for the perceptual and adversarial losses of a
  full VQGAN: a trainer can call this, add its own weighted terms computed from
  ``recon`` and ``images`` to the returned dict, and sum them.

  Args:
    model: The tokenizer.
    images: Float images [B, H, W, C] in [-1, 1].

  Returns:
    (terms, recon, aux): ``terms`` maps names to already-weighted float32
    scalars whose sum is the loss; ``recon`` is float32 [B, H, W, C].
  """
  cfg = model.config
  recon, aux = model(images)
  diff = recon - images.astype(jnp.float32)
  terms = {}
  if cfg.l1_weight:
    terms['l1'] = cfg.l1_weight * jnp.mean(jnp.abs(diff))
  if cfg.l2_weight:
    terms['l2'] = cfg.l2_weight * jnp.mean(jnp.square(diff))
  terms['codebook'] = cfg.codebook_cost * aux['codebook_loss']
  terms['commitment'] = cfg.commitment_cost * aux['commitment_loss']
  if cfg.entropy_weight:
    terms['entropy'] = cfg.entropy_weight * aux['entropy_loss']
  return terms, recon, aux


def vq_loss(model: VQModel, images: Array) -> tuple[Array, dict[str, Array]]:
  """Pure VQ training loss: reconstruction + codebook + commitment.

  Usable as ``nnx.value_and_grad(vq_loss, has_aux=True)(model, images)``.

  Args:
    model: The tokenizer.
    images: Float images [B, H, W, C] in [-1, 1].

  Returns:
    (loss, metrics): a float32 scalar and a dict of float32 scalars:
    ``loss``, each term, ``recon_mse``, ``recon_l1``, ``perplexity`` and
    ``codebook_usage``.
  """
  terms, recon, aux = vq_loss_terms(model, images)
  loss = sum(terms.values())
  diff = recon - images.astype(jnp.float32)
  metrics = {f'{k}_loss': v for k, v in terms.items()}
  metrics.update(
      loss=loss,
      recon_mse=jnp.mean(jnp.square(diff)),
      recon_l1=jnp.mean(jnp.abs(diff)),
      perplexity=aux['perplexity'],
      codebook_usage=aux['codebook_usage'],
  )
  return loss, metrics
