"""Per-run resources the stages share: the mesh, its rules, the text encoder.

Built once by the main job (or the sample CLI) from the config; the text
encoder is loaded the first time a stage asks for it.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from muse_jax import sharding
from muse_jax import text_encoders


class Env:
  """The device mesh, the logical-axis rules and a lazily built encoder."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.validate_rules(config.sharding_rules, self.mesh)
    # Tokenizer-only pipelines have no text encoder.
    self.text_encoder_config = (
        text_encoders.config_from(config.text_encoder)
        if "text_encoder" in config else None)
    self._text_encoder: Any = None

  def text_encoder(self) -> text_encoders.TextEncoder:
    if self.text_encoder_config is None:
      raise ValueError("this config has no text_encoder section")
    if self._text_encoder is None:
      self._text_encoder = text_encoders.make(
          self.text_encoder_config, self.mesh, self.rules)
    return self._text_encoder

  @property
  def data_shards(self) -> int:
    """Slices each batch is cut into over the mesh's data axes."""
    return sharding.data_shards(self.mesh, self.rules)
