"""Loading CLIP text-tower checkpoints (Hugging Face and OpenCLIP layouts).

Split out of `clip` (the text tower and its encoder) so each reads in one
sitting; `clip` re-exports the public names here. The loader takes the
model as an argument, so this module needs `clip` only for type checking.

`load_clip_text_weights` fills a `clip.CLIPTextTransformer` (possibly
abstract, `nnx.eval_shape`) tensor by tensor from Hugging Face
`CLIPTextModel` / `CLIPTextModelWithProjection` / full `CLIPModel`
safetensors (single file or sharded index; the vision tower, its
projection and `logit_scale` are ignored), or from OpenCLIP state dicts
(`open_clip_model.safetensors`, or a torch `.bin`/`.pt`/`.pth` file read
without torch through `muse_jax.interop.torch_files`; `visual.*` ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import os
import pathlib
from typing import TYPE_CHECKING

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.interop import safetensors_files
from muse_jax.interop import torch_files

if TYPE_CHECKING:
  from muse_jax.text_encoders import clip

PathLike = str | os.PathLike[str]

# Weight files a model directory may hold, in the order they are looked for.
_WEIGHT_FILES = (
    safetensors_files.INDEX_FILE, safetensors_files.SINGLE_FILE,
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin", "pytorch_model.bin",
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")

_Convert = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor: its expected shape and the parameters it fills
  (several for OpenCLIP's fused q/k/v projection)."""

  shape: tuple[int, ...]
  targets: tuple[tuple[nnx.Param, _Convert], ...]


def _ident(a: np.ndarray) -> np.ndarray:
  return a


def _transpose(a: np.ndarray) -> np.ndarray:
  return a.T


def _norm_entries(name_w: str, name_b: str, norm, d: int
                  ) -> dict[str, Entry]:
  return {name_w: Entry((d,), ((norm.scale, _ident),)),
          name_b: Entry((d,), ((norm.bias, _ident),))}


def _attention_converters(d: int, heads: int
                          ) -> tuple[_Convert, _Convert, _Convert]:
  """torch Linear [out, in] -> our q/k/v kernels [D, H, K], biases [H, K]
  and output kernel [H, K, D]."""
  head_dim = d // heads
  return (lambda a: a.T.reshape(d, heads, head_dim),
          lambda a: a.reshape(heads, head_dim),
          lambda a: a.T.reshape(heads, head_dim, d))


def hf_layer_entries(layer: clip.CLIPLayer, prefix: str, d: int, f: int,
                     heads: int) -> dict[str, Entry]:
  """One transformer layer in HF's layout (`...layers.N.` = `prefix`):
  separate q/k/v/out projections, fc1/fc2, layer_norm1/2."""
  qkv_kernel, qkv_bias, out_kernel = _attention_converters(d, heads)
  attn = layer.attention
  entries = {}
  for name, proj in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
    entries[f"{prefix}self_attn.{name}_proj.weight"] = Entry(
        (d, d), ((proj.kernel, qkv_kernel),))
    entries[f"{prefix}self_attn.{name}_proj.bias"] = Entry(
        (d,), ((proj.bias, qkv_bias),))
  entries.update({
      f"{prefix}self_attn.out_proj.weight":
          Entry((d, d), ((attn.out.kernel, out_kernel),)),
      f"{prefix}self_attn.out_proj.bias":
          Entry((d,), ((attn.out.bias, _ident),)),
      f"{prefix}mlp.fc1.weight":
          Entry((f, d), ((layer.mlp.fc1.kernel, _transpose),)),
      f"{prefix}mlp.fc1.bias": Entry((f,), ((layer.mlp.fc1.bias, _ident),)),
      f"{prefix}mlp.fc2.weight":
          Entry((d, f), ((layer.mlp.fc2.kernel, _transpose),)),
      f"{prefix}mlp.fc2.bias": Entry((d,), ((layer.mlp.fc2.bias, _ident),)),
  })
  for n, norm in ((1, layer.attention_norm), (2, layer.mlp_norm)):
    entries.update(_norm_entries(f"{prefix}layer_norm{n}.weight",
                                 f"{prefix}layer_norm{n}.bias", norm, d))
  return entries


