"""The T5 encoder (T5 v1.1, Flan-T5, T5-XXL) behind the text-encoder API.

Muse conditions its masked transformers on the per-token hidden states of a
frozen T5-XXL encoder (4.7B weights, 4096 wide). This module re-creates the
encoder of T5 v1.1 and its descendants in Flax NNX so those states can be
computed on a TPU/GPU mesh, with the weights sharded by their logical axis
names ("vocab", "embed", "heads", "kv", "mlp") over the fsdp and tensor
axes, and loaded one tensor at a time into an abstract model (XXL is never
randomly initialised, nor held whole on one host or device).

The architecture, as T5 defines it (and unlike BERT-style encoders):

* pre-norm layers whose norm is an RMS norm (no mean subtraction, no bias;
  eps 1e-6; computed in float32 here);
* self-attention without biases and *without* the 1/sqrt(d_kv) logit
  scale (T5 folds it into the query initialisation; T5X divides the query
  kernel's init by sqrt(d_kv) and never scales at run time);
* no absolute positions: a learned bias per head over bucketed relative
  offsets (half the buckets for keys after the query, half for the rest;
  exact offsets near the query, log-spaced ones up to `max_distance`),
  held by the first layer and added to every layer's logits;
* a gated-GELU feed-forward in v1.1 (`wo(gelu_tanh(wi_0 x) * wi_1 x)`);
  the original T5's ReLU MLP (`wo(relu(wi x))`) is supported too;
* a final RMS norm.

Numerics: parameters live in `param_dtype` and matmuls run in `dtype`; the
residual stream, norms, logits and softmax stay float32 (T5 is known to
overflow in half precision otherwise). Padded keys get a large negative
logit bias.

Pieces:

* `T5Config` / `PRESETS`: sizes, from transformers' config.json or by name.
* `T5Encoder`: the NNX module, `(ids, mask) -> [B, L, d_model]` float32;
  with `scan_layers` its layers are one module with parameters stacked
  over a leading "layers" axis, applied with `jax.lax.scan` (the default
* `load_t5_weights` (in `t5_weights`): fills it from a Hugging Face
  checkpoint (safetensors, single or sharded; a whole
  T5ForConditionalGeneration loads, its decoder ignored) or a T5X
  checkpoint (`muse_jax.interop.t5x_checkpoint`).
* `T5Tokenizer` (in `t5_tokenizer`): T5's sentencepiece model (EOS
  appended), through seqio when that package is installed.
* `T5TextEncoder`: the `text_encoders.base.TextEncoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import math
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import sharding
from muse_jax.models import layers
from muse_jax.text_encoders import base
from muse_jax.text_encoders import t5_tokenizer
from muse_jax.text_encoders import t5_weights

PathLike = str | os.PathLike[str]

# Re-exported: the weight loader and the tokenizer have their own modules.
open_checkpoint = t5_weights.open_checkpoint
load_t5_weights = t5_weights.load_t5_weights
resolve_tokenizer_file = t5_tokenizer.resolve_tokenizer_file
T5Tokenizer = t5_tokenizer.T5Tokenizer

_CONFIG_FILE = "config.json"
# Added to the logits of padded keys: far below any real logit, yet finite,
# so a row with no valid key gives a uniform average rather than NaNs.
_MASK_BIAS = -0.7 * float(np.finfo(np.float32).max)
# Hugging Face config model types with T5's encoder (mT5 differs only in its
# vocabulary). UMT5's per-layer position biases are not T5's.
_HF_MODEL_TYPES = ("t5", "mt5")

# transformers' activation names (ACT2FN) that T5 configs use.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def parse_feed_forward_proj(value: str) -> tuple[bool, str]:
  """(gated, activation) of transformers' `feed_forward_proj`.

  "relu" is the original T5 ("wi" then ReLU); "gated-gelu" is v1.1's
  GELU-gated unit, whose GELU is the tanh approximation (HF maps it to
  "gelu_new", as T5X's flax `gelu` is).

  Raises:
    ValueError: naming the value and the supported forms.
  """
  parts = value.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  act = parts[-1]
  if (len(parts) > 2 or (len(parts) == 2 and not gated)
      or act not in _ACTIVATIONS):
    raise ValueError(
        f"feed_forward_proj={value!r} is not supported: expected an "
        f"activation in {sorted(_ACTIVATIONS)}, optionally prefixed "
        "'gated-' (e.g. 'relu', 'gated-gelu')")
  if gated and act == "gelu":
    act = "gelu_new"  # As transformers' T5Config does.
  return gated, act


# T5Config fields a checkpoint does not determine.
_NOT_SIZES = ("dtype", "param_dtype", "scan_layers")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5 encoder plus the dtypes it runs and stores in.

  Attributes:
    vocab_size: rows of the token embedding (32128 for the English T5s:
      32000 sentencepiece pieces, 100 sentinels, padding).
    d_model: model width (the embedding width Muse sees).
    d_kv: width of each attention head.
    num_heads: attention heads per layer.
    d_ff: hidden width of the feed-forward block.
    num_layers: encoder layers.
    relative_attention_num_buckets: relative-offset buckets (both
      directions together).
    relative_attention_max_distance: offsets this far or farther share the
      last bucket of their direction.
    layer_norm_eps: RMS norm epsilon.
    feed_forward_proj: "gated-gelu" (v1.1), "relu" (original T5), ... (see
      `parse_feed_forward_proj`).
    dtype: compute dtype of the matmuls; the residual stream, norms and
      softmax stay float32.
    param_dtype: storage dtype of the weights.
    scan_layers: build the layers as one module whose parameters are
      stacked along a leading "layers" axis and run them with
      `jax.lax.scan` (one compiled layer body; XLA keeps one layer's
      gathered weights live at a time). False: a Python loop over
      separate layers. Checkpoints are the same either way.
  """

  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int = 64
  num_heads: int = 12
  d_ff: int = 2048
  num_layers: int = 12
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_eps: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False

  def __post_init__(self):
    parse_feed_forward_proj(self.feed_forward_proj)
    for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff",
                 "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"T5Config.{name}={getattr(self, name)} must be "
                         ">= 1")
    buckets = self.relative_attention_num_buckets
    if buckets < 4 or buckets % 2:
      raise ValueError(f"relative_attention_num_buckets={buckets} must be "
                       "even and >= 4")
    if self.relative_attention_max_distance <= buckets // 4:
      raise ValueError(
          f"relative_attention_max_distance="
          f"{self.relative_attention_max_distance} must exceed the "
          f"{buckets // 4} exact offsets of {buckets} buckets")

  @property
  def gated(self) -> bool:
    return parse_feed_forward_proj(self.feed_forward_proj)[0]

  @property
  def activation(self) -> str:
    return parse_feed_forward_proj(self.feed_forward_proj)[1]

  def sizes(self) -> dict[str, Any]:
    """Every field but the dtypes and the layer layout (what a checkpoint
    determines)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in _NOT_SIZES}

  @classmethod
  def from_hf_config(cls, path: PathLike, **overrides: Any) -> T5Config:
    """Reads the sizes from transformers' `config.json` (file or directory).

    Args:
      path: the config file or the model directory.
      **overrides: fields to set on top, e.g. `dtype=jnp.bfloat16` or
        `scan_layers=True` (configs read here are unrolled by default).

    Raises:
      FileNotFoundError: no config at `path`.
      ValueError: the config describes a model this module cannot express.
    """
    path = pathlib.Path(path)
    config_path = path / _CONFIG_FILE if path.is_dir() else path
    if not config_path.is_file():
      raise FileNotFoundError(f"T5 config not found: {config_path}")
    try:
      hf = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
      raise ValueError(f"{config_path}: not a JSON file: {e}") from e
    model_type = hf.get("model_type", "t5")
    if model_type not in _HF_MODEL_TYPES:
      raise ValueError(f"{config_path}: model_type={model_type!r}; only "
                       f"{_HF_MODEL_TYPES} encoders are supported")
    try:
      fields = dict(
          vocab_size=int(hf["vocab_size"]),
          d_model=int(hf["d_model"]),
          d_kv=int(hf["d_kv"]),
          num_heads=int(hf["num_heads"]),
          d_ff=int(hf["d_ff"]),
          num_layers=int(hf["num_layers"]),
          relative_attention_num_buckets=int(
              hf.get("relative_attention_num_buckets", 32)),
          relative_attention_max_distance=int(
              hf.get("relative_attention_max_distance", 128)),
          layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
          feed_forward_proj=str(hf.get("feed_forward_proj", "relu")),
      )
    except KeyError as e:
      raise ValueError(f"{config_path}: missing T5 config field {e}") from e
    try:
      parse_feed_forward_proj(fields["feed_forward_proj"])
    except ValueError as e:
      raise ValueError(f"{config_path}: {e}") from e
    fields.update(overrides)
    return cls(**fields)


_V1_1 = dict(vocab_size=32128, d_kv=64, relative_attention_num_buckets=32,
             relative_attention_max_distance=128, layer_norm_eps=1e-6,
             feed_forward_proj="gated-gelu")

# The released checkpoints' encoders (google/t5-v1_1-*, google/flan-t5-xl).
# The 24-layer ones scan over stacked layers by default.
PRESETS: dict[str, T5Config] = {
    "t5_v1_1_base": T5Config(d_model=768, num_heads=12, d_ff=2048,
                             num_layers=12, **_V1_1),
    "t5_v1_1_xl": T5Config(d_model=2048, num_heads=32, d_ff=5120,
                           num_layers=24, scan_layers=True, **_V1_1),
    "t5_v1_1_xxl": T5Config(d_model=4096, num_heads=64, d_ff=10240,
                            num_layers=24, scan_layers=True, **_V1_1),
    "flan_t5_xl": T5Config(d_model=2048, num_heads=32, d_ff=5120,
                           num_layers=24, scan_layers=True, **_V1_1),
}


def preset_config(name: str, **overrides: Any) -> T5Config:
  """The named preset with fields replaced; ValueError naming an unknown
  preset."""
  if name not in PRESETS:
    raise ValueError(f"unknown T5 preset {name!r}; known presets: "
                     f"{sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional bucket of each offset key - query, int32 [Q, K].

  Keys after the query use buckets [num_buckets/2, num_buckets), the rest
  [0, num_buckets/2). Within a half, the first quarter of all buckets are
  the exact distances 0, 1, ...; the others split the distances up to
  `max_distance` logarithmically; farther ones share the last bucket. The
  log is taken in float32 and truncated, as T5X, Mesh TensorFlow and
  transformers compute it, so boundary offsets land in the same bucket.
  Computed with numpy: the lengths are static, so this is a constant.
  """
  offset = (np.arange(key_len, dtype=np.int64)[None, :]
            - np.arange(query_len, dtype=np.int64)[:, None])
  half = num_buckets // 2
  exact = half // 2
  distance = np.abs(offset)
  # log(distance / exact) / log(max_distance / exact) of the far offsets,
  # scaled to the half's remaining buckets (distances below `exact` take
  # the other branch; 1 stands in for them to avoid log(0)).
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(exact)
  scaled = (np.log(ratio) / np.float32(math.log(max_distance / exact))
            * np.float32(half - exact))
  far = np.minimum(exact + scaled.astype(np.int64), half - 1)
  bucket = np.where(distance < exact, distance, far)
  return (bucket + np.where(offset > 0, half, 0)).astype(np.int32)


