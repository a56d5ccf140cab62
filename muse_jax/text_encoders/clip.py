"""CLIP's text tower (OpenAI CLIP / OpenCLIP) behind the text-encoder API.

aMUSEd, the open re-creation of Muse, conditions on CLIP ViT-L/14's text
transformer rather than T5: its cross-attention reads the penultimate
layer's per-token hidden states and its micro-conditioning the projected
pooled state. This module re-creates that tower in Flax NNX, reproducing
Hugging Face `transformers.CLIPTextModel` (and `...WithProjection`) to
float32 rounding, and reads both published weight layouts.

The model (`CLIPTextTransformer`): token embedding + learned position
embedding; `num_layers` pre-LayerNorm layers, each

    x = x + Attn(LN1(x))     causal self-attention with biases
    x = x + Mlp(LN2(x))      fc1 -> quick_gelu (x * sigmoid(1.702 x)) or
                             gelu -> fc2

then a final LayerNorm. Attention is causal *and* never attends padded keys
(`mask`); because it is causal, a real token only ever sees earlier (real)
tokens, so padding never changes the states at real tokens. Outputs
(`CLIPTextOutputs`):

* `last_hidden_state`: the last layer's states after the final LayerNorm
  (HF `last_hidden_state`).
* `penultimate_hidden_state`: the input of the last layer, *not* passed
  through the final LayerNorm: HF's `output_hidden_states=True` tuple holds
  the embeddings and every layer's raw output, and diffusers' aMUSEd
  pipeline (`AmusedPipeline`) conditions on `hidden_states[-2]`, exactly
  this tensor. It is the encoder's default (`layer="penultimate"`).
* `pooled`: the final-LayerNorm state at the first `eos_token_id` of each
  row (HF `pooler_output`). HF keeps a legacy rule for configs saved before
  transformers PR #24773 (`eos_token_id` 2): it pools at the argmax of the
  ids, which for CLIP's vocabulary is the first `<|endoftext|>` (49407, the
  highest id, and torch's argmax returns the first maximum). We implement
  only the eos-id form; `CLIPTextConfig.from_hf_config` maps the legacy
  value 2 to 49407 for the 49408-token vocabulary, which picks the same
  position.
* `text_embeds`: `pooled @ text_projection` when the config has a
  `projection_dim` (HF `CLIPTextModelWithProjection.text_embeds`, what
  aMUSEd feeds its micro-conditioning as `pooled_text_emb`), else None.

Note that aMUSEd calls its text encoder *without* an attention mask, so the
states at its padded positions (padded with `<|endoftext|>`) attend to
earlier padding; `CLIPTextTransformer(ids, mask=None)` reproduces that. The
`TextEncoder` interface instead zeroes padded positions and reports the mask.

Weights are read by `clip_weights.load_clip_text_weights` (Hugging Face
and OpenCLIP layouts, tensor by tensor into an abstract model) and text is
tokenized by `clip_tokenizer.CLIPTokenizer` (CLIP's byte-level BPE, ids as
transformers' `CLIPTokenizer`); both modules' public names are re-exported
here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import os
import pathlib
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import sharding
from muse_jax.models import layers
from muse_jax.text_encoders import base
from muse_jax.text_encoders import clip_tokenizer
from muse_jax.text_encoders import clip_weights

PathLike = str | os.PathLike[str]

# Re-exported: the tokenizer and the weight loader have their own modules.
SOT_TOKEN = clip_tokenizer.SOT_TOKEN
EOT_TOKEN = clip_tokenizer.EOT_TOKEN
OPENAI_NUM_MERGES = clip_tokenizer.OPENAI_NUM_MERGES
OPENAI_BPE_FILE = clip_tokenizer.OPENAI_BPE_FILE
bytes_to_unicode = clip_tokenizer.bytes_to_unicode
read_bpe_merges = clip_tokenizer.read_bpe_merges
bpe_vocab = clip_tokenizer.bpe_vocab
build_bpe_tokenizer = clip_tokenizer.build_bpe_tokenizer
resolve_tokenizer_file = clip_tokenizer.resolve_tokenizer_file
CLIPTokenizer = clip_tokenizer.CLIPTokenizer
resolve_weights_file = clip_weights.resolve_weights_file
load_clip_text_weights = clip_weights.load_clip_text_weights

_CONFIG_FILE = "config.json"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
LAYERS = ("last", "penultimate")

# HF CLIPTextConfig's defaults, for fields a saved config leaves out.
_HF_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                    num_hidden_layers=12, num_attention_heads=8,
                    max_position_embeddings=77, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5, eos_token_id=49407)
# The eos id HF configs carried before transformers PR #24773.
_LEGACY_EOS_ID = 2


# ----------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Sizes of a CLIP text tower plus the dtypes it runs and stores in.

  Attributes:
    vocab_size: BPE vocabulary size (49408 for OpenAI's).
    hidden_size: model width (768 for ViT-L/14's text tower).
    num_layers: transformer layers.
    num_heads: attention heads per layer.
    mlp_dim: hidden width of the MLP.
    max_position_embeddings: rows of the learned position table (the
      context length, 77).
    layer_norm_eps: LayerNorm epsilon.
    hidden_act: the MLP activation, a key of `ACTIVATIONS` ("quick_gelu"
      for OpenAI's models, "gelu" for OpenCLIP's LAION ones).
    eos_token_id: the `<|endoftext|>` id; the pooled output is taken at its
      first occurrence.
    projection_dim: width of `text_projection` (no bias), or None for a
      tower without the projection.
    dtype: compute dtype of the matmuls; LayerNorm, softmax and the
      residual stream stay float32.
    param_dtype: storage dtype of the weights.
    impl: "plain" (ordinary JAX, for TPU/GPU) or "xla_cpu" (the layers'
      products through `models.cpu_kernels`, faster on XLA:CPU; the same
      function, the same parameters).
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407
  projection_dim: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "plain"

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act={self.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    layers.check_impl("CLIP impl", self.impl)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"CLIP hidden_size={self.hidden_size} is not "
                       f"divisible by num_heads={self.num_heads}")
    if not 0 <= self.eos_token_id < self.vocab_size:
      raise ValueError(f"CLIP eos_token_id={self.eos_token_id} is outside "
                       f"the vocabulary [0, {self.vocab_size})")

  @classmethod
  def from_hf_config(cls, path: PathLike, **overrides: Any
                     ) -> CLIPTextConfig:
    """Reads transformers' CLIP config (`config.json`, file or directory).

    Either a text-model config (`CLIPTextModel`,
    `CLIPTextModelWithProjection`) or a full `CLIPModel` config, whose
    `text_config` is read. The projection is configured only for
    `CLIPTextModelWithProjection` (its `projection_dim`); a full CLIPModel's
    `text_projection` is ignored unless `projection_dim=` is passed.

    Args:
      path: the config file or the model directory holding config.json.
      **overrides: fields to set on top, e.g. `dtype=jnp.bfloat16`.

    Raises:
      FileNotFoundError: no config at `path`.
      ValueError: unreadable JSON, or a model this module cannot express.
    """
    path = pathlib.Path(path)
    file = path / _CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
      raise FileNotFoundError(f"CLIP config not found: {file}")
    try:
      hf = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
      raise ValueError(f"{file}: not a JSON config: {e}") from e
    architectures = hf.get("architectures") or []
    text = hf.get("text_config") if "text_config" in hf else hf
    if not isinstance(text, dict):
      raise ValueError(f"{file}: text_config is not a JSON object")
    get = lambda key: text.get(key, _HF_DEFAULTS[key])
    vocab_size = int(get("vocab_size"))
    eos = int(get("eos_token_id"))
    if eos == _LEGACY_EOS_ID and vocab_size == 49408:
      # HF pools these at the argmax of the ids: the first <|endoftext|>.
      eos = 49407
    projection_dim = None
    if "CLIPTextModelWithProjection" in architectures:
      if "projection_dim" not in text:
        raise ValueError(f"{file}: a CLIPTextModelWithProjection config "
                         "without projection_dim")
      projection_dim = int(text["projection_dim"])
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=int(get("hidden_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=int(get("num_attention_heads")),
        mlp_dim=int(get("intermediate_size")),
        max_position_embeddings=int(get("max_position_embeddings")),
        layer_norm_eps=float(get("layer_norm_eps")),
        hidden_act=str(get("hidden_act")),
        eos_token_id=eos,
        projection_dim=projection_dim,
    )
    fields.update(overrides)
    try:
      return cls(**fields)
    except ValueError as e:
      raise ValueError(f"{file}: {e}") from e


# The published text towers. All use OpenAI's 49408-token BPE and 77-token
# context; OpenAI's models use quick_gelu, OpenCLIP's LAION ones exact gelu.
PRESETS: dict[str, CLIPTextConfig] = {
    # ViT-B/32 and ViT-B/16 share this text tower.
    "clip_b32": CLIPTextConfig(hidden_size=512, num_layers=12, num_heads=8,
                               mlp_dim=2048),
    # ViT-L/14 (openai/clip-vit-large-patch14): aMUSEd's text encoder.
    "clip_l14": CLIPTextConfig(hidden_size=768, num_layers=12, num_heads=12,
                               mlp_dim=3072),
    # The same, with its text projection (CLIPTextModelWithProjection).
    "clip_l14_projection": CLIPTextConfig(
        hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
        projection_dim=768),
    # OpenCLIP ViT-H/14 (LAION-2B; Stable Diffusion 2's encoder).
    "clip_h14": CLIPTextConfig(hidden_size=1024, num_layers=24, num_heads=16,
                               mlp_dim=4096, hidden_act="gelu"),
    # OpenCLIP ViT-bigG/14 (LAION-2B; SDXL's second encoder).
    "clip_bigg14": CLIPTextConfig(hidden_size=1280, num_layers=32,
                                  num_heads=20, mlp_dim=5120,
                                  hidden_act="gelu"),
}


def preset_config(name: str, **overrides: Any) -> CLIPTextConfig:
  """The named preset with fields replaced; ValueError naming an unknown
  preset."""
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; known presets: "
                     f"{sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------


class CLIPTextOutputs(NamedTuple):
  """What the text tower computes (float32; see the module docstring)."""

  last_hidden_state: jax.Array  # [B, T, D], after the final LayerNorm.
  penultimate_hidden_state: jax.Array  # [B, T, D], no final LayerNorm.
  pooled: jax.Array  # [B, D], last_hidden_state at the first eos.
  text_embeds: jax.Array | None  # [B, P], pooled @ text_projection.


def attention_mask(length: int, mask: jax.Array | None) -> jax.Array:
  """Causal mask combined with key validity: bool [B|1, 1, T, T].

  Query t may attend key s when s <= t and (no `mask` or mask[b, s]).
  """
  causal = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
  if mask is None:
    return causal
  return causal & mask.astype(jnp.bool_)[:, None, None, :]


class CLIPMlp(nnx.Module):
  """fc1 -> activation -> fc2, with biases."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, use_bias=True, dtype=config.dtype,
              param_dtype=config.param_dtype, impl=config.impl)
    d, f = config.hidden_size, config.mlp_dim
    self.activation = config.hidden_act
    self.fc1 = layers.Einsum("...d,df->...f", (d, f), ("embed", "mlp"), **kw)
    self.fc2 = layers.Einsum("...f,fd->...d", (f, d), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPLayer(nnx.Module):
  """One pre-LayerNorm layer: x += Attn(LN1(x)); x += Mlp(LN2(x)).

  `config` is a `CLIPTextConfig` or anything with its size, dtype and impl
  fields (the image tower's `CLIPVisionConfig`). Called with a mask
  (causal and padding, the text tower) the attention core is
  `jax.nn.dot_product_attention`; without one (the image tower) it is the
  shared block's own, `config.impl`'s.
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs,
               masked: bool = True):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    d = config.hidden_size
    self.attention_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, **kw)
    # A masked layer uses only the projections of the shared block: its
    # core takes a [B, 1, T, S] mask (causal and padding), which
    # `layers.Attention.__call__` (key-validity masks only) does not; that
    # core wants [B, T, H, K] keys, the plain attention impl's layout.
    self.attention = layers.Attention(
        d, config.num_heads, use_bias=True,
        impl="plain" if masked else config.impl, matmul_impl=config.impl,
        **kw)
    self.mlp_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, **kw)
    self.mlp = CLIPMlp(config, rngs=rngs)

  def _attend(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    attn = self.attention
    if mask is None:
      return attn(x)
    q = attn.query(x)  # [B, T, H, K], in the compute dtype.
    k, v = attn.kv(x)
    # Float32 scores and softmax (jax.nn.dot_product_attention promotes).
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype),
                                       v.astype(q.dtype), mask=mask)
    return attn.out(out)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x float32 [B, T, D] (the residual stream); mask bool [B|1, 1, T, T]
    or None (every position attends every other)."""
    x = x + self._attend(self.attention_norm(x), mask).astype(jnp.float32)
    return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)


