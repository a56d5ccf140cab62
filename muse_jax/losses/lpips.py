"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 backbone.

The tokenizer's perceptual loss: both images go through VGG16's five
`relu*_*` stages, each stage's features are unit-normalised over channels,
their squared difference is weighted per channel by the calibrated linear
heads, averaged over space and summed over stages. Numerics follow the
reference `lpips` package (`LPIPS(net="vgg", version="0.1")`, eval mode):
the same input scaling, eps, and layer order, so a torchvision VGG16 state
dict and the package's `vgg.pth` heads give the same distances.

Weights: the heads ship inside the `lpips` PyPI package (`heads_path()`
finds them; small legacy torch files read without torch); the VGG16
backbone is a torchvision state dict (`vgg16-*.pth`) the user supplies.
The network is frozen: the tokenizer's task passes it to the step as an
argument. Images are float NHWC in [-1, 1], like the tokenizer's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.interop import torch_files
from muse_jax.losses import vgg16

# The reference's ScalingLayer: (x - shift) / scale on [-1, 1] inputs.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10
_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class LpipsConfig:
  dtype: str = "float32"  # Compute dtype of the convolutions.


class Lpips(nnx.Module):
  """LPIPS(x, y) -> [B] distances; x, y float [B, H, W, 3] in [-1, 1]."""

  def __init__(self, cfg: LpipsConfig = LpipsConfig(), *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                 _KERNEL_AXES)
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(),
                                      ("conv_out",))
    convs, heads, ch = [], [], 3
    for stage in vgg16.STAGES:
      for out in stage:
        convs.append(nnx.Conv(ch, out, (3, 3), padding=((1, 1), (1, 1)),
                              dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=init, bias_init=bias_init,
                              rngs=rngs))
        ch = out
      heads.append(nnx.Param(jnp.full((ch,), 1.0 / ch, jnp.float32)))
    self.convs = nnx.List(convs)
    self.heads = nnx.List(heads)

  def features(self, x: jax.Array) -> list[jax.Array]:
    """The five stages' channel-normalised features (float32)."""
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    h = ((x.astype(jnp.float32) - shift) / scale).astype(self.dtype)
    out, i = [], 0
    for s, stage in enumerate(vgg16.STAGES):
      if s:
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
      for _ in stage:
        h = jax.nn.relu(self.convs[i](h))
        i += 1
      f = h.astype(jnp.float32)
      norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
      out.append(f / (norm + _EPS))
    return out

  def per_layer(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """[B, 5]: each VGG stage's weighted, spatially averaged term."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS takes two [B, H, W, 3] images of one shape, "
                       f"got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < 16:
      raise ValueError(f"LPIPS needs images of at least 16x16 (VGG16 pools "
                       f"four times), got {x.shape[1]}x{x.shape[2]}")
    b = x.shape[0]
    feats = self.features(jnp.concatenate([x, y]))  # One pass for both.
    terms = [jnp.mean(jnp.square(f[:b] - f[b:]) @ head[...], axis=(1, 2))
             for f, head in zip(feats, self.heads)]
    return jnp.stack(terms, axis=1)

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """[B] LPIPS distances."""
    return jnp.sum(self.per_layer(x, y), axis=1)


def heads_path(version: str = "0.1") -> str:
  """The `vgg.pth` linear heads inside the installed `lpips` package."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the LPIPS heads come from the `lpips` package: "
        "pip install --no-deps lpips==0.1.4")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights",
                      f"v{version}", "vgg.pth")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no LPIPS v{version} VGG heads there")
  return path


def load_weights(model: Lpips, vgg: Mapping[str, np.ndarray],
                 heads: Mapping[str, np.ndarray]) -> None:
  """Copies a torchvision VGG16 state dict and the lpips heads into `model`.

  Raises ValueError naming the first missing or mis-shaped entry.
  """
  def take(sd, key, shape):
    if key not in sd:
      raise ValueError(f"missing {key!r} (have e.g. {sorted(sd)[:4]})")
    v = np.asarray(sd[key], np.float32)
    if v.shape != shape:
      raise ValueError(f"{key}: shape {v.shape}, expected {shape}")
    return v

  for conv, idx in zip(model.convs, vgg16.CONV_INDICES, strict=True):
    cin, cout = conv.in_features, conv.out_features
    w = take(vgg, f"features.{idx}.weight", (cout, cin, 3, 3))
    conv.kernel[...] = jnp.asarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO.
    conv.bias[...] = jnp.asarray(take(vgg, f"features.{idx}.bias", (cout,)))
  for i, head in enumerate(model.heads):
    c = head.shape[0]
    head[...] = jnp.asarray(
        take(heads, f"lin{i}.model.1.weight", (1, c, 1, 1)).reshape(c))


def from_files(vgg_path: str | os.PathLike,
               heads: str | os.PathLike | None = None,
               cfg: LpipsConfig = LpipsConfig()) -> Lpips:
  """LPIPS from a torchvision VGG16 file and the heads (default: package's)."""
  with nnx.use_eager_sharding(False):
    model = Lpips(cfg, rngs=nnx.Rngs(0))
  load_weights(model, torch_files.load(vgg_path),
               torch_files.load(heads or heads_path()))
  return model