class RelativePositionBias(nnx.Module):
  """A learned bias per head for each relative-offset bucket."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance
    init = nnx.with_partitioning(nnx.initializers.normal(stddev=1.0),
                                 (None, "heads"))
    # [buckets, heads], as HF stores it (T5X stores the transpose).
    self.embedding = nnx.Param(init(
        rngs.params(), (self.num_buckets, config.num_heads),
        config.param_dtype))

  def __call__(self, query_len: int, key_len: int) -> jax.Array:
    """float32 [1, heads, query_len, key_len]."""
    buckets = relative_position_buckets(query_len, key_len, self.num_buckets,
                                        self.max_distance)
    bias = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)
    return jnp.transpose(bias, (2, 0, 1))[None]


class T5Attention(nnx.Module):
  """Multi-head self-attention without biases or logit scaling."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    d, h, k = config.d_model, config.num_heads, config.d_kv
    self.dtype = config.dtype
    axes = ("embed", "heads", "kv")
    self.query = layers.Einsum("btd,dhk->bthk", (d, h, k), axes, **kw)
    self.key = layers.Einsum("bsd,dhk->bshk", (d, h, k), axes, **kw)
    self.value = layers.Einsum("bsd,dhk->bshk", (d, h, k), axes, **kw)
    self.out = layers.Einsum("bthk,hkd->btd", (h, k, d),
                             ("heads", "kv", "embed"), fan_in_ndim=2, **kw)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x [B, T, D] (compute dtype), bias float32 broadcastable to
    [B, H, T, T] (relative positions plus the padding mask)."""
    q, k, v = self.query(x), self.key(x), self.value(x)
    logits = jnp.einsum("bthk,bshk->bhts", q, k,
                        preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1)
    context = jnp.einsum("bhts,bshk->bthk", weights.astype(self.dtype), v)
    return self.out(context)


class T5Mlp(nnx.Module):
  """T5's feed-forward: `wo(act(wi_0 x) * wi_1 x)` when gated (v1.1),
  `wo(act(wi x))` otherwise (original T5)."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    d, f = config.d_model, config.d_ff
    self.activation = config.activation
    up = lambda: layers.Einsum("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
    if config.gated:
      self.wi_0, self.wi_1 = up(), up()
      self.wi = None
    else:
      self.wi = up()
      self.wi_0 = self.wi_1 = None
    self.wo = layers.Einsum("btf,fd->btd", (f, d), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = _ACTIVATIONS[self.activation]
    if self.wi is not None:
      return self.wo(act(self.wi(x)))
    return self.wo(act(self.wi_0(x)) * self.wi_1(x))


class T5Layer(nnx.Module):
  """x += Attn(RMSNorm(x)); x += Mlp(RMSNorm(x)), the residual in float32."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    norm_kw = dict(rngs=rngs, eps=config.layer_norm_eps, dtype=config.dtype,
                   param_dtype=config.param_dtype)
    self.attention_norm = layers.RMSNorm(config.d_model, **norm_kw)
    self.attention = T5Attention(config, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(config.d_model, **norm_kw)
    self.mlp = T5Mlp(config, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), bias).astype(jnp.float32)
    return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)


class T5Encoder(nnx.Module):
  """T5's encoder stack returning per-token last hidden states.

  Equivalent to transformers' `T5EncoderModel(...).last_hidden_state` and
  T5X's `Transformer.encode` (inference: no dropout). Parameters are
  randomly initialised; fill them with `load_t5_weights` (build abstractly
  with `nnx.eval_shape` first for the large presets).

  `layers` is an `nnx.List` of `T5Layer`s, or, with `config.scan_layers`,
  one `T5Layer` whose parameters have a leading [num_layers] axis (logical
  name "layers", prepended to each parameter's own names), applied with
  `jax.lax.scan`.
  """

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.config = config
    # The embedding comes out float32: it starts the float32 residual.
    self.token_embed = layers.Embed(
        config.vocab_size, config.d_model, table_axis="vocab", init_std=1.0,
        rngs=rngs, dtype=jnp.float32, param_dtype=config.param_dtype)
    self.relative_bias = RelativePositionBias(config, rngs=rngs)
    if config.scan_layers:
      self.layers = layers.stacked(lambda r: T5Layer(config, rngs=r),
                                   config.num_layers, rngs)
    else:
      self.layers = nnx.List(
          [T5Layer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = layers.RMSNorm(
        config.d_model, rngs=rngs, eps=config.layer_norm_eps,
        dtype=jnp.float32, param_dtype=config.param_dtype)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    """Encodes token ids.

    Args:
      ids: int [B, L] sentencepiece ids.
      mask: bool [B, L], True for real tokens; padded keys are not
        attended. None: every token is real.

    Returns:
      float32 [B, L, d_model]. Padded positions hold whatever T5 computes
      there (as HF does); callers must respect `mask`.
    """
    ids = ids.astype(jnp.int32)
    length = ids.shape[-1]
    x = self.token_embed(ids)
    bias = self.relative_bias(length, length)
    if mask is not None:
      key_bias = jnp.where(mask.astype(jnp.bool_), 0.0, _MASK_BIAS)
      bias = bias + key_bias[:, None, None, :].astype(jnp.float32)
    if self.config.scan_layers:
      # The same bias (first layer's table, plus the mask) at every step.
      x = layers.apply_stacked(self.layers, lambda layer, h: layer(h, bias),
                               x)
    else:
      for layer in self.layers:
        x = layer(x, bias)
    return self.final_norm(x)


# ----------------------------------------------------------------------------
# The encoder.
# ----------------------------------------------------------------------------


def _model_dir(path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  return path if path.is_dir() else path.parent


def _config_for(path: PathLike | None, preset: str | None,
                **overrides: Any) -> T5Config:
  """The preset's sizes (checked against a config.json beside the weights,
  when there is one), or those of that config.json."""
  if preset is None and path is None:
    raise ValueError("a T5 encoder needs a preset or a model directory "
                     "with config.json")
  if path is not None and not pathlib.Path(path).exists():
    raise FileNotFoundError(f"T5 checkpoint not found: {path}")
  hf_config = None
  if path is not None:
    config_path = _model_dir(path) / _CONFIG_FILE
    if config_path.is_file():
      hf_config = T5Config.from_hf_config(config_path, **overrides)
  if preset is None:
    if hf_config is None:
      raise ValueError(
          f"{path} has no {_CONFIG_FILE} (a T5X checkpoint?): pass "
          f"preset= (one of {sorted(PRESETS)})")
    return hf_config
  config = preset_config(preset, **overrides)
  if hf_config is not None and hf_config.sizes() != config.sizes():
    ours, theirs = config.sizes(), hf_config.sizes()
    diff = ", ".join(f"{k}: preset {ours[k]!r} vs {theirs[k]!r}"
                     for k in ours if ours[k] != theirs[k])
    raise ValueError(f"T5 preset {preset!r} disagrees with "
                     f"{_model_dir(path) / _CONFIG_FILE}: {diff}")
  return config


class T5TextEncoder(base.TextEncoder):
  """T5 sentencepiece + a frozen T5 encoder, for embedding captions.

  Without a mesh the weights sit on the default device; with one, each
  weight is loaded straight onto its shards (by its logical axis names
  through `rules`: XXL's 4.7B weights shard over the fsdp and tensor
  axes) and each batch is sharded over the mesh's data axis.
  """

  def __init__(
      self,
      path: PathLike,
      *,
      preset: str | None = None,
      tokenizer_path: PathLike | None = None,
      max_len: int = 64,
      batch_size: int = 64,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      mesh: Any = None,
      rules: sharding.Rules | None = None,
      scan_layers: bool | None = None,
  ):
    """Builds the encoder.

    Args:
      path: the weights: a Hugging Face model directory (config.json plus
        model.safetensors or model.safetensors.index.json and its shards;
        usually spiece.model too), a `.safetensors` file or index inside
        one, or a T5X checkpoint directory (`checkpoint_<step>`, or the
        training directory holding them; then `preset` is needed unless a
        config.json sits there).
      preset: a key of `PRESETS`; its sizes must agree with config.json
        when `path` has one. None reads config.json.
      tokenizer_path: `spiece.model` or its directory; None looks beside
        the weights.
      max_len: fixed token length, EOS included; longer captions keep their
        first max_len - 1 tokens and EOS.
      batch_size: captions per compiled forward call.
      dtype: compute dtype (float32 reproduces the references to ~1e-5;
        bfloat16 for the large presets).
      param_dtype: weight storage dtype.
      mesh, rules: shard weights and batches over the mesh.
      scan_layers: stack the layers and scan over them (see `T5Config`);
        None takes the preset's default (True for the 24-layer presets),
        or False for a config read from config.json.
    """
    self.preset = preset
    overrides = dict(dtype=dtype, param_dtype=param_dtype)
    if scan_layers is not None:
      overrides["scan_layers"] = bool(scan_layers)
    self.config = _config_for(path, preset, **overrides)
    self.tokenizer = t5_tokenizer.T5Tokenizer(
        _model_dir(path) if tokenizer_path is None else tokenizer_path)
    if self.tokenizer.vocab_size > self.config.vocab_size:
      raise ValueError(
          f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} "
          f"pieces, more than the model's vocab_size="
          f"{self.config.vocab_size}")
    super().__init__(max_len=max_len, batch_size=batch_size,
                     pad_id=self.tokenizer.pad_id,
                     end_id=self.tokenizer.eos_id, mesh=mesh, rules=rules)
    make = lambda: T5Encoder(self.config, rngs=nnx.Rngs(0))
    if mesh is None:
      with nnx.use_eager_sharding(False):
        # Abstract: no random init; loading fills (and checks) every
        # parameter.
        self.model = nnx.eval_shape(make)
    else:
      # Abstract with each parameter's target sharding, so every tensor is
      # placed straight onto its shards as it is read.
      graphdef, state, _ = sharding.abstract_state(make, mesh, rules)
      self.model = nnx.merge(graphdef, state)
    t5_weights.load_t5_weights(self.model, path)
    self._graphdef, self.params = nnx.split(self.model)

  @property
  def dim(self) -> int:
    return self.config.d_model

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return self.tokenizer.token_ids(texts)

  def forward(self, params, ids, mask):
    return nnx.merge(self._graphdef, params)(ids, mask)

  def describe(self) -> dict[str, Any]:
    facts = super().describe()
    facts.update(preset=self.preset, num_layers=self.config.num_layers,
                 scan_layers=self.config.scan_layers,
                 tokenizer=self.tokenizer.backend)
    return facts


def embedding_dim(preset: str | None = None, path: PathLike | None = None
                  ) -> int:
  """The encoder's width from the preset or config.json alone (no
  weights)."""
  return _config_for(path, preset).d_model


def num_params(config: T5Config) -> int:
  """Parameters of the encoder `config` describes, counted abstractly."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(v.shape) for v in jax.tree.leaves(
      nnx.state(model, nnx.Param)))
