"""Frozen text encoders behind one interface (`base.TextEncoder`).

Experiments pick one by config (`config.text_encoder.name`):

  minilm                 all-MiniLM-L6-v2 (384 wide), the embedded demo's
  t5_v1_1_base / _xl / _xxl, flan_t5_xl
                         T5 v1.1 encoders at their published sizes (Muse:
                         T5-XXL, 4.7B parameters); `path` holds the weights
                         (Hugging Face or T5X) and spiece.model
  t5                     a T5 encoder whose sizes come from `path`'s
                         config.json (any size, e.g. a small random one)
  clip_l14 (clip_b32, clip_h14, clip_bigg14, clip_l14_projection)
                         CLIP text towers (aMUSEd: L/14, penultimate layer)
  clip                   a CLIP text tower sized by `path`'s config.json

`make(cfg, mesh, rules)` builds it; `embedding_dim(cfg)` gives its width
without loading weights (the transformer's `text_dim`). A T5 or CLIP name
needs `path`; an unknown name is an error listing the known ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from muse_jax import config_types
from muse_jax.text_encoders import base
from muse_jax.text_encoders import clip
from muse_jax.text_encoders import minilm
from muse_jax.text_encoders import t5

EncodedText = base.EncodedText
TextEncoder = base.TextEncoder


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Which encoder, where its weights are, and how captions are cut.

  Attributes:
    name: a key of `ENCODERS`.
    path: the weights (a model directory, file or T5X checkpoint); "" for
      the encoder's default (MiniLM only: the T5 and CLIP names need one).
    tokenizer_path: the tokenizer (T5: spiece.model; CLIP: tokenizer.json,
      merges.txt or OpenAI's bpe_simple_vocab_16e6.txt.gz); "" looks beside
      the weights.
    layer: CLIP only: "penultimate" (aMUSEd) or "last" hidden states.
    max_len: tokens per caption, special tokens included; longer captions
      are truncated (and counted).
    batch_size: captions per compiled forward call.
    dtype: compute dtype; norms and softmax stay float32.
    param_dtype: weight storage dtype (bfloat16 halves T5-XXL's 19 GB).
    cache_dir: a finished embedding cache (`text_encoders.cache`, built by
      `python -m muse_jax.embed_captions`) the tokenize stage reads instead
      of running the encoder; "" encodes on the fly.
  """

  name: str = "minilm"
  path: str = ""
  tokenizer_path: str = ""
  layer: str = "penultimate"
  max_len: int = 32
  batch_size: int = 256
  dtype: str = "float32"
  param_dtype: str = "float32"
  cache_dir: str = ""

  def __post_init__(self):
    if self.name not in ENCODERS:
      raise ValueError(f"text_encoder.name={self.name!r} not in "
                       f"{sorted(ENCODERS)}")
    config_types.dtype_from_name(self.dtype)
    config_types.dtype_from_name(self.param_dtype)
    if self.layer not in clip.LAYERS:
      raise ValueError(f"text_encoder.layer={self.layer!r} not in "
                       f"{clip.LAYERS}")
    if self.name != "minilm" and not self.path:
      raise ValueError(f"text_encoder.name={self.name!r} needs "
                       "text_encoder.path (its weights)")


def _kw(cfg: TextEncoderConfig, mesh, rules) -> dict[str, Any]:
  return dict(max_len=cfg.max_len, batch_size=cfg.batch_size,
              dtype=config_types.dtype_from_name(cfg.dtype),
              param_dtype=config_types.dtype_from_name(cfg.param_dtype),
              mesh=mesh, rules=rules)


def _minilm(cfg: TextEncoderConfig, mesh, rules) -> TextEncoder:
  return minilm.MiniLMEncoder(cfg.path or None, **_kw(cfg, mesh, rules))


def _t5(preset: str | None):
  def make(cfg: TextEncoderConfig, mesh, rules) -> TextEncoder:
    return t5.T5TextEncoder(cfg.path, preset=preset,
                            tokenizer_path=cfg.tokenizer_path or None,
                            **_kw(cfg, mesh, rules))
  return (make, lambda cfg: t5.embedding_dim(preset, cfg.path or None))


def _clip(preset: str | None):
  def make(cfg: TextEncoderConfig, mesh, rules) -> TextEncoder:
    return clip.CLIPTextEncoder(cfg.path, preset=preset,
                                tokenizer_path=cfg.tokenizer_path or None,
                                layer=cfg.layer, **_kw(cfg, mesh, rules))
  return (make, lambda cfg: clip.embedding_dim(preset, cfg.path or None))


# name -> (constructor, width from the config alone).
ENCODERS: dict[str, tuple[Callable[..., TextEncoder],
                          Callable[[TextEncoderConfig], int]]] = {
    "minilm": (_minilm, lambda cfg: minilm.embedding_dim(cfg.path or None)),
    "t5": _t5(None),
    **{name: _t5(name) for name in t5.PRESETS},
    "clip": _clip(None),
    **{name: _clip(name) for name in clip.PRESETS},
}


def config_from(section: Any) -> TextEncoderConfig:
  """The typed config of a `config.text_encoder` section."""
  return config_types.dataclass_from_config(TextEncoderConfig, section)


def make(cfg: TextEncoderConfig, mesh=None, rules=None) -> TextEncoder:
  """Builds the configured encoder (weights loaded, placed on the mesh)."""
  return ENCODERS[cfg.name][0](cfg, mesh, rules)


def embedding_dim(cfg: TextEncoderConfig) -> int:
  """The encoder's embedding width, without loading its weights."""
  return ENCODERS[cfg.name][1](cfg)
