"""Per-run resources the stages share: the mesh, its rules, the text encoder.

Built once by the main job (or the sample CLI) from the config; the text
encoder is loaded the first time a stage asks for it.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from muse_jax import sharding
from muse_jax import text_encoders


class Env:
  """The device mesh, the logical-axis rules and a lazily built encoder."""

  def __init__(self, config: ml_collections.ConfigDict, *,
               devices: Any = None):
    if devices is None:
      self.mesh = sharding.make_mesh(config.mesh)
    else:  # All of `devices` on the first (data) axis.
      self.mesh = sharding.make_mesh(
          [(name, -1 if i == 0 else 1)
           for i, (name, _) in enumerate(config.mesh)], devices)
    self.rules = sharding.validate_rules(config.sharding_rules, self.mesh)
    self._config = config
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

  def local(self) -> Env:
    """An env over this process's devices only, for work each process does
    on its own inputs (pre-tokenising its own shards): no collective with
    the other processes, so they need not advance in step. The models it
    loads are replicated over the data axis."""
    if jax.process_count() == 1:
      return self
    return Env(self._config, devices=jax.local_devices())

  @property
  def data_shards(self) -> int:
    """Slices each batch is cut into over the mesh's data axes."""
    return sharding.data_shards(self.mesh, self.rules)