def open_clip_layer_entries(layer: clip.CLIPLayer, prefix: str, d: int,
                            f: int, heads: int) -> dict[str, Entry]:
  """One residual block in OpenAI's / OpenCLIP's layout (`prefix` =
  `...resblocks.N.`).

  The attention fuses q, k and v: `in_proj_weight` [3D, D] stacks their
  torch-layout weights (rows q, then k, then v), `in_proj_bias` [3D] their
  biases.
  """
  qkv_kernel, qkv_bias, out_kernel = _attention_converters(d, heads)
  part = lambda i, conv: (lambda a: conv(a[i * d:(i + 1) * d]))
  attn = layer.attention
  projs = (attn.query, attn.key, attn.value)
  entries = {
      f"{prefix}attn.in_proj_weight": Entry(
          (3 * d, d), tuple((proj.kernel, part(j, qkv_kernel))
                            for j, proj in enumerate(projs))),
      f"{prefix}attn.in_proj_bias": Entry(
          (3 * d,), tuple((proj.bias, part(j, qkv_bias))
                          for j, proj in enumerate(projs))),
      f"{prefix}attn.out_proj.weight":
          Entry((d, d), ((attn.out.kernel, out_kernel),)),
      f"{prefix}attn.out_proj.bias": Entry((d,), ((attn.out.bias, _ident),)),
      f"{prefix}mlp.c_fc.weight":
          Entry((f, d), ((layer.mlp.fc1.kernel, _transpose),)),
      f"{prefix}mlp.c_fc.bias": Entry((f,), ((layer.mlp.fc1.bias, _ident),)),
      f"{prefix}mlp.c_proj.weight":
          Entry((d, f), ((layer.mlp.fc2.kernel, _transpose),)),
      f"{prefix}mlp.c_proj.bias": Entry((d,), ((layer.mlp.fc2.bias, _ident),)),
  }
  for n, norm in ((1, layer.attention_norm), (2, layer.mlp_norm)):
    entries.update(_norm_entries(f"{prefix}ln_{n}.weight",
                                 f"{prefix}ln_{n}.bias", norm, d))
  return entries


def _hf_entries(model: clip.CLIPTextTransformer) -> dict[str, Entry]:
  """HF CLIPTextModel names -> entries."""
  cfg = model.config
  d, f = cfg.hidden_size, cfg.mlp_dim
  entries = {
      "text_model.embeddings.token_embedding.weight":
          Entry((cfg.vocab_size, d), ((model.token_embed.embedding, _ident),)),
      "text_model.embeddings.position_embedding.weight":
          Entry((cfg.max_position_embeddings, d),
                ((model.position_embed.embedding, _ident),)),
  }
  entries.update(_norm_entries("text_model.final_layer_norm.weight",
                               "text_model.final_layer_norm.bias",
                               model.final_norm, d))
  for i, layer in enumerate(model.layers):
    entries.update(hf_layer_entries(layer, f"text_model.encoder.layers.{i}.",
                                    d, f, cfg.num_heads))
  if model.projection is not None:
    entries["text_projection.weight"] = Entry(
        (cfg.projection_dim, d), ((model.projection.kernel, _transpose),))
  return entries


