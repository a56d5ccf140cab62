"""Loading T5 encoder checkpoints (Hugging Face safetensors and T5X).

Split out of `t5` (the config, model and encoder) so each reads in one
sitting; `t5` re-exports the public names here. The loader takes the model
as an argument, so this module needs `t5` only for type checking.

`load_t5_weights` fills a `t5.T5Encoder` (possibly abstract, built with
`nnx.eval_shape` or `sharding.abstract_state`) one tensor at a time from a
Hugging Face checkpoint (safetensors, single or sharded; a whole
T5ForConditionalGeneration loads, its decoder ignored) or a T5X checkpoint
(`muse_jax.interop.t5x_checkpoint`), stacking the rows of scanned layers.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os
import pathlib
from typing import Any, TYPE_CHECKING

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.interop import safetensors_files
from muse_jax.interop import t5x_checkpoint

if TYPE_CHECKING:
  from muse_jax.text_encoders import t5

PathLike = str | os.PathLike[str]

_Convert = Callable[[np.ndarray], np.ndarray]


def _ident(a: np.ndarray) -> np.ndarray:
  return a


def _transpose(a: np.ndarray) -> np.ndarray:
  return a.T


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One checkpoint tensor: the names that may hold it (the first present
  is read), the shape it has there, how to convert it, and the parameter
  it fills: whole, or (`layer` set) row `layer` of a parameter stacked
  over the layers (`scan_layers`)."""

  names: tuple[str, ...]
  shape: tuple[int, ...]
  param: nnx.Param
  convert: _Convert
  layer: int | None = None


def _encoder_layers(model: t5.T5Encoder
                    ) -> list[tuple[int, t5.T5Layer, int | None]]:
  """(index, module holding its parameters, row in them or None) of each
  layer: the layer itself, or the stacked module and its row."""
  if model.config.scan_layers:
    return [(i, model.layers, i) for i in range(model.config.num_layers)]
  return [(i, layer, None) for i, layer in enumerate(model.layers)]


def _hf_entries(model: t5.T5Encoder) -> list[_Entry]:
  """transformers' T5 names (torch Linear weights are [out, in])."""
  cfg = model.config
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
  qkv = lambda a: a.T.reshape(d, h, k)
  out = lambda a: a.T.reshape(h, k, d)
  entries = [
      # The encoder's table is tied to `shared`; files keep either or both.
      _Entry(("encoder.embed_tokens.weight", "shared.weight"),
             (cfg.vocab_size, d), model.token_embed.embedding, _ident),
      _Entry(("encoder.block.0.layer.0.SelfAttention."
              "relative_attention_bias.weight",),
             (cfg.relative_attention_num_buckets, h),
             model.relative_bias.embedding, _ident),
      _Entry(("encoder.final_layer_norm.weight",), (d,),
             model.final_norm.scale, _ident),
  ]
  for i, layer, row in _encoder_layers(model):
    p = f"encoder.block.{i}.layer."
    attn, mlp = layer.attention, layer.mlp
    for name, proj in (("q", attn.query), ("k", attn.key),
                       ("v", attn.value)):
      entries.append(_Entry((f"{p}0.SelfAttention.{name}.weight",),
                            (h * k, d), proj.kernel, qkv, row))
    entries += [
        _Entry((f"{p}0.SelfAttention.o.weight",), (d, h * k),
               attn.out.kernel, out, row),
        _Entry((f"{p}0.layer_norm.weight",), (d,),
               layer.attention_norm.scale, _ident, row),
        _Entry((f"{p}1.DenseReluDense.wo.weight",), (d, f), mlp.wo.kernel,
               _transpose, row),
        _Entry((f"{p}1.layer_norm.weight",), (d,), layer.mlp_norm.scale,
               _ident, row),
    ]
    ups = ((("wi", mlp.wi),) if mlp.wi is not None
           else (("wi_0", mlp.wi_0), ("wi_1", mlp.wi_1)))
    for name, proj in ups:
      entries.append(_Entry((f"{p}1.DenseReluDense.{name}.weight",), (f, d),
                            proj.kernel, _transpose, row))
  return entries


