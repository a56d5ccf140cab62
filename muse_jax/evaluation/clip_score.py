"""CLIP score: the cosine similarity of CLIP's image and caption embeddings.

Muse reports CLIP score as the plain cosine (COCO-30K: 0.32; CC3M: 0.26),
not torchmetrics' 100 * max(cos, 0); `CLIPScorer.score` gives one cosine
per (image, caption) pair and callers average them.

* `CLIPModel`: both towers in NNX (`clip.CLIPTextTransformer` with its
  projection, `clip_vision.CLIPVisionTransformer`) and `logit_scale`, built
  from a `clip_layout.CLIPArch` (open_clip's model names: ViT-B-32,
  ViT-L-14, their -quickgelu forms for OpenAI's weights).
* `load_weights`: one file for both towers -- OpenAI's TorchScript
  archives (`ViT-L-14.pt`), open_clip state dicts
  (`open_clip_pytorch_model.bin`, `open_clip_model.safetensors`) and HF
  `CLIPModel` safetensors -- every tensor checked before any is read.
* `preprocess`: open_clip's / OpenAI's eval transform, exactly: PIL bicubic
  resize of the short side, centre crop, CLIP mean / std.
* `CLIPScorer`: tokenises like open_clip (`<|startoftext|>` ... up to 77
  tokens, the last one `<|endoftext|>`, zero padding), embeds batches
  sharded over the mesh's data axes, and scores pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import importlib.util
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from muse_jax import sharding
from muse_jax.evaluation import clip_layout
from muse_jax.evaluation import clip_vision
from muse_jax.text_encoders import clip
from muse_jax.text_encoders import clip_tokenizer
from muse_jax.text_encoders import clip_weights

PathLike = str | os.PathLike[str]


def text_config(arch: clip_layout.CLIPArch, **overrides: Any
                ) -> clip.CLIPTextConfig:
  fields = dict(
      vocab_size=arch.vocab_size, hidden_size=arch.text_width,
      num_layers=arch.text_layers, num_heads=arch.text_heads,
      mlp_dim=4 * arch.text_width,
      max_position_embeddings=arch.context_length,
      hidden_act="quick_gelu" if arch.quick_gelu else "gelu",
      eos_token_id=arch.eos_token_id, projection_dim=arch.embed_dim)
  fields.update(overrides)
  return clip.CLIPTextConfig(**fields)


def vision_config(arch: clip_layout.CLIPArch, **overrides: Any
                  ) -> clip_vision.CLIPVisionConfig:
  fields = dict(
      image_size=arch.image_size, patch_size=arch.patch_size,
      hidden_size=arch.vision_width, num_layers=arch.vision_layers,
      num_heads=arch.vision_heads, mlp_dim=4 * arch.vision_width,
      hidden_act="quick_gelu" if arch.quick_gelu else "gelu",
      projection_dim=arch.embed_dim)
  fields.update(overrides)
  return clip_vision.CLIPVisionConfig(**fields)


class CLIPModel(nnx.Module):
  """Both CLIP towers and the logit scale; random until `load_weights`."""

  def __init__(self, arch: clip_layout.CLIPArch, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               impl: str = "plain"):
    """`impl`: "plain" or "xla_cpu" (`clip.CLIPTextConfig.impl`)."""
    self.arch = arch
    kw = dict(dtype=dtype, param_dtype=param_dtype, impl=impl)
    self.text = clip.CLIPTextTransformer(text_config(arch, **kw), rngs=rngs)
    self.vision = clip_vision.CLIPVisionTransformer(
        vision_config(arch, **kw), rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """CLIP-normalised [B, S, S, 3] -> float32 [B, E] (not normalised)."""
    return self.vision(pixels).image_embeds

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """int [B, T] (open_clip's tokens) -> float32 [B, E] (not
    normalised): the projected state at the first `<|endoftext|>`."""
    # No padding mask: attention is causal, so the zero padding after
    # <|endoftext|> never reaches the pooled state (open_clip's call).
    return self.text(ids, None).text_embeds


def load_weights(model: CLIPModel, path: PathLike) -> CLIPModel:
  """Fills both towers and `logit_scale` from one checkpoint, in place.

  The layout is recognised from the names (HF `text_model.*` /
  `vision_model.*`, or OpenAI / open_clip `transformer.*` / `visual.*`);
  `clip_weights.fill` names every missing, unexpected or mis-shaped tensor
  (e.g. a ViT-B-32 file given for ViT-L-14) before reading any.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: an unreadable file, an unknown layout or mismatched tensors.
  """
  source = clip_weights.TensorSource(clip_weights.resolve_weights_file(path))
  layout = clip_weights.detect_layout(source)
  entries = clip_weights.text_entries(model.text, layout)
  entries.update(clip_vision.entries(model.vision, layout))
  entries["logit_scale"] = clip_weights.Entry(
      (), ((model.logit_scale, lambda a: a),))
  buffers = ("text_model.embeddings.position_ids",
             "vision_model.embeddings.position_ids", "attn_mask", "logit_bias")
  ignored = lambda n: n in buffers or n.endswith(".attn_mask")
  clip_weights.fill(source, entries, ignored, f"CLIP ({layout}) weights")
  return model


def missing_weights_message(path: str, model_name: str) -> str:
  standard = clip_layout.OPENAI_FILES.get(model_name)
  which = (f"the standard {standard[0]} (OpenAI's, from {standard[1]})"
           if standard else "open_clip's open_clip_pytorch_model.bin or "
           "open_clip_model.safetensors for it (Hugging Face Hub), or a HF "
           "CLIPModel directory")
  return (f"CLIP score with {model_name} needs {which}; {path!r} does not "
          "exist. Download it and pass its path with --clip_path (the eval "
          "CLI) or --config.eval.clip_path (the main job).")


# ----------------------------------------------------------------------------
# Preprocessing and tokenising, as open_clip does.
# ----------------------------------------------------------------------------


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [B, H, W, 3] -> CLIP-normalised float32 [B, size, size, 3].

  open_clip's eval transform on PIL images (torchvision `Resize(size,
  BICUBIC)` of the shorter side, `CenterCrop(size)`, `ToTensor`,
  `Normalize(MEAN, STD)`), to the byte.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"CLIP takes uint8 [B, H, W, 3] images, got "
                     f"{images.dtype} {images.shape}")
  out = np.empty((len(images), size, size, 3), np.float32)
  for i, img in enumerate(images):
    h, w = img.shape[:2]
    # torchvision: the short side to `size`, the long one int(size*long/short).
    if h <= w:
      new_h, new_w = size, int(size * w / h)
    else:
      new_h, new_w = int(size * h / w), size
    pil = Image.fromarray(img)
    if (new_h, new_w) != (h, w):
      pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    out[i] = np.asarray(pil.crop((left, top, left + size, top + size)),
                        np.float32) / 255.0
  return ((out - np.asarray(clip_layout.MEAN, np.float32))
          / np.asarray(clip_layout.STD, np.float32))


def default_tokenizer_file() -> pathlib.Path:
  """OpenAI's BPE merges as shipped inside open_clip or clip-anytorch
  (found without importing either)."""
  for package in ("open_clip", "clip"):
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
      candidate = pathlib.Path(root) / clip_tokenizer.OPENAI_BPE_FILE
      if candidate.is_file():
        return candidate
  raise FileNotFoundError(
      f"no CLIP tokenizer: pass --clip_tokenizer (OpenAI's "
      f"{clip_tokenizer.OPENAI_BPE_FILE}, shipped in the open_clip_torch "
      "and clip-anytorch packages, or a HF tokenizer.json)")


def tokenize(tokenizer: clip_tokenizer.CLIPTokenizer, texts: Sequence[str],
             context_length: int) -> np.ndarray:
  """int32 [N, context_length] as `open_clip.tokenize`: too-long texts keep
  their first context_length - 1 tokens and end in `<|endoftext|>`; zero
  padding."""
  out = np.zeros((len(texts), context_length), np.int32)
  for i, ids in enumerate(tokenizer.token_ids(texts)):
    if not ids or ids[0] != tokenizer.sot_id:
      ids = [tokenizer.sot_id] + list(ids)
    if ids[-1] != tokenizer.eot_id:
      ids = list(ids) + [tokenizer.eot_id]
    if len(ids) > context_length:
      ids = list(ids[:context_length - 1]) + [tokenizer.eot_id]
    out[i, :len(ids)] = ids
  return out


# ----------------------------------------------------------------------------
# The scorer.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
  """What `CLIPScorer` loads (the eval CLI's --clip_* flags)."""

  path: str
  model: str = "ViT-L-14-quickgelu"
  tokenizer_path: str = ""
  batch_size: int = 32
  # float32 + "plain" is the reference (parity with open_clip). On CPUs
  # with AMX, bfloat16 + "xla_cpu" runs the ViT-L/14 image tower 2.3x as
  # fast (benchmarks/README.md) at a small cost in agreement.
  dtype: str = "float32"
  impl: str = "plain"


class CLIPScorer:
  """Embeds images and captions with one CLIP and scores their pairs."""

  def __init__(self, config: ScorerConfig, mesh=None, rules=None, *,
               arch: clip_layout.CLIPArch | None = None):
    """Loads the model.

    Args:
      config: weights, model name, tokenizer and batch size.
      mesh, rules: batches are sharded over the data axes; weights are
        replicated.
      arch: the architecture, overriding `config.model` (tests).

    Raises:
      FileNotFoundError: the weights (naming the standard file and flag)
        or the tokenizer are missing.
      ValueError: an unknown model name, or weights of another model.
    """
    self.arch = arch or clip_layout.arch(config.model)
    if not config.path or not os.path.exists(config.path):
      raise FileNotFoundError(
          missing_weights_message(config.path, config.model))
    self.tokenizer = clip_tokenizer.CLIPTokenizer(
        config.tokenizer_path or default_tokenizer_file())
    if self.tokenizer.eot_id != self.arch.eos_token_id:
      raise ValueError(
          f"tokenizer {self.tokenizer.path} ends texts with id "
          f"{self.tokenizer.eot_id}, but {config.model} pools at "
          f"{self.arch.eos_token_id}")
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: CLIPModel(
          self.arch, rngs=nnx.Rngs(0), dtype=config.dtype,
          impl=config.impl))
    load_weights(model, config.path)
    graphdef, state = nnx.split(model)
    self.mesh, self.rules = mesh, rules
    if mesh is not None:
      state = jax.device_put(state, sharding.replicated(mesh))
    self._state = state
    shards = sharding.data_shards(mesh, rules) if mesh is not None else 1
    self.batch_size = -(-config.batch_size // shards) * shards
    self._image = jax.jit(
        lambda s, x: nnx.merge(graphdef, s).encode_image(x))
    self._text = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_text(x))

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    out = []
    for lo in range(0, len(x), self.batch_size):
      chunk = x[lo:lo + self.batch_size]
      rows = len(chunk)
      if rows < self.batch_size:
        chunk = np.concatenate(
            [chunk, np.repeat(chunk[-1:], self.batch_size - rows, axis=0)])
      if self.mesh is not None:
        dev = sharding.shard_host_batch(chunk, self.mesh, self.rules)
        with jax.set_mesh(self.mesh):
          result = sharding.to_host(fn(self._state, dev))
      else:
        result = np.asarray(fn(self._state, chunk))
      out.append(result[:rows])
    return (np.concatenate(out) if out
            else np.zeros((0, self.arch.embed_dim), np.float32))

  def image_embeds(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, E] (not normalised)."""
    return self._batched(self._image,
                         preprocess(images, self.arch.image_size))

  def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
    """Captions -> float32 [N, E] (not normalised)."""
    return self._batched(self._text, tokenize(
        self.tokenizer, texts, self.arch.context_length))

  def score(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """float64 [N]: cos(image_i, text_i), in [-1, 1]."""
    if len(images) != len(texts):
      raise ValueError(f"{len(images)} images but {len(texts)} captions")
    return cosine(self.image_embeds(images), self.text_embeds(texts))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.sum(a * b, axis=-1)