def _open_clip_entries(model: clip.CLIPTextTransformer) -> dict[str, Entry]:
  """OpenCLIP text-tower names -> entries (`text_projection` is a [D, P]
  matrix used as x @ P)."""
  cfg = model.config
  d, f = cfg.hidden_size, cfg.mlp_dim
  entries = {
      "token_embedding.weight":
          Entry((cfg.vocab_size, d), ((model.token_embed.embedding, _ident),)),
      "positional_embedding":
          Entry((cfg.max_position_embeddings, d),
                ((model.position_embed.embedding, _ident),)),
  }
  entries.update(_norm_entries("ln_final.weight", "ln_final.bias",
                               model.final_norm, d))
  for i, layer in enumerate(model.layers):
    entries.update(open_clip_layer_entries(
        layer, f"transformer.resblocks.{i}.", d, f, cfg.num_heads))
  if model.projection is not None:
    entries["text_projection"] = Entry(
        (d, cfg.projection_dim), ((model.projection.kernel, _ident),))
  return entries


# Tensors of full CLIP checkpoints that the text tower does not use.
_HF_IGNORED_PREFIXES = ("vision_model.", "visual_projection.")
_HF_IGNORED_KEYS = ("logit_scale", "text_model.embeddings.position_ids",
                    "text_projection.weight")
_OPEN_CLIP_IGNORED_PREFIXES = ("visual.",)
_OPEN_CLIP_IGNORED_KEYS = ("logit_scale", "logit_bias", "attn_mask",
                           "input_resolution", "context_length", "vocab_size",
                           "text_projection", "text_projection.weight",
                           "text_projection.bias")


def resolve_weights_file(path: PathLike) -> pathlib.Path:
  """A weights file, or the first of the known names in a directory.

  Raises:
    FileNotFoundError: naming the path (and, for a directory, the names
      looked for).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    for name in _WEIGHT_FILES:
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(
        f"no CLIP weights in {path}: looked for {', '.join(_WEIGHT_FILES)}")
  if not path.is_file():
    raise FileNotFoundError(f"CLIP weights file not found: {path}")
  return path


class TensorSource:
  """Names and shapes of a checkpoint's tensors, each read on demand."""

  def __init__(self, file: pathlib.Path):
    self.file = file
    if file.suffix in _TORCH_SUFFIXES:
      state = torch_files.load(file)
      # Training checkpoints wrap the state dict.
      for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
          state = state[key]
          break
      self._arrays = {k: v for k, v in state.items()}
      self._files = None
    elif file.suffix in (".safetensors", ".json"):
      self._files = safetensors_files.SafetensorsFiles(file)
      self._arrays = None
    else:
      raise ValueError(f"{file}: not a safetensors or torch checkpoint "
                       "(expected .safetensors, .json index, .bin, .pt or "
                       ".pth)")
    raw = list(self._files if self._files is not None else self._arrays)
    # DistributedDataParallel checkpoints prefix every name with "module.".
    strip = lambda k: k[len("module."):] if k.startswith("module.") else k
    self.names = {strip(k): k for k in raw}

  def shape(self, name: str) -> tuple[int, ...] | None:
    key = self.names[name]
    if self._files is not None:
      return self._files.shape(key)
    value = self._arrays[key]
    return tuple(value.shape) if isinstance(value, np.ndarray) else None

  def get(self, name: str) -> np.ndarray:
    key = self.names[name]
    if self._files is not None:
      return self._files[key]
    return self._arrays[key]


def detect_layout(source: TensorSource) -> str:
  names = source.names
  if any(n.startswith("text_model.") for n in names):
    return "hf"
  if "token_embedding.weight" in names:
    return "open_clip"
  if "text.token_embedding.weight" in names:
    # OpenCLIP's CustomTextCLIP keeps the text tower under "text.".
    source.names = {(n[len("text."):] if n.startswith("text.") else n): k
                    for n, k in names.items()}
    return "open_clip"
  raise ValueError(
      f"{source.file}: neither a Hugging Face CLIP checkpoint (no "
      "text_model.* tensors) nor an OpenCLIP one (no token_embedding.weight)")