def _t5x_entries(model: t5.T5Encoder) -> list[_Entry]:
  """T5X's names (`t5x/examples/t5/network.py`; flax kernels [in, out],
  multi-axis features flattened)."""
  cfg = model.config
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
  qkv = lambda a: a.reshape(d, h, k)
  out = lambda a: a.reshape(h, k, d)
  entries = [
      _Entry(("target.token_embedder.embedding",), (cfg.vocab_size, d),
             model.token_embed.embedding, _ident),
      # [heads, buckets] in T5X.
      _Entry(("target.encoder.relpos_bias.rel_embedding",),
             (h, cfg.relative_attention_num_buckets),
             model.relative_bias.embedding, _transpose),
      _Entry(("target.encoder.encoder_norm.scale",), (d,),
             model.final_norm.scale, _ident),
  ]
  for i, layer, row in _encoder_layers(model):
    p = f"target.encoder.layers_{i}."
    attn, mlp = layer.attention, layer.mlp
    for name, proj in (("query", attn.query), ("key", attn.key),
                       ("value", attn.value)):
      entries.append(_Entry((f"{p}attention.{name}.kernel",), (d, h * k),
                            proj.kernel, qkv, row))
    entries += [
        _Entry((f"{p}attention.out.kernel",), (h * k, d), attn.out.kernel,
               out, row),
        _Entry((f"{p}pre_attention_layer_norm.scale",), (d,),
               layer.attention_norm.scale, _ident, row),
        _Entry((f"{p}mlp.wo.kernel",), (f, d), mlp.wo.kernel, _ident, row),
        _Entry((f"{p}pre_mlp_layer_norm.scale",), (d,),
               layer.mlp_norm.scale, _ident, row),
    ]
    ups = ((("wi", mlp.wi),) if mlp.wi is not None
           else (("wi_0", mlp.wi_0), ("wi_1", mlp.wi_1)))
    for name, proj in ups:
      entries.append(_Entry((f"{p}mlp.{name}.kernel",), (d, f), proj.kernel,
                            _ident, row))
  return entries


# Tensors of whole encoder-decoder checkpoints that the encoder never uses.
_HF_IGNORED_PREFIXES = ("decoder.", "lm_head.")
_T5X_IGNORED_PREFIXES = ("target.decoder.",)


