"""diffusers' `VQModel`: its config, its state-dict layout, and ours.

What a diffusers VQ tokenizer (e.g. aMUSEd's `vqvae`) looks like on disk:
which `config.json` values we can reproduce (`normalize_config`), and, for
such a config, every tensor of `diffusion_pytorch_model.safetensors` with
its PyTorch shape and the path of the same parameter in our
`muse_jax.models.vqgan.VQModel` (`tensors`). `random_state_dict` makes a
seeded random state dict in exactly that layout.

Pure Python and numpy (no JAX, no torch): the PyTorch reference script
(scripts/make_diffusers_vq_golden.py) and the peers' benchmark import it
from their own environment and build the very weights our tests and
benchmark build, and `muse_jax.interop.diffusers_vq` maps real checkpoints
through the same table.

The layout, as diffusers builds it (read from diffusers 0.42's `VQModel`,
`Encoder` and `Decoder`):
  encoder.conv_in                         3x3, in -> C[0]
  encoder.down_blocks.i.resnets.j         `layers_per_block` ResNet blocks
  encoder.down_blocks.i.downsamplers.0    3x3 stride 2, padded (0, 1); not
                                          on the last level
  encoder.mid_block.resnets.{0,1}         two blocks (attention is off)
  encoder.conv_norm_out, encoder.conv_out GroupNorm, 3x3 -> latent channels
  quant_conv, quantize.embedding,         1x1, the codebook [K, D], 1x1
  post_quant_conv
  decoder.conv_in, decoder.mid_block      3x3 -> C[-1], two blocks
  decoder.up_blocks.i.resnets.j           `layers_per_block + 1` blocks,
                                          coarsest level first
  decoder.up_blocks.i.upsamplers.0.conv   nearest x2 then 3x3; not on the
                                          last level
  decoder.conv_norm_out, decoder.conv_out GroupNorm, 3x3 -> out channels
A ResNet block is norm1, conv1 (3x3), norm2, conv2 (3x3) and, when its
width changes, conv_shortcut (1x1 on its input).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# diffusers' VQModel.__init__ defaults: a config.json may omit any of these.
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}
# Keys that do not change the network's function on images and tokens.
IGNORED = ("sample_size", "scaling_factor", "lookup_from_codebook",
           "force_upcast")
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish")
# Residual blocks of each mid block (diffusers' UNetMidBlock2D, one layer).
MID_BLOCKS = 2

# The aMUSEd tokenizer (amused/amused-256 and -512 `vqvae`): f = 16,
# 8192 codes of width 64.
AMUSED_CONFIG: dict[str, Any] = {
    "_class_name": "VQModel",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768],
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "force_upcast": False,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 64,
    "layers_per_block": 2,
    "lookup_from_codebook": True,
    "mid_block_add_attention": False,
    "norm_num_groups": 32,
    "norm_type": "group",
    "num_vq_embeddings": 8192,
    "vq_embed_dim": 64,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

# Random codes on the scale of the random encoder's latents (std ~0.2 in
# the aMUSEd layout on photos), so that images pick many different codes:
# with N(0, 1) codes the latents' nearest codes were the few shortest ones
# (8 distinct codes for 256 tokens).
CODEBOOK_STD = 0.2

CONV_KERNEL = "conv_kernel"  # torch [O, I, kh, kw]; ours [kh, kw, I, O].
CONV_BIAS = "conv_bias"
NORM_SCALE = "norm_scale"
NORM_BIAS = "norm_bias"
CODEBOOK = "codebook"  # [K, D] on both sides.


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of the state dict.

  Attributes:
    key: Its name in diffusers' state dict.
    shape: Its PyTorch shape.
    ours: The path of the same parameter in our VQModel ("a/b/0/kernel").
    kind: One of CONV_KERNEL, CONV_BIAS, NORM_SCALE, NORM_BIAS, CODEBOOK.
    fan_in: Inputs per output of its convolution (0 for other kinds).
  """

  key: str
  shape: tuple[int, ...]
  ours: str
  kind: str
  fan_in: int = 0

  @property
  def our_shape(self) -> tuple[int, ...]:
    """The shape in our model (conv kernels are HWIO)."""
    if self.kind == CONV_KERNEL:
      o, i, kh, kw = self.shape
      return (kh, kw, i, o)
    return self.shape

  def to_ours(self, value: np.ndarray) -> np.ndarray:
    """diffusers' array -> ours (OIHW -> HWIO for conv kernels)."""
    if self.kind == CONV_KERNEL:
      return np.transpose(value, (2, 3, 1, 0))
    return value

  def to_theirs(self, value: np.ndarray) -> np.ndarray:
    """Our array -> diffusers' (the inverse of `to_ours`)."""
    if self.kind == CONV_KERNEL:
      return np.transpose(value, (3, 2, 0, 1))
    return value