def _is_float(dtype: np.dtype) -> bool:
  # bfloat16 (ml_dtypes) is not a numpy floating subtype; its kind is 'V'.
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def is_ignored(layout: str, name: str) -> bool:
  """Whether a full CLIP checkpoint's tensor is not the text tower's."""
  if layout == "hf":
    return name.startswith(_HF_IGNORED_PREFIXES) or name in _HF_IGNORED_KEYS
  return (name.startswith(_OPEN_CLIP_IGNORED_PREFIXES)
          or name in _OPEN_CLIP_IGNORED_KEYS or name.endswith(".attn_mask"))


def fill(source: TensorSource, entries: Mapping[str, Entry],
         ignored: Callable[[str], bool], what: str) -> None:
  """Checks `source` against `entries`, then fills their parameters.

  Every tensor is accounted for: anything missing, anything unexpected
  (not an entry and not `ignored`) and every shape that does not fit is
  named in one error before any weight is read. Tensors are then read,
  converted and placed one at a time (cast to each parameter's dtype,
  keeping its sharding), so the model may be abstract (`nnx.eval_shape`).

  Raises:
    ValueError: naming `what`, the file and every problem.
  """
  file = source.file
  missing = sorted(n for n in entries if n not in source.names)
  unexpected = sorted(n for n in source.names
                      if n not in entries and not ignored(n))
  problems = []
  if missing:
    problems.append(f"missing tensors {missing}")
  if unexpected:
    problems.append(f"unexpected tensors {unexpected}")
  for name, entry in entries.items():
    if name not in source.names:
      continue
    shape = source.shape(name)
    if shape != entry.shape:
      problems.append(f"shape mismatch for {name!r}: checkpoint {shape}, "
                      f"expected {entry.shape} for this config")
  if problems:
    raise ValueError(f"Cannot load {what} from {file}: "
                     + "; ".join(problems))

  for name, entry in entries.items():
    value = np.asarray(source.get(name))
    if not _is_float(value.dtype):
      raise ValueError(f"{file}: tensor {name!r} has non-float dtype "
                       f"{value.dtype}")
    for param, convert in entry.targets:
      # An abstract (nnx.eval_shape) model holds ShapeDtypeStructs; both
      # kinds carry the dtype and, when sharded, the placement.
      current = param.get_value()
      new = jnp.asarray(convert(value), dtype=current.dtype)
      placement = getattr(current, "sharding", None)
      param.set_value(jax.device_put(new, placement) if placement else new)


def text_entries(model: clip.CLIPTextTransformer, layout: str
                 ) -> dict[str, Entry]:
  """The text tower's tensors in `layout` ("hf" or "open_clip")."""
  return _hf_entries(model) if layout == "hf" else _open_clip_entries(model)


def load_clip_text_weights(model: clip.CLIPTextTransformer, path: PathLike
                           ) -> clip.CLIPTextTransformer:
  """Loads a CLIP text tower checkpoint into `model`, in place.

  The layout is recognised from the names: Hugging Face
  (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...) or OpenCLIP
  / OpenAI (`transformer.resblocks.N.attn.in_proj_weight`, ...; OpenAI's
  TorchScript archives included). The vision tower, the logit scale and
  buffers are skipped, and `text_projection` is skipped unless the model
  has a projection; everything else is checked and filled by `fill`.

  Args:
    model: the module to fill.
    path: a weights file (`.safetensors`, a sharded `*.index.json`, or a
      torch `.bin`/`.pt`/`.pth` state dict or TorchScript archive) or a
      directory holding one of model.safetensors(.index.json),
      open_clip_model.safetensors, open_clip_pytorch_model.bin or
      pytorch_model.bin.

  Returns:
    `model`, for chaining.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: an unreadable file, an unknown layout, or missing /
      unexpected / mis-shaped / non-float tensors, each named.
  """
  source = TensorSource(resolve_weights_file(path))
  layout = detect_layout(source)
  fill(source, text_entries(model, layout),
       lambda n: is_ignored(layout, n), f"CLIP ({layout}) text weights")
  return model