def _is_float(dtype: np.dtype) -> bool:
  # bfloat16 (ml_dtypes) is not a numpy floating subtype.
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def open_checkpoint(path: PathLike) -> tuple[Any, str]:
  """(tensor source, "hf" or "t5x") of a checkpoint path.

  `path` is a T5X checkpoint directory (its `target.*` zarr arrays, or a
  directory of `checkpoint_<step>` ones), or a Hugging Face model directory
  / `.safetensors` file / `model.safetensors.index.json`.

  Raises:
    FileNotFoundError: nothing at `path`, or no weights file in it.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"T5 checkpoint not found: {path}")
  if t5x_checkpoint.is_t5x_checkpoint(path):
    return t5x_checkpoint.T5XCheckpoint(path), "t5x"
  if path.is_dir() and not any(
      (path / n).is_file() for n in (safetensors_files.SINGLE_FILE,
                                     safetensors_files.INDEX_FILE)):
    torch_files = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if torch_files:
      # Some Hub repos (google/t5-v1_1-xxl) have only torch pickles, one of
      # 45 GB there; they are not read here.
      raise FileNotFoundError(
          f"{path} holds {torch_files[0]} but no "
          f"{safetensors_files.SINGLE_FILE} or {safetensors_files.INDEX_FILE}"
          "; convert it once with transformers (T5EncoderModel."
          "from_pretrained(dir).save_pretrained(out, safe_serialization="
          "True)) or use the model's T5X checkpoint")
  return safetensors_files.SafetensorsFiles(path), "hf"


def load_t5_weights(model: t5.T5Encoder, path: PathLike
                    ) -> t5.T5Encoder:
  """Loads a T5 checkpoint into `model`, in place.

  The format is recognised from `path` (see `open_checkpoint`). Every
  tensor is accounted for: a decoder and LM head (whole encoder-decoder
  checkpoints) are skipped; anything else unexpected, anything missing and
  every shape that does not fit this config is named in one error before
  any weight is read. Tensors are then read, converted to our layouts and
  placed one at a time (cast to each parameter's dtype, keeping its
  sharding; a parameter stacked over the layers is assembled on the host
  from its layers' tensors, read one at a time, then placed), so `model`
  may be abstract (`nnx.eval_shape`, or
  `sharding.abstract_state`, whose shardings place each tensor directly
  on its devices).

  Returns:
    `model`, for chaining.

  Raises:
    FileNotFoundError: no checkpoint at `path` (the message names it).
    ValueError: an unreadable file, or missing / unexpected / mis-shaped /
      non-float tensors, each named.
  """
  source, kind = open_checkpoint(path)
  where = getattr(source, "path", path)
  if kind == "hf":
    entries, ignored = _hf_entries(model), _HF_IGNORED_PREFIXES
  else:
    entries, ignored = _t5x_entries(model), _T5X_IGNORED_PREFIXES

  chosen: list[tuple[str, _Entry]] = []
  missing, mismatched = [], []
  for entry in entries:
    name = next((n for n in entry.names if n in source), None)
    if name is None:
      missing.append(" or ".join(repr(n) for n in entry.names))
      continue
    chosen.append((name, entry))
    shape = tuple(source.shape(name))
    if shape != entry.shape:
      mismatched.append(f"shape mismatch for {name!r}: checkpoint {shape}, "
                        f"expected {entry.shape} for this config")
  known = {n for entry in entries for n in entry.names}
  unexpected = sorted(n for n in source
                      if n not in known and not n.startswith(ignored))
  problems = []
  if missing:
    problems.append(f"missing tensors [{', '.join(missing)}]")
  if unexpected:
    problems.append(f"unexpected tensors {unexpected}")
  problems += mismatched
  if problems:
    raise ValueError(f"Cannot load T5 ({kind}) weights from {where}: "
                     + "; ".join(problems))

  def read(name: str, entry: _Entry) -> np.ndarray:
    value = np.asarray(source[name])
    if not _is_float(value.dtype):
      raise ValueError(f"{where}: tensor {name!r} has non-float dtype "
                       f"{value.dtype}")
    return entry.convert(value)

  def place(param: nnx.Param, new: Any) -> None:
    # An abstract model holds ShapeDtypeStructs; both kinds carry the dtype
    # and, when sharded, the placement.
    placement = getattr(param.get_value(), "sharding", None)
    param.set_value(jax.device_put(new, placement) if placement
                    else jnp.asarray(new))

  # A stacked parameter's rows, one per layer's tensor, by parameter.
  stacked: dict[int, list[tuple[str, _Entry]]] = {}
  for name, entry in chosen:
    if entry.layer is not None:
      stacked.setdefault(id(entry.param), []).append((name, entry))
      continue
    current = entry.param.get_value()
    place(entry.param, jnp.asarray(read(name, entry), dtype=current.dtype))
  for rows in stacked.values():
    # Assembled on the host a layer at a time (each cast to the parameter's
    # dtype as it is read), then placed once with the stack's sharding.
    param = rows[0][1].param
    current = param.get_value()
    host = np.empty(current.shape, dtype=current.dtype)
    filled = np.zeros(current.shape[0], dtype=bool)
    for name, entry in rows:
      host[entry.layer] = np.asarray(read(name, entry)).astype(
          current.dtype, copy=False)
      filled[entry.layer] = True
    if not filled.all():  # The entries list every row; a bug otherwise.
      raise AssertionError(f"stacked rows {np.flatnonzero(~filled)} of "
                           f"{rows[0][0]!r}'s parameter were not read")
    place(param, host)
  return model
