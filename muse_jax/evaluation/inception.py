"""The FID Inception network in NNX: images -> pool3 features [B, 2048].

The network pytorch-fid computes FID with (`inception_layout`): torch-
vision's InceptionV3 modules with the TF graph's patches -- average pools
that leave padding out of the mean (blocks 5b-5d, 6b-6e, 7b) and a max
pool in block 7c -- up to the final average pool. Weights come from
pytorch-fid's file (`from_file`, read without PyTorch); no package ships
them, so a missing file is an error naming it and where it comes from.

Inputs follow pytorch-fid's `InceptionV3(resize_input=True,
normalize_input=True)`: images in [0, 1] are resized to 299 x 299 (`fid.
resize`: bilinear as `F.interpolate(align_corners=False)`, no antialias)
and mapped to [-1, 1] here. Layout NHWC; kernels HWIO; batch-norm in
inference form, in float32. Parameters carry the convolution logical axes
(`conv_h`, `conv_w`, `conv_in`, `conv_out`), so the rules table places
them; feature extraction shards the batch over the data axis.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from muse_jax.evaluation import inception_layout as layout
from muse_jax.interop import torch_files

_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  """Attributes:
    dtype: compute dtype of the convolutions ("float32" reproduces the
      reference; "bfloat16" is faster on CPUs with bf16 units). Batch norm,
      pooling and the features are float32.
  """

  dtype: str = "float32"


class ConvBN(nnx.Module):
  """torchvision's BasicConv2d: conv (no bias), batch norm (eps 1e-3), ReLU."""

  def __init__(self, conv: layout.Conv, dtype: jnp.dtype):
    kh, kw = conv.kernel
    self.spec = conv
    self.dtype = dtype
    self.kernel = nnx.Param(jnp.zeros((kh, kw, conv.cin, conv.cout),
                                      jnp.float32), sharding=_KERNEL_AXES)
    zeros = jnp.zeros((conv.cout,), jnp.float32)
    self.scale = nnx.Param(jnp.ones_like(zeros), sharding=("conv_out",))
    self.bias = nnx.Param(zeros, sharding=("conv_out",))
    self.mean = nnx.Param(zeros, sharding=("conv_out",))
    self.var = nnx.Param(jnp.ones_like(zeros), sharding=("conv_out",))

  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.spec.padding
    y = lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.spec.stride,) * 2,
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)
    inv = self.scale[...] * lax.rsqrt(self.var[...] + layout.BN_EPS)
    return jax.nn.relu((y - self.mean[...]) * inv + self.bias[...])


def _windows(x: jax.Array, size: int, stride: int, pad: int,
             fill: float) -> list[jax.Array]:
  """The size x size shifted (strided) views of `x` [B, H, W, C] whose
  elementwise max or sum is the pool: XLA:CPU runs these as one fused
  elementwise loop, several times faster than `reduce_window`."""
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                constant_values=fill)
  h, w = x.shape[1:3]
  oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
  return [lax.slice(x, (0, i, j, 0),
                    (x.shape[0], i + (oh - 1) * stride + 1,
                     j + (ow - 1) * stride + 1, x.shape[3]),
                    (1, stride, stride, 1))
          for i in range(size) for j in range(size)]


def max_pool(x: jax.Array, size: int, stride: int, pad: int = 0) -> jax.Array:
  """Max pooling, padding with -inf (PyTorch's `max_pool2d`)."""
  views = _windows(x, size, stride, pad, -jnp.inf)
  out = views[0]
  for v in views[1:]:
    out = jnp.maximum(out, v)
  return out


def avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, the padding left out of each mean (TF's
  pooling; PyTorch's `count_include_pad=False`)."""
  views = _windows(x, 3, 1, 1, 0.0)
  total = views[0]
  for v in views[1:]:
    total = total + v
  h, w = x.shape[1:3]
  rows = np.minimum(np.arange(h) + 2, h) - np.maximum(np.arange(h) - 1, 0)
  cols = np.minimum(np.arange(w) + 2, w) - np.maximum(np.arange(w) - 1, 0)
  inv = (1.0 / np.outer(rows, cols)).astype(np.float32)  # Static shapes.
  return total * jnp.asarray(inv)[None, :, :, None]


class Mixed(nnx.Module):
  """One mixed block (kinds A-E of `inception_layout.BLOCKS`)."""

  def __init__(self, kind: str, cin: int, arg: int, dtype: jnp.dtype):
    self.kind = kind
    for conv in layout.block_convs(kind, cin, arg):
      setattr(self, conv.name, ConvBN(conv, dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kind
    if k == "A":
      b5 = self.branch5x5_2(self.branch5x5_1(x))
      b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
      outs = [self.branch1x1(x), b5, b3,
              self.branch_pool(avg_pool_3x3(x))]
    elif k == "B":
      b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
      outs = [self.branch3x3(x), b3, max_pool(x, 3, 2)]
    elif k == "C":
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      d = self.branch7x7dbl_1(x)
      for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3,
                   self.branch7x7dbl_4, self.branch7x7dbl_5):
        d = conv(d)
      outs = [self.branch1x1(x), b7, d, self.branch_pool(avg_pool_3x3(x))]
    elif k == "D":
      b3 = self.branch3x3_2(self.branch3x3_1(x))
      b7 = self.branch7x7x3_1(x)
      for conv in (self.branch7x7x3_2, self.branch7x7x3_3,
                   self.branch7x7x3_4):
        b7 = conv(b7)
      outs = [b3, b7, max_pool(x, 3, 2)]
    else:  # E1, E2
      b3 = self.branch3x3_1(x)
      b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)],
                           axis=-1)
      d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)],
                          axis=-1)
      pool = avg_pool_3x3(x) if k == "E1" else max_pool(x, 3, 1, 1)
      outs = [self.branch1x1(x), b3, d, self.branch_pool(pool)]
    return jnp.concatenate(outs, axis=-1)


class InceptionV3(nnx.Module):
  """[B, 299, 299, 3] in [0, 1] -> [B, 2048] pool3 features (float32)."""

  def __init__(self, cfg: InceptionConfig = InceptionConfig()):
    dtype = jnp.dtype(cfg.dtype)
    for conv in layout.STEM:
      setattr(self, conv.name, ConvBN(conv, dtype))
    for name, kind, cin, arg in layout.BLOCKS:
      setattr(self, name, Mixed(kind, cin, arg, dtype))

  def __call__(self, images: jax.Array) -> jax.Array:
    x = 2.0 * images.astype(jnp.float32) - 1.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 3, 2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
    for name, _, _, _ in layout.BLOCKS:
      x = getattr(self, name)(x)
    return jnp.mean(x, axis=(1, 2))


def _conv_modules(model: InceptionV3):
  for conv in layout.all_convs():
    node = model
    for part in conv.name.split("."):
      node = getattr(node, part)
    yield conv, node


def load_weights(model: InceptionV3, sd: dict[str, np.ndarray]) -> None:
  """Copies a state dict in pytorch-fid's layout into `model`.

  Raises ValueError naming the first missing or mis-shaped entry (the
  classifier, `fc.*`, is not needed and not read).
  """
  def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in sd:
      raise ValueError(f"Inception weights: missing {key!r} (not "
                       f"pytorch-fid's {layout.WEIGHTS_FILE}?)")
    v = np.asarray(sd[key], np.float32)
    if v.shape != shape:
      raise ValueError(f"Inception weights: {key} has shape {v.shape}, "
                       f"expected {shape}")
    return v

  for conv, module in _conv_modules(model):
    kh, kw = conv.kernel
    w = take(f"{conv.name}.conv.weight", (conv.cout, conv.cin, kh, kw))
    module.kernel[...] = jnp.asarray(w.transpose(2, 3, 1, 0))  # -> HWIO
    for ours, theirs in (("scale", "weight"), ("bias", "bias"),
                         ("mean", "running_mean"), ("var", "running_var")):
      getattr(module, ours)[...] = jnp.asarray(
          take(f"{conv.name}.bn.{theirs}", (conv.cout,)))


def missing_weights_message(path: str) -> str:
  return (f"FID needs pytorch-fid's Inception weights, the standard "
          f"{layout.WEIGHTS_FILE} (from {layout.WEIGHTS_URL}); {path!r} "
          "does not exist. Download it and pass its path with "
          "--inception_path (the eval CLI) or "
          "--config.eval.inception_path (the main job).")


def from_file(path: str | os.PathLike,
              cfg: InceptionConfig = InceptionConfig()) -> InceptionV3:
  """The network with pytorch-fid's weights file (or one in its layout)."""
  path = os.fspath(path)
  if not path or not os.path.exists(path):
    raise FileNotFoundError(missing_weights_message(path))
  with nnx.use_eager_sharding(False):
    model = InceptionV3(cfg)
  load_weights(model, torch_files.load(path))
  return model