def _unsupported(source: str, key: str, value: Any, why: str) -> ValueError:
  return ValueError(f"{source}: unsupported diffusers VQModel config "
                    f"{key}={value!r}: {why}")


def normalize_config(config: dict[str, Any], source: str = "config"
                     ) -> dict[str, Any]:
  """A diffusers VQModel config with defaults filled in, checked to be one
  our tokenizer reproduces exactly.

  Args:
    config: The parsed `config.json`.
    source: Names the config in errors (e.g. its path).

  Returns:
    Every key of `DEFAULTS`, lists as tuples, ``vq_embed_dim`` resolved
    (the `IGNORED` keys are kept, whatever their values).

  Raises:
    ValueError: naming the key and value that is unknown or unsupported.
  """
  if not isinstance(config, dict):
    raise ValueError(f"{source}: a diffusers config must be a JSON object, "
                     f"got {type(config).__name__}")
  cls = config.get("_class_name", "VQModel")
  if cls != "VQModel":
    raise _unsupported(source, "_class_name", cls, "only VQModel configs")
  out = dict(DEFAULTS)
  for key, value in config.items():
    if key.startswith("_"):  # _class_name, _diffusers_version, _name_or_path
      continue
    if key not in DEFAULTS:
      raise _unsupported(source, key, value,
                         f"unknown key (a VQModel config has {sorted(DEFAULTS)})")
    out[key] = tuple(value) if isinstance(value, list) else value

  def positive_int(key: str, minimum: int = 1) -> int:
    value = out[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise _unsupported(source, key, value, f"must be an int >= {minimum}")
    return value

  for key in ("in_channels", "out_channels", "latent_channels",
              "norm_num_groups"):
    positive_int(key)
  positive_int("layers_per_block")
  positive_int("num_vq_embeddings", 2)
  if out["out_channels"] != out["in_channels"]:
    raise _unsupported(source, "out_channels", out["out_channels"],
                       f"must equal in_channels={out['in_channels']} (our "
                       "tokenizer decodes to its input's channels)")
  if out["vq_embed_dim"] is None:
    out["vq_embed_dim"] = out["latent_channels"]
  if out["vq_embed_dim"] != out["latent_channels"]:
    raise _unsupported(source, "vq_embed_dim", out["vq_embed_dim"],
                       f"must be null or equal latent_channels="
                       f"{out['latent_channels']} (our quant_conv keeps the "
                       "width)")
  if out["act_fn"] not in ACTIVATIONS:
    raise _unsupported(source, "act_fn", out["act_fn"],
                       f"only {ACTIVATIONS}")
  if out["norm_type"] != "group":
    raise _unsupported(source, "norm_type", out["norm_type"],
                       "only 'group' (no spatial norm)")
  if out["mid_block_add_attention"] is not False:
    raise _unsupported(source, "mid_block_add_attention",
                       out["mid_block_add_attention"],
                       "our tokenizer has no attention; only false (as "
                       "aMUSEd)")
  chans = out["block_out_channels"]
  if (not isinstance(chans, tuple) or not chans
      or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
             for c in chans)):
    raise _unsupported(source, "block_out_channels", chans,
                       "must be a non-empty list of positive ints")
  bad = [c for c in chans if c % chans[0]]
  if bad:
    raise _unsupported(source, "block_out_channels", list(chans),
                       f"every entry must be a multiple of the first "
                       f"({chans[0]}; our channel_mult is their ratio), "
                       f"{bad} are not")
  bad = [c for c in chans if c % out["norm_num_groups"]]
  if bad:
    raise _unsupported(source, "norm_num_groups", out["norm_num_groups"],
                       f"must divide every block_out_channels entry, not {bad}")
  for key, block in (("down_block_types", DOWN_BLOCK),
                     ("up_block_types", UP_BLOCK)):
    types = out[key]
    if not isinstance(types, tuple) or len(types) != len(chans):
      raise _unsupported(source, key, types,
                         f"needs one entry per block_out_channels entry "
                         f"({len(chans)})")
    for i, t in enumerate(types):
      if t != block:
        raise _unsupported(source, f"{key}[{i}]", t,
                           f"only {block} (no attention blocks)")
  return out


