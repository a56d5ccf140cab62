"""Convolutional VQ image tokenizer of Muse (a VQGAN generator, no attention).

Muse (arXiv 2301.00704, Sec. 2.1) tokenizes images with a fully convolutional
VQGAN: an encoder maps an image to a grid of latent vectors downsampled by a
factor ``f``, each vector is replaced by its nearest codebook entry, and a
decoder maps the quantized grid back to pixels. The integer codebook indices
are the "image tokens" that the masked transformers model.

The architecture follows MaskGIT's VQGAN generator: GroupNorm + swish residual
blocks, downsampling between resolutions, a residual bottleneck, and a mirrored
decoder with nearest-neighbour upsampling followed by a convolution.

The quantizer (`models.quantizer`) is either the plain nearest-neighbour
lookup of VQGAN / MaskGIT / diffusers, or the factorized, l2-normalized
codes of ViT-VQGAN; it owns the codebook, the straight-through estimator,
the codebook / commitment / entropy losses and dead-code restarts.

Layout options reproduce the community's tokenizers exactly, so their
checkpoints import (`muse_jax.interop`: `diffusers_vq`, `maskgit_vq`): diffusers' ``VQModel``
(aMUSEd: a 3x3 encoder output convolution, 1x1 ``quant_conv`` /
``post_quant_conv`` around the lookup, two bottleneck blocks and one more
decoder block per level) and MaskGIT's Flax VQGAN (no biases in the residual
branches, average-pool downsampling, its 1x1 shortcut applied to the branch
output; MaskGIT's [0, 1] pixels).

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
from muse_jax.models import quantizer as quantizer_lib

Array = jax.Array
DType = Any

_CONV_KERNEL_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')
_CONV_BIAS_AXES = ('conv_out',)
DOWNSAMPLE = ('conv', 'avg_pool')
SHORTCUT = ('input', 'branch')
PIXEL_RANGE = ('symmetric', 'unit')


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
    code_dim: Dimension of the codes.
    quantizer: ``"l2_normalized"`` or ``"euclidean"`` lookup
      (`models.quantizer`).
    num_groups: GroupNorm groups; must divide every channel count.
    commitment_cost: Weight of the commitment loss (encoder pulled toward its
      code), the ``beta`` of VQ-VAE.
    codebook_cost: Weight of the codebook loss (codes pulled toward encoder
      outputs).
    entropy_weight: Weight of the codebook-usage entropy regularizer (0
      disables it); see ``Quantizer``.
    entropy_temperature: Softmax temperature of the entropy regularizer.
    restart_threshold: Dead-code restarts: codes picked less often than this
      per batch (moving average) move onto encoder outputs; 0 disables.
    usage_decay: Decay of that moving average.
    conv_bias: Biases in the residual blocks' convolutions and the encoder's
      first convolution (MaskGIT has none).
    downsample: ``"conv"`` (3x3, stride 2, padded (0, 1) as diffusers) or
      ``"avg_pool"`` (2x2 mean, MaskGIT).
    shortcut: Where a residual block that changes width takes its 1x1
      shortcut from: ``"input"`` (ResNet, diffusers) or ``"branch"`` (the
      branch output, as MaskGIT's code does; kept for its checkpoints).
    encoder_out_kernel: Kernel of the encoder's output convolution (1, or 3
      as diffusers).
    quant_conv: 1x1 convolutions before the lookup and after it (diffusers'
      ``quant_conv`` / ``post_quant_conv``).
    mid_res_blocks: Residual blocks at the bottleneck of the encoder and the
      decoder; ``None`` uses the coarsest level's count of each.
    pixel_range: The pixel range the network itself was trained on:
      ``"symmetric"`` ([-1, 1], ours and diffusers') or ``"unit"`` ([0, 1],
      MaskGIT's). The model's inputs and outputs are always [-1, 1]; a
      ``"unit"`` network gets (x + 1) / 2 and its output y becomes 2y - 1.
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
  quantizer: str = 'l2_normalized'
  restart_threshold: float = 0.0
  usage_decay: float = 0.99
  conv_bias: bool = True
  downsample: str = 'conv'
  shortcut: str = 'input'
  encoder_out_kernel: int = 1
  quant_conv: bool = False
  mid_res_blocks: int | None = None
  pixel_range: str = 'symmetric'
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
  def quantizer_config(self) -> quantizer_lib.QuantizerConfig:
    """The quantizer's own config (`models.quantizer`)."""
    return quantizer_lib.QuantizerConfig(
        codebook_size=self.codebook_size, code_dim=self.code_dim,
        kind=self.quantizer, commitment_cost=self.commitment_cost,
        codebook_cost=self.codebook_cost, entropy_weight=self.entropy_weight,
        entropy_temperature=self.entropy_temperature,
        restart_threshold=self.restart_threshold,
        usage_decay=self.usage_decay, param_dtype=self.param_dtype)

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

  def mid_blocks(self, level_blocks: tuple[int, ...]) -> int:
    """Bottleneck residual blocks given a side's per-level counts."""
    if self.mid_res_blocks is None:
      return level_blocks[-1]
    return self.mid_res_blocks

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
    try:
      self.quantizer_config  # pylint: disable=pointless-statement
    except ValueError as e:
      raise ValueError(f'VQConfig: {e}') from None
    for name, allowed in (('downsample', DOWNSAMPLE), ('shortcut', SHORTCUT),
                          ('pixel_range', PIXEL_RANGE)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'VQConfig.{name}={getattr(self, name)!r} is not one '
                         f'of {allowed}')
    if self.encoder_out_kernel not in (1, 3):
      raise ValueError('VQConfig.encoder_out_kernel must be 1 or 3, got '
                       f'{self.encoder_out_kernel!r}')
    if self.mid_res_blocks is not None and (
        not isinstance(self.mid_res_blocks, int) or self.mid_res_blocks < 0):
      raise ValueError('VQConfig.mid_res_blocks must be None or an int >= 0, '
                       f'got {self.mid_res_blocks!r}')
    if self.local_encoder and self.downsample != 'conv':
      raise ValueError("VQConfig.local_encoder needs downsample='conv'")
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
          rngs: nnx.Rngs, strides: int = 1, zero_init: bool = False,
          bias: bool = True) -> nnx.Conv:
  """A 'SAME' convolution with annotated kernel and bias.

  With stride 2 on an even size, 'SAME' pads (0, 1): diffusers' layout.
  """
  if zero_init:
    kernel_init = nnx.initializers.zeros_init()
  else:
    kernel_init = nnx.initializers.variance_scaling(1.0, 'fan_in',
                                                    'truncated_normal')
  return nnx.Conv(
      in_ch, out_ch, kernel_size=(kernel, kernel), strides=(strides, strides),
      padding='SAME', use_bias=bias, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
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
    bias = cfg.conv_bias
    self.shortcut = cfg.shortcut
    self.norm1 = GroupNorm(in_ch, cfg.num_groups, cfg, rngs,
                           per_position=local)
    self.conv1 = _conv(in_ch, out_ch, k, cfg, rngs, bias=bias)
    self.norm2 = GroupNorm(out_ch, cfg.num_groups, cfg, rngs,
                           per_position=local)
    self.conv2 = _conv(out_ch, out_ch, k, cfg, rngs, zero_init=True,
                       bias=bias)
    self.skip = (_conv(in_ch if cfg.shortcut == 'input' else out_ch, out_ch,
                       1, cfg, rngs, bias=bias)
                 if in_ch != out_ch else None)

  def __call__(self, x: Array) -> Array:
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    if self.skip is not None:
      x = self.skip(x if self.shortcut == 'input' else h)
    return x + h


class Downsample(nnx.Module):
  """Halves the resolution: a stride-2 convolution (3x3, or 2x2 when
  `local`, so that no output sees pixels outside its own 2x2 cell), or a
  2x2 average (``downsample="avg_pool"``, no parameters)."""

  def __init__(self, channels: int, cfg: VQConfig, rngs: nnx.Rngs,
               local: bool = False):
    self.conv = (_conv(channels, channels, 2 if local else 3, cfg, rngs,
                       strides=2) if cfg.downsample == 'conv' else None)

  def __call__(self, x: Array) -> Array:
    if self.conv is not None:
      return self.conv(x)
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class Upsample(nnx.Module):
  """Doubles the resolution: nearest-neighbour repeat, then a 3x3 conv.

  Computed without the repeated image (a sub-pixel convolution): under the
  3x3 window, each of the four output phases (row and column parity) sees
  only two distinct input rows and columns, so it is a 2x2 convolution of
  the input with the window's taps summed accordingly. That is 16 instead
  of 36 multiply-adds per input pixel and channel pair, and on the 2-core
  CPU the decoder's largest upsampling ran 2.3x faster. Same parameters and
  outputs as the plain form, up to float rounding (tests/test_diffusers_vq.py
  holds them together).
  """

  def __init__(self, channels: int, cfg: VQConfig, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg, rngs)

  def __call__(self, x: Array) -> Array:
    dtype = self.conv.dtype or x.dtype
    x = x.astype(dtype)
    k = self.conv.kernel[...].astype(dtype)
    # Output row 2i sees input rows (i-1, i) through taps (k0, k1 + k2);
    # row 2i+1 sees (i, i+1) through (k0 + k1, k2). Columns alike.
    rows = (jnp.stack([k[0], k[1] + k[2]]), jnp.stack([k[0] + k[1], k[2]]))
    pads = ((1, 0), (0, 1))
    phases = []
    for a in range(2):
      r = rows[a]
      cols = (jnp.stack([r[:, 0], r[:, 1] + r[:, 2]], axis=1),
              jnp.stack([r[:, 0] + r[:, 1], r[:, 2]], axis=1))
      phases.append(jnp.stack([
          jax.lax.conv_general_dilated(
              x, cols[b], (1, 1), (pads[a], pads[b]),
              dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
              precision=self.conv.precision)
          for b in range(2)], axis=3))
    y = jnp.stack(phases, axis=2)  # [B, h, 2 (row parity), w, 2, C]
    b, h, _, w, _, c = y.shape
    y = y.reshape(b, 2 * h, 2 * w, c)
    if self.conv.bias is not None:
      y = y + self.conv.bias[...].astype(dtype)
    return y


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
    self.unit_range = cfg.pixel_range == 'unit'
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    nres = cfg.enc_res_blocks
    in_ch = cfg.in_channels * cfg.patch_size ** 2
    local = cfg.local_encoder
    self.conv_in = _conv(in_ch, chans[0], 1 if local else 3, cfg, rngs,
                         bias=cfg.conv_bias)
    blocks = []
    ch = chans[0]
    for level, out_ch in enumerate(chans):
      for _ in range(nres[level]):
        blocks.append(ResBlock(ch, out_ch, cfg, rngs, local=local))
        ch = out_ch
      if level < len(chans) - 1:
        blocks.append(Downsample(ch, cfg, rngs, local=local))
    for _ in range(cfg.mid_blocks(nres)):
      blocks.append(ResBlock(ch, ch, cfg, rngs, local=local))
    self.blocks = nnx.List(blocks)
    self.norm_out = GroupNorm(ch, cfg.num_groups, cfg, rngs,
                              per_position=local)
    self.conv_out = _conv(ch, cfg.code_dim,
                          1 if local else cfg.encoder_out_kernel, cfg, rngs)
    self.quant_conv = (_conv(cfg.code_dim, cfg.code_dim, 1, cfg, rngs)
                       if cfg.quant_conv else None)

  def __call__(self, images: Array) -> Array:
    x = images.astype(self.dtype)
    if self.unit_range:
      x = (x + 1) / 2
    x = space_to_depth(x, self.patch_size)
    x = self.conv_in(x)
    for block in self.blocks:
      x = block(x)
    x = self.conv_out(nnx.swish(self.norm_out(x)))
    return x if self.quant_conv is None else self.quant_conv(x)


class Decoder(nnx.Module):
  """Codes [B, h, w, code_dim] -> images [B, h*f, w*f, C] (unclipped)."""

  def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.patch_size = cfg.patch_size
    self.unit_range = cfg.pixel_range == 'unit'
    chans = [cfg.dec_base_channels * m for m in cfg.dec_channel_mult]
    nres = cfg.dec_res_blocks
    ch = chans[-1]
    self.post_quant_conv = (_conv(cfg.code_dim, cfg.code_dim, 1, cfg, rngs)
                            if cfg.quant_conv else None)
    self.conv_in = _conv(cfg.code_dim, ch, 3, cfg, rngs)
    blocks = [ResBlock(ch, ch, cfg, rngs)
              for _ in range(cfg.mid_blocks(nres))]
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

  def features(self, z: Array) -> Array:
    """Codes -> the activations the output convolution reads."""
    x = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      x = self.post_quant_conv(x)
    x = self.conv_in(x)
    for block in self.blocks:
      x = block(x)
    return nnx.swish(self.norm_out(x))

  def head(self, features: Array, conv_out: nnx.Conv | None = None) -> Array:
    """The output convolution (or a stand-in with its own weights: VQGAN's
    adaptive adversarial weight differentiates with respect to it)."""
    x = (conv_out or self.conv_out)(features)
    if self.unit_range:
      x = 2 * x - 1
    return depth_to_space(x, self.patch_size)

  def __call__(self, z: Array) -> Array:
    return self.head(self.features(z))


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


def check_images(config: VQConfig, shape: tuple[int, ...]) -> None:
  """Raises ValueError naming the mismatch if images of `shape` cannot be
  tokenized: [B, H, W, in_channels] with H and W multiples of f."""
  f = config.downsample_factor
  if len(shape) != 4:
    raise ValueError(f'tokenizer input must be images [B, H, W, '
                     f'{config.in_channels}], got shape {tuple(shape)}')
  if shape[-1] != config.in_channels:
    raise ValueError(f'tokenizer expects {config.in_channels} channels, got '
                     f'{shape[-1]} (images of shape {tuple(shape)})')
  if shape[1] % f or shape[2] % f:
    raise ValueError(f'image size {tuple(shape[1:3])} is not a multiple of '
                     f'the tokenizer\'s downsample factor f={f}')


def straight_through_clip(x: Array) -> Array:
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
    self.quantizer = quantizer_lib.Quantizer(config.quantizer_config, rngs)
    self.decoder = Decoder(config, rngs)

  def _check_images(self, images: Array) -> None:
    check_images(self.config, images.shape)

  def encode(self, images: Array) -> Array:
    """Images [B, H, W, C] -> latents z_e [B, H/f, W/f, code_dim]."""
    self._check_images(images)
    return self.encoder(images)

  def quantize(self, z_e: Array) -> tuple[Array, Array, dict[str, Array]]:
    """Latents -> (straight-through z_q in float32, int32 indices, aux);
    see `quantizer.Quantizer`."""
    return self.quantizer(z_e)

  def decode(self, z_q: Array, clip: bool = True) -> Array:
    """Codes [B, h, w, code_dim] -> float32 images, in [-1, 1] if `clip`
    (straight-through: an overshooting pixel keeps its gradient)."""
    x = self.decoder(z_q).astype(jnp.float32)
    return straight_through_clip(x) if clip else x

  def encode_to_indices(self, images: Array) -> Array:
    """Images [B, H, W, C] -> int32 tokens [B, H/f, W/f]."""
    _, indices, _ = self.quantize(self.encode(images))
    return indices

  def decode_from_indices(self, indices: Array, clip: bool = True) -> Array:
    """Int32 tokens [B, h, w] -> float32 images [B, h*f, w*f, C]."""
    if indices.ndim != 3:
      raise ValueError(f'expected tokens [B, h, w], got shape {indices.shape}')
    return self.decode(self.quantizer.lookup(indices), clip=clip)

  def __call__(self, images: Array) -> tuple[Array, dict[str, Array]]:
    """Reconstructs images; returns (recon float32 in [-1, 1], aux).

    ``aux`` is the quantizer's dict plus ``indices``.
    """
    z_q, indices, aux = self.quantize(self.encode(images))
    recon = self.decode(z_q)
    return recon, dict(aux, indices=indices)


# ----------------------------------------------------------------------------
# The paper's tokenizers.
# ----------------------------------------------------------------------------

# Muse Sec. 2.1 / 2.5 (MaskGIT's VQGAN without attention): codebook 8192,
# base channels 128, 2 residual blocks per resolution; f=16 for the base
# model (256 px -> 16x16), f=8 for super-resolution (512 px -> 64x64); the
# fine-tuned decoders have base channels 256 and 4 blocks per resolution.
# "amused-f16" is diffusers' aMUSEd VQModel layout (its checkpoints import).
_PAPER = dict(base_channels=128, num_res_blocks=2, codebook_size=8192,
              quantizer='euclidean', code_dim=256, num_groups=32)
_DECODER = dict(decoder_base_channels=256, decoder_num_res_blocks=4)
VARIANTS: dict[str, dict[str, Any]] = {
    'muse-f16': dict(_PAPER, channel_mult=(1, 1, 2, 2, 4)),
    'muse-f8': dict(_PAPER, channel_mult=(1, 2, 2, 4)),
    'muse-f16-decoder': dict(_PAPER, channel_mult=(1, 1, 2, 2, 4),
                             **_DECODER),
    'muse-f8-decoder': dict(_PAPER, channel_mult=(1, 2, 2, 4), **_DECODER),
    'amused-f16': dict(base_channels=128, channel_mult=(1, 2, 2, 4, 6),
                       num_res_blocks=2, decoder_num_res_blocks=3,
                       mid_res_blocks=2, codebook_size=8192, code_dim=64,
                       quantizer='euclidean', encoder_out_kernel=3,
                       quant_conv=True, num_groups=32),
}


def variant(name: str, **overrides: Any) -> VQConfig:
  """A named tokenizer config (`VARIANTS`), with field overrides."""
  if name not in VARIANTS:
    raise ValueError(f'unknown tokenizer variant {name!r}; known: '
                     f'{sorted(VARIANTS)}')
  return VQConfig(**dict(VARIANTS[name], **overrides))
