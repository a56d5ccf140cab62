"""Frozen text encoders behind one interface (`base.TextEncoder`).

Experiments pick one by config (`config.text_encoder.name`):

  minilm   all-MiniLM-L6-v2 (384 wide), the embedded demo's encoder

`make(cfg, mesh, rules)` builds it; `embedding_dim(cfg)` gives its width
without loading weights (the transformer's `text_dim`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from muse_jax import config_types
from muse_jax.text_encoders import base
from muse_jax.text_encoders import minilm

EncodedText = base.EncodedText
TextEncoder = base.TextEncoder


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Which encoder, where its weights are, and how captions are cut.

  Attributes:
    name: a key of `ENCODERS`.
    path: the weights (a model directory); "" for the encoder's default.
    max_len: tokens per caption, special tokens included; longer captions
      are truncated (and counted).
    batch_size: captions per compiled forward call.
    dtype: compute dtype; norms and softmax stay float32.
  """

  name: str = "minilm"
  path: str = ""
  max_len: int = 32
  batch_size: int = 256
  dtype: str = "float32"

  def __post_init__(self):
    if self.name not in ENCODERS:
      raise ValueError(f"text_encoder.name={self.name!r} not in "
                       f"{sorted(ENCODERS)}")
    config_types.dtype_from_name(self.dtype)


def _minilm(cfg: TextEncoderConfig, mesh, rules) -> TextEncoder:
  return minilm.MiniLMEncoder(
      cfg.path or None, max_len=cfg.max_len, batch_size=cfg.batch_size,
      dtype=config_types.dtype_from_name(cfg.dtype), mesh=mesh, rules=rules)


# name -> (constructor, width from the config alone).
ENCODERS: dict[str, tuple[Callable[..., TextEncoder],
                          Callable[[TextEncoderConfig], int]]] = {
    "minilm": (_minilm, lambda cfg: minilm.embedding_dim(cfg.path or None)),
}


def config_from(section: Any) -> TextEncoderConfig:
  """The typed config of a `config.text_encoder` section."""
  return config_types.dataclass_from_config(TextEncoderConfig, section)


def make(cfg: TextEncoderConfig, mesh=None, rules=None) -> TextEncoder:
  """Builds the configured encoder (weights loaded, replicated)."""
  return ENCODERS[cfg.name][0](cfg, mesh, rules)


def embedding_dim(cfg: TextEncoderConfig) -> int:
  """The encoder's embedding width, without loading its weights."""
  return ENCODERS[cfg.name][1](cfg)