def tensors(config: dict[str, Any]) -> list[Tensor]:
  """Every tensor of a VQModel's state dict, in diffusers' order of modules.

  `config` is a `normalize_config` result.
  """
  chans = config["block_out_channels"]
  levels = len(chans)
  per_level = config["layers_per_block"]
  latent = config["latent_channels"]
  embed = config["vq_embed_dim"]
  out: list[Tensor] = []

  def conv(key: str, ours: str, cin: int, cout: int, k: int) -> None:
    fan_in = cin * k * k
    out.append(Tensor(f"{key}.weight", (cout, cin, k, k), f"{ours}/kernel",
                      CONV_KERNEL, fan_in))
    out.append(Tensor(f"{key}.bias", (cout,), f"{ours}/bias", CONV_BIAS,
                      fan_in))

  def norm(key: str, ours: str, c: int) -> None:
    out.append(Tensor(f"{key}.weight", (c,), f"{ours}/scale", NORM_SCALE))
    out.append(Tensor(f"{key}.bias", (c,), f"{ours}/bias", NORM_BIAS))

  def resnet(key: str, ours: str, cin: int, cout: int) -> None:
    norm(f"{key}.norm1", f"{ours}/norm1", cin)
    conv(f"{key}.conv1", f"{ours}/conv1", cin, cout, 3)
    norm(f"{key}.norm2", f"{ours}/norm2", cout)
    conv(f"{key}.conv2", f"{ours}/conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{key}.conv_shortcut", f"{ours}/skip", cin, cout, 1)

  # Encoder: our `blocks` list holds resnets and downsamplers in order.
  conv("encoder.conv_in", "encoder/conv_in", config["in_channels"], chans[0],
       3)
  n, ch = 0, chans[0]
  for i in range(levels):
    for j in range(per_level):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder/blocks/{n}",
             ch, chans[i])
      ch, n = chans[i], n + 1
    if i < levels - 1:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv",
           f"encoder/blocks/{n}/conv", ch, ch, 3)
      n += 1
  for j in range(MID_BLOCKS):
    resnet(f"encoder.mid_block.resnets.{j}", f"encoder/blocks/{n}", ch, ch)
    n += 1
  norm("encoder.conv_norm_out", "encoder/norm_out", ch)
  conv("encoder.conv_out", "encoder/conv_out", ch, latent, 3)
  conv("quant_conv", "encoder/quant_conv", latent, embed, 1)
  out.append(Tensor("quantize.embedding.weight",
                    (config["num_vq_embeddings"], embed), "quantizer/codebook",
                    CODEBOOK))
  # Decoder: mid blocks first, then the levels coarsest first.
  conv("post_quant_conv", "decoder/post_quant_conv", embed, latent, 1)
  ch = chans[-1]
  conv("decoder.conv_in", "decoder/conv_in", latent, ch, 3)
  n = 0
  for j in range(MID_BLOCKS):
    resnet(f"decoder.mid_block.resnets.{j}", f"decoder/blocks/{n}", ch, ch)
    n += 1
  for i in range(levels):
    for j in range(per_level + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder/blocks/{n}", ch,
             chans[levels - 1 - i])
      ch, n = chans[levels - 1 - i], n + 1
    if i < levels - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv",
           f"decoder/blocks/{n}/conv", ch, ch, 3)
      n += 1
  norm("decoder.conv_norm_out", "decoder/norm_out", ch)
  conv("decoder.conv_out", "decoder/conv_out", ch, config["out_channels"], 3)
  return out


def random_state_dict(config: dict[str, Any] | None = None, seed: int = 0,
                      codebook_std: float = CODEBOOK_STD
                      ) -> dict[str, np.ndarray]:
  """A seeded random state dict in diffusers' exact keys and shapes.

  Convolutions as PyTorch initialises them by default (weights and biases
  uniform in +-1/sqrt(fan_in)); GroupNorm scales 1 + N(0, 0.1^2) and biases
  N(0, 0.1^2), so a wrong scale/bias mapping shows; the codebook
  N(0, codebook_std^2). Deterministic in (`config`, `seed`) across machines:
  numpy's PCG64 in float64, rounded to float32.

  Args:
    config: A diffusers VQModel config (default: `AMUSED_CONFIG`).
    seed: The seed.
    codebook_std: Scale of the codes; see `CODEBOOK_STD`.
  """
  layout = tensors(normalize_config(AMUSED_CONFIG if config is None
                                    else config))
  rng = np.random.default_rng(seed)
  sd = {}
  for t in layout:
    if t.kind in (CONV_KERNEL, CONV_BIAS):
      bound = 1.0 / np.sqrt(t.fan_in)
      value = rng.uniform(-bound, bound, t.shape)
    elif t.kind == NORM_SCALE:
      value = 1.0 + 0.1 * rng.standard_normal(t.shape)
    elif t.kind == NORM_BIAS:
      value = 0.1 * rng.standard_normal(t.shape)
    else:
      value = codebook_std * rng.standard_normal(t.shape)
    sd[t.key] = value.astype(np.float32)
  return sd