class CLIPTextTransformer(nnx.Module):
  """CLIP's text tower; parameters are random until loaded
  (`clip_weights.load_clip_text_weights`)."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    d = config.hidden_size
    self.token_embed = layers.Embed(config.vocab_size, d, table_axis="vocab",
                                    **kw)
    self.position_embed = layers.Embed(config.max_position_embeddings, d,
                                       table_axis="positions", **kw)
    self.layers = nnx.List(
        [CLIPLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, **kw)
    self.projection = None if config.projection_dim is None else (
        layers.Einsum("bd,dp->bp", (d, config.projection_dim),
                      ("embed", "text_embed"), impl=config.impl, **kw))

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None
               ) -> CLIPTextOutputs:
    """Encodes token ids.

    Args:
      ids: int [B, T] BPE ids, T <= max_position_embeddings.
      mask: bool [B, T], True at real tokens; padded keys are never
        attended. None attends every (earlier) position, as HF does without
        an `attention_mask` (aMUSEd's call).

    Returns:
      `CLIPTextOutputs`, float32. States at padded positions are whatever
      the model computes there; callers must respect `mask`.
    """
    length = ids.shape[-1]
    if length > self.config.max_position_embeddings:
      raise ValueError(
          f"sequence length {length} exceeds max_position_embeddings="
          f"{self.config.max_position_embeddings}")
    ids = ids.astype(jnp.int32)
    # Summed in float32 from the stored tables (not the compute dtype).
    table = self.token_embed.embedding[...]
    positions = self.position_embed.embedding[...][:length]
    x = (jnp.take(table, ids, axis=0).astype(jnp.float32)
         + positions[None].astype(jnp.float32))
    full_mask = attention_mask(length, mask)
    previous = x
    for layer in self.layers:
      previous, x = x, layer(x, full_mask)
    last = self.final_norm(x).astype(jnp.float32)
    first_eos = jnp.argmax(ids == self.config.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, first_eos[:, None, None], axis=1)[:, 0]
    text_embeds = None if self.projection is None else (
        self.projection(pooled).astype(jnp.float32))
    return CLIPTextOutputs(last, previous.astype(jnp.float32), pooled,
                           text_embeds)


# ----------------------------------------------------------------------------
# The encoder.
# ----------------------------------------------------------------------------


def _config_for(path: PathLike | None, preset: str | None,
                **overrides: Any) -> CLIPTextConfig:
  if preset is not None:
    return preset_config(preset, **overrides)
  if path is None:
    raise ValueError("a CLIP text encoder needs a preset or a model "
                     "directory with config.json")
  path = pathlib.Path(path)
  if path.is_dir() and (path / _CONFIG_FILE).is_file():
    return CLIPTextConfig.from_hf_config(path, **overrides)
  if not path.exists():
    raise FileNotFoundError(f"CLIP weights not found: {path}")
  raise ValueError(f"{path} has no {_CONFIG_FILE} (an OpenCLIP or bare "
                   f"weights file): pass preset= (one of {sorted(PRESETS)})")


def _default_tokenizer_path(path: PathLike) -> pathlib.Path:
  """The weights' directory, or diffusers' sibling `tokenizer/` directory
  (a pipeline keeps `text_encoder/` and `tokenizer/` side by side)."""
  path = pathlib.Path(path)
  directory = path if path.is_dir() else path.parent
  for candidate in (directory, directory.parent / "tokenizer"):
    try:
      return clip_tokenizer.resolve_tokenizer_file(candidate)
    except FileNotFoundError:
      continue
  raise FileNotFoundError(
      f"no CLIP tokenizer beside {path} (nor in "
      f"{directory.parent / 'tokenizer'}): pass tokenizer_path= (a "
      "tokenizer.json, merges.txt or OpenAI's "
      f"{clip_tokenizer.OPENAI_BPE_FILE}, shipped in the clip-anytorch and "
      "open_clip_torch packages)")


class CLIPTextEncoder(base.TextEncoder):
  """CLIP BPE + a frozen CLIP text tower, for embedding captions.

  `encode` gives the per-token states of `layer` ("penultimate", aMUSEd's
  conditioning, or "last", after the final LayerNorm), zeroed at padding.
  `pooled` gives HF's `pooler_output` and `text_embeds` the projected one.
  Weights are placed by their logical axis names on the mesh (replicated
  without one); each batch is sharded over the mesh's data axis.
  """

  def __init__(
      self,
      path: PathLike,
      *,
      preset: str | None = None,
      tokenizer_path: PathLike | None = None,
      layer: str = "penultimate",
      max_len: int = 77,
      batch_size: int = 64,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      mesh: Any = None,
      rules: sharding.Rules | None = None,
  ):
    """Builds the encoder.

    Args:
      path: the weights (see `clip_weights.load_clip_text_weights`): a HF
        model directory (config.json + model.safetensors), or an OpenCLIP
        file or directory (then `preset` is required).
      preset: a key of `PRESETS`; None reads the HF config.json in `path`.
      tokenizer_path: see `clip_tokenizer.CLIPTokenizer`; None looks beside
        the weights and in a diffusers pipeline's sibling `tokenizer/`
        directory.
      layer: "penultimate" or "last" (see the module docstring).
      max_len: fixed token length, <|startoftext|>/<|endoftext|> included;
        longer captions keep their first max_len - 1 tokens and the end
        token.
      batch_size: captions per compiled forward call.
      dtype: compute dtype (float32 reproduces the reference to ~1e-5).
      param_dtype: weight storage dtype.
      mesh, rules: shard weights and batches over the mesh.
    """
    if layer not in LAYERS:
      raise ValueError(f"CLIP layer={layer!r} not in {LAYERS}")
    self.layer = layer
    self.preset = preset
    self.config = _config_for(path, preset, dtype=dtype,
                              param_dtype=param_dtype)
    weights = clip_weights.resolve_weights_file(path)
    if max_len > self.config.max_position_embeddings:
      raise ValueError(
          f"max_len={max_len} exceeds max_position_embeddings="
          f"{self.config.max_position_embeddings}")
    self.tokenizer = clip_tokenizer.CLIPTokenizer(
        _default_tokenizer_path(path) if tokenizer_path is None
        else tokenizer_path)
    if self.tokenizer.vocab_size > self.config.vocab_size:
      raise ValueError(
          f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} "
          f"tokens, more than the model's vocab_size="
          f"{self.config.vocab_size}")
    if self.tokenizer.eot_id != self.config.eos_token_id:
      raise ValueError(
          f"tokenizer {self.tokenizer.path} ends texts with id "
          f"{self.tokenizer.eot_id}, but the model pools at eos_token_id="
          f"{self.config.eos_token_id}")
    super().__init__(max_len=max_len, batch_size=batch_size,
                     pad_id=self.tokenizer.pad_id,
                     end_id=self.tokenizer.eot_id, mesh=mesh, rules=rules)
    make = lambda: CLIPTextTransformer(self.config, rngs=nnx.Rngs(0))
    if mesh is None:
      with nnx.use_eager_sharding(False):
        # Abstract: no random init of 123M+ weights; loading fills (and
        # checks) every parameter.
        self.model = nnx.eval_shape(make)
    else:
      # Abstract with each parameter's target sharding, so every tensor is
      # placed straight onto its shards as it is read.
      graphdef, state, _ = sharding.abstract_state(make, mesh, rules)
      self.model = nnx.merge(graphdef, state)
    clip_weights.load_clip_text_weights(self.model, weights)
    self._graphdef, self.params = nnx.split(self.model)

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return self.tokenizer.token_ids(texts)

  def outputs(self, params, ids, mask) -> CLIPTextOutputs:
    """Every output of the tower (jittable)."""
    return nnx.merge(self._graphdef, params)(ids, mask)

  def forward(self, params, ids, mask):
    out = self.outputs(params, ids, mask)
    return (out.last_hidden_state if self.layer == "last"
            else out.penultimate_hidden_state)

  def pooled(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [N, dim]: the final-LayerNorm state at each text's
    <|endoftext|> (HF `pooler_output`)."""
    return self._per_text(texts, "pooled", self.dim)

  def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [N, projection_dim]: `pooled` through the text projection
    (HF `CLIPTextModelWithProjection.text_embeds`; aMUSEd's
    `pooled_text_emb`)."""
    if self.config.projection_dim is None:
      raise ValueError("this CLIP text encoder has no text projection (use "
                       "a CLIPTextModelWithProjection config or a "
                       "*_projection preset)")
    return self._per_text(texts, "text_embeds", self.config.projection_dim)

  def _per_text(self, texts: Sequence[str], field: str, width: int
                ) -> np.ndarray:
    """One vector per text, in the same fixed-size batches as `encode`."""
    ids, mask, _ = self.tokenize(texts)
    jitted = getattr(self, "_vector_jits", {})
    self._vector_jits = jitted
    if field not in jitted:
      jitted[field] = jax.jit(
          lambda p, i, m: getattr(self.outputs(p, i, m), field))
      if self.mesh is not None and not getattr(self, "_placed", False):
        self.params = jax.device_put(self.params, self.param_shardings())
        self._placed = True
    n, bs = ids.shape[0], self.batch_size
    out = np.zeros((n, width), np.float32)
    for start in range(0, n, bs):
      batch_ids, batch_mask = ids[start:start + bs], mask[start:start + bs]
      rows = batch_ids.shape[0]
      if rows < bs:
        pad = ((0, bs - rows), (0, 0))
        batch_ids = np.pad(batch_ids, pad, constant_values=self.pad_id)
        batch_mask = np.pad(batch_mask, pad, constant_values=False)
      if self.mesh is None:
        result = np.asarray(jitted[field](self.params, batch_ids, batch_mask))
      else:
        dev = [sharding.shard_host_batch(x, self.mesh, self.rules)
               for x in (batch_ids, batch_mask)]
        with jax.set_mesh(self.mesh):
          result = sharding.to_host(jitted[field](self.params, *dev))
      out[start:start + rows] = result[:rows]
    return out

  def describe(self) -> dict[str, Any]:
    facts = super().describe()
    facts.update(layer=self.layer, preset=self.preset,
                 num_layers=self.config.num_layers)
    return facts


def embedding_dim(preset: str | None = None, path: PathLike | None = None
                  ) -> int:
  """The encoder's width from the preset or config.json alone (no
  weights)."""
  return _config_for(path, preset).hidden_size
