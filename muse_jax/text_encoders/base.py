"""The text-encoder interface: strings -> per-token embeddings + mask.

Muse conditions on the per-token hidden states of a frozen, pretrained text
encoder. Every encoder behind this interface supplies three things, its
tokenizer (`token_ids`), its forward pass (`forward`) and its width; the
rest is written once here:

* truncation to `max_len` (keeping the encoder's end token, if it has one)
  with a count of the captions that were cut (`EncodedText.num_truncated`);
* padding to one fixed length, so every batch has one compiled shape;
* batching in fixed-size batches (the last one padded), sharded over the
  mesh's data axis when a mesh is given (every device encodes a slice),
  with the weights placed by their logical axis names (`param_shardings`);
* zeroing the embeddings at padded positions, so stored embeddings do not
  depend on the padding;
* the encoder as a frozen module of a training step (`frozen_module`), for
  trainers that embed captions on the fly instead of reading stored
  embeddings.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
import dataclasses
import math
from typing import Any

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from muse_jax import sharding


@dataclasses.dataclass(frozen=True)
class EncodedText:
  """Embeddings float32 [N, max_len, dim] (zero at padding), mask bool
  [N, max_len], and how many of the N texts were truncated."""

  embeddings: np.ndarray
  mask: np.ndarray
  num_truncated: int


class TextEncoder(abc.ABC):
  """A frozen text encoder behind Muse's conditioning.

  Subclasses call `__init__` with their tokenizer's pad and end ids, set
  `self.params` (the frozen weights, a pytree passed to the compiled forward
  as an argument, never baked into it), and implement `dim`, `token_ids`
  and `forward`.
  """

  max_len: int
  batch_size: int
  pad_id: int
  end_id: int | None

  def __init__(self, *, max_len: int, batch_size: int, pad_id: int,
               end_id: int | None, mesh: Mesh | None = None,
               rules: sharding.Rules | None = None):
    if max_len < 1 + (end_id is not None):
      raise ValueError(f"text_encoder.max_len={max_len} is too short")
    if batch_size < 1:
      raise ValueError(f"text_encoder.batch_size={batch_size} must be >= 1")
    if mesh is not None and rules is None:
      raise ValueError("a text encoder on a mesh needs its sharding rules")
    self.max_len = max_len
    self.pad_id = pad_id
    self.end_id = end_id
    self.mesh = mesh
    self.rules = rules
    shards = 1 if mesh is None else sharding.data_shards(mesh, rules)
    # Every device gets an equal slice of each batch.
    self.batch_size = math.ceil(batch_size / shards) * shards

  @property
  @abc.abstractmethod
  def dim(self) -> int:
    """Width of the per-token embeddings."""

  @abc.abstractmethod
  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Untruncated token ids of each text, special tokens included."""

  @abc.abstractmethod
  def forward(self, params: Any, ids: jax.Array, mask: jax.Array
              ) -> jax.Array:
    """Hidden states float32 [B, L, dim] of ids/mask [B, L] (jittable)."""

  def tokenize(self, texts: Sequence[str]
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids int32 [N, max_len], mask bool [N, max_len], num truncated)."""
    if isinstance(texts, str):
      raise TypeError("expected a sequence of strings, not a str")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, "
                      "not a str")
    ids = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_len), bool)
    truncated = 0
    for row, seq in enumerate(self.token_ids(texts)):
      if len(seq) > self.max_len:
        truncated += 1
        if self.end_id is not None:
          seq = list(seq[:self.max_len - 1]) + [self.end_id]
        else:
          seq = seq[:self.max_len]
      ids[row, :len(seq)] = seq
      mask[row, :len(seq)] = True
    return ids, mask, truncated

  def encode(self, texts: Sequence[str]) -> EncodedText:
    """Embeds any number of texts ("" is fine), in fixed-size batches."""
    ids, mask, truncated = self.tokenize(texts)
    n = ids.shape[0]
    out = np.zeros((n, self.max_len, self.dim), np.float32)
    bs = self.batch_size
    for start in range(0, n, bs):
      batch_ids, batch_mask = ids[start:start + bs], mask[start:start + bs]
      rows = batch_ids.shape[0]
      if rows < bs:  # One compiled shape: pad the final batch.
        pad = ((0, bs - rows), (0, 0))
        batch_ids = np.pad(batch_ids, pad, constant_values=self.pad_id)
        batch_mask = np.pad(batch_mask, pad, constant_values=False)
      out[start:start + rows] = self._encode_batch(batch_ids,
                                                   batch_mask)[:rows]
    return EncodedText(out, mask, truncated)

  def _encode_batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if not hasattr(self, "_jitted"):
      self._jitted = jax.jit(self._masked_forward)
      if self.mesh is not None:
        self.params = jax.device_put(self.params, self.param_shardings())
    if self.mesh is None:
      return np.asarray(self._jitted(self.params, ids, mask))
    dev_ids, dev_mask = (sharding.shard_host_batch(x, self.mesh, self.rules)
                         for x in (ids, mask))
    with jax.set_mesh(self.mesh):
      return sharding.to_host(self._jitted(self.params, dev_ids, dev_mask))

  def param_shardings(self) -> Any:
    """Where each weight lives on the mesh: by its logical axis names
    through the rules table (so T5-XXL's 4.7B weights shard over the fsdp
    and tensor axes), replicated along axes the rules leave unused."""
    with jax.set_mesh(self.mesh), flax_spmd.logical_axis_rules(self.rules):
      return nnx.get_named_sharding(self.params, self.mesh)

  def _masked_forward(self, params, ids: jax.Array, mask: jax.Array
                      ) -> jax.Array:
    hidden = self.forward(params, ids, mask).astype(jnp.float32)
    return jnp.where(mask[..., None], hidden, 0.0)

  def frozen_module(self) -> FrozenTextEncoder:
    """This encoder as a frozen input of a compiled training step
    (`training.task.Task.frozen`): `(ids, mask) -> float32 [B, L, dim]`,
    zero at padding, no gradient. Its weights are placed by their logical
    axes when the encoder has a mesh, so T5-XXL stays sharded."""
    if self.mesh is not None:
      self.params = jax.device_put(self.params, self.param_shardings())
    return FrozenTextEncoder(self)

  def describe(self) -> dict[str, Any]:
    """JSON facts for stage markers and logs."""
    return {"encoder": type(self).__name__, "dim": self.dim,
            "max_len": self.max_len}


class FrozenTextEncoder(nnx.Module):
  """A text encoder inside a training step: ids/mask -> embeddings.

  The weights are this module's state (so the training loop passes them to
  the compiled step as an argument, never as constants); the encoder object
  (tokenizer, architecture) is static.
  """

  def __init__(self, encoder: TextEncoder):
    self.encoder = nnx.static(encoder)
    self.weights = nnx.data(encoder.params)

  @property
  def dim(self) -> int:
    return self.encoder.dim

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    hidden = self.encoder._masked_forward(self.weights, ids, mask)  # pylint: disable=protected-access
    return jax.lax.stop_gradient(hidden)
