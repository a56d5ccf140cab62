"""What the masked transformers cross-attend to: the conditioning context.

A `Context` is a set of key/value vectors in the transformer's width with a
validity mask, plus the rule for its *unconditional* branch: which of its
positions survive when the condition is dropped. Text alone is one context
(every position is dropped: the unconditional branch attends nothing); the
super-res stage concatenates the low-res token encoder's output, which
classifier-free guidance keeps, with the text, which it drops
(`Context.concat`).

The same rule serves training and sampling:

* training drops the condition of ~10% of examples (`Context.drop`), so the
  model learns the unconditional branch the sampler asks for;
* guided sampling runs one forward over `Context.guidance_pair`: the
  conditional rows, then the unconditional (or negative-prompt) rows.

When the unconditional branch attends nothing at all, `guidance_pair` keeps
the keys of the conditional rows only and records `keyed_rows`: the rows
from there on have no valid key, so their cross-attention is a constant
(its output bias) that the transformer writes without computing attention.
That is exact and saves the keys/values and attention of half the batch.

Conditioners turn raw inputs into contexts. `TextConditioner` projects the
frozen text encoder's per-token embeddings into the transformer width
(Muse's linear projection, then a LayerNorm).
"""

from __future__ import annotations

from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp

from muse_jax import sharding
from muse_jax.models import layers


@flax.struct.dataclass
class Text:
  """Raw text condition: a frozen encoder's per-token embeddings.

  embeddings: [B, L, text_dim]; mask: bool [B, L], True at real tokens.
  """

  embeddings: jax.Array
  mask: jax.Array

  @property
  def batch_size(self) -> int:
    return self.embeddings.shape[0]


@flax.struct.dataclass
class Context:
  """Keys/values source [B, S, D] + mask, and its unconditional rule.

  Attributes:
    embeddings: [B, S, D] in the transformer's width.
    mask: bool [B, S], the positions attended.
    keep_unconditional: bool [B, S] or None. The positions the
      unconditional branch keeps (e.g. super-res low-res tokens); None
      means none are kept, so the unconditional branch attends nothing.
    keyed_rows: static; when set, the batch has `keyed_rows` more rows than
      `embeddings` (which holds only the first `keyed_rows`), and the rows
      after them attend nothing (see the module docstring).
  """

  embeddings: jax.Array
  mask: jax.Array
  keep_unconditional: jax.Array | None = None
  keyed_rows: int | None = flax.struct.field(pytree_node=False,
                                             default=None)

  @property
  def batch_size(self) -> int:
    """Rows of the transformer batch this context conditions."""
    n = self.embeddings.shape[0]
    return 2 * n if self.keyed_rows is not None else n

  def _unconditional_mask(self) -> jax.Array:
    if self.keep_unconditional is None:
      return jnp.zeros_like(self.mask)
    return self.mask & self.keep_unconditional

  def drop(self, keep_rows: jax.Array) -> Context:
    """Rows where `keep_rows` [B] is False become unconditional."""
    self._check_unpaired("drop")
    mask = jnp.where(keep_rows[:, None], self.mask,
                     self._unconditional_mask())
    return self.replace(mask=mask)

  def unconditional(self) -> Context:
    """The unconditional branch of every row."""
    self._check_unpaired("unconditional")
    return self.replace(mask=self._unconditional_mask())

  def guidance_pair(self, negative: Context | None = None) -> Context:
    """[conditional; unconditional] rows (batch 2B) for guided sampling.

    With a `negative` context (a negative prompt, encoded like the prompt)
    its rows replace the unconditional ones.
    """
    self._check_unpaired("guidance_pair")
    if negative is not None:
      if negative.embeddings.shape != self.embeddings.shape:
        raise ValueError(
            f"negative context {negative.embeddings.shape} does not match "
            f"the context {self.embeddings.shape}")
      return concat_rows(self, negative)
    if self.keep_unconditional is None:
      return self.replace(keyed_rows=self.embeddings.shape[0])
    return concat_rows(self, self.unconditional())

  def _check_unpaired(self, what: str) -> None:
    if self.keyed_rows is not None:
      raise ValueError(f"Context.{what}: this context is already a guidance "
                       "pair")


def concat_rows(a: Context, b: Context) -> Context:
  """Rows of `a` then rows of `b` (the same positions)."""
  keep = None
  if a.keep_unconditional is not None or b.keep_unconditional is not None:
    keep = jnp.concatenate([_keep(a), _keep(b)], axis=0)
  return Context(jnp.concatenate([a.embeddings, b.embeddings], axis=0),
                 jnp.concatenate([a.mask, b.mask], axis=0), keep)


def concat(*contexts: Context) -> Context:
  """Positions of each context after one another (e.g. low-res + text)."""
  if any(c.keyed_rows is not None for c in contexts):
    raise ValueError("concat: guidance pairs cannot be concatenated")
  keep = None
  if any(c.keep_unconditional is not None for c in contexts):
    keep = jnp.concatenate([_keep(c) for c in contexts], axis=1)
  return Context(jnp.concatenate([c.embeddings for c in contexts], axis=1),
                 jnp.concatenate([c.mask for c in contexts], axis=1), keep)


def _keep(c: Context) -> jax.Array:
  if c.keep_unconditional is None:
    return jnp.zeros_like(c.mask)
  return c.keep_unconditional


class TextConditioner(nnx.Module):
  """Text embeddings [B, L, text_dim] -> Context [B, L, width].

  Muse's linear projection of the frozen encoder's outputs, followed by a
  LayerNorm; the whole text is dropped in the unconditional branch.
  """

  def __init__(self, text_dim: int, width: int, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               matmul_impl: str = "plain"):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.text_dim = text_dim
    self.proj = layers.Einsum(
        "bld,de->ble", (text_dim, width), ("text_embed", "embed"), rngs=rngs,
        use_bias=True, impl=matmul_impl, **kw)
    self.norm = layers.LayerNorm(width, rngs=rngs, **kw)

  def __call__(self, text: Text) -> Context:
    if text.embeddings.shape[-1] != self.text_dim:
      raise ValueError(
          f"text embeddings have width {text.embeddings.shape[-1]}, the "
          f"model was built for text_dim={self.text_dim}")
    x = self.norm(self.proj(text.embeddings))
    x = sharding.constrain(x, ("batch", "text_length", "act_embed"))
    return Context(x, text.mask.astype(bool))
