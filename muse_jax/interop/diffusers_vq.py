"""Reads a diffusers `VQModel` directory (e.g. aMUSEd's tokenizer) into ours.

A diffusers model directory holds `config.json` and its weights,
`diffusion_pytorch_model.safetensors` (or the older `torch.save` file
`diffusion_pytorch_model.bin`, read without torch by
`muse_jax.interop.torch_files`). A pipeline directory (aMUSEd's
`amused/amused-256`) holds the tokenizer in its `vqvae/` folder; either
path works.

`read` validates the config (`diffusers_vq_layout.normalize_config`: only
the layouts our `VQModel` reproduces exactly; anything else is an error
naming the key and value), builds the matching `VQConfig`, and maps every
tensor to our parameter path (conv kernels OIHW -> HWIO). Every tensor the
config implies must be present with its shape, and every tensor of the file
must be used; errors name the key and both shapes.

The `VQConfig` (`vq_config`) is diffusers' network exactly: base channels
`block_out_channels[0]` with their ratios as multipliers,
`layers_per_block` residual blocks per encoder level and one more per
decoder level, two bottleneck blocks on each side, a 3x3 encoder output
convolution, 1x1 `quant_conv` / `post_quant_conv`, the Euclidean
nearest-code lookup, stride-2 convolutions padded (0, 1), nearest
upsampling, GroupNorm eps 1e-6 and swish.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from muse_jax.interop import diffusers_vq_layout as layout
from muse_jax.interop import torch_files
from muse_jax.models import vqgan

PathLike = str | os.PathLike[str]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"
PIPELINE_SUBFOLDER = "vqvae"


def model_dir(path: PathLike) -> str:
  """The directory holding the VQModel's config.json: `path` itself or,
  for a pipeline, its `vqvae/` folder."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such directory (expected a diffusers "
                            "VQModel directory with config.json)")
  for candidate in (path, os.path.join(path, PIPELINE_SUBFOLDER)):
    if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
      return candidate
  raise FileNotFoundError(
      f"{path}: no {CONFIG_FILE} here or in {PIPELINE_SUBFOLDER}/ (expected a "
      f"diffusers VQModel directory); it holds {sorted(os.listdir(path))}")


def read_config(directory: PathLike) -> dict[str, Any]:
  """The normalized diffusers config of a VQModel directory."""
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  return layout.normalize_config(raw, source=path)


def vq_config(config: dict[str, Any]) -> vqgan.VQConfig:
  """Our VQConfig of a normalized diffusers config."""
  chans = config["block_out_channels"]
  return vqgan.VQConfig(
      in_channels=config["in_channels"],
      base_channels=chans[0],
      channel_mult=tuple(c // chans[0] for c in chans),
      num_res_blocks=config["layers_per_block"],
      decoder_num_res_blocks=config["layers_per_block"] + 1,
      mid_res_blocks=layout.MID_BLOCKS,
      codebook_size=config["num_vq_embeddings"],
      code_dim=config["latent_channels"],
      num_groups=config["norm_num_groups"],
      quantizer="euclidean",
      conv_bias=True,
      downsample="conv",
      shortcut="input",
      encoder_out_kernel=3,
      quant_conv=True)


def read_weights(directory: PathLike) -> tuple[dict[str, np.ndarray], str]:
  """(state dict, its file) of a VQModel directory: safetensors, else .bin."""
  directory = os.fspath(directory)
  path = os.path.join(directory, SAFETENSORS_FILE)
  if os.path.isfile(path):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    try:
      return dict(st_numpy.load_file(path)), path
    except Exception as e:  # safetensors raises its own error types.
      raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
  path = os.path.join(directory, BIN_FILE)
  if os.path.isfile(path):
    return dict(torch_files.load(path)), path
  raise FileNotFoundError(
      f"{directory}: no {SAFETENSORS_FILE} or {BIN_FILE}; it holds "
      f"{sorted(os.listdir(directory))}")


def convert(config: dict[str, Any], state: dict[str, Any],
            source: str = "state dict") -> dict[str, np.ndarray]:
  """diffusers' state dict -> {our parameter path: float32 array}.

  Raises:
    ValueError: a tensor is missing, unexpected, or has the wrong shape for
      `config` (naming the key and both shapes).
  """
  tensors = layout.tensors(config)
  expected = {t.key for t in tensors}
  missing = [t.key for t in tensors if t.key not in state]
  unused = sorted(set(state) - expected)
  if missing or unused:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} tensor(s) the config needs: "
                   + ", ".join(missing[:8])
                   + (" ..." if len(missing) > 8 else ""))
    if unused:
      parts.append(f"{len(unused)} tensor(s) the config has no place for: "
                   + ", ".join(unused[:8]) + (" ..." if len(unused) > 8
                                              else ""))
    raise ValueError(f"{source}: " + "; ".join(parts))
  flat = {}
  for t in tensors:
    value = np.asarray(state[t.key])
    if tuple(value.shape) != t.shape:
      raise ValueError(
          f"{source}: tensor {t.key!r} has shape {tuple(value.shape)}, but "
          f"the config needs {t.shape} (our {t.ours} {t.our_shape})")
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"{source}: tensor {t.key!r} has dtype {value.dtype}, "
                       "expected floating point")
    flat[t.ours] = np.ascontiguousarray(t.to_ours(value.astype(np.float32)))
  return flat


def read(path: PathLike) -> tuple[vqgan.VQConfig, dict[str, np.ndarray]]:
  """A diffusers VQModel directory as (VQConfig, {our path: array})."""
  directory = model_dir(path)
  config = read_config(directory)
  cfg = vq_config(config)
  state, source = read_weights(directory)
  return cfg, convert(config, state, source)
