"""A masked transformer that records its inputs, for decoder tests.

`RecordingTransformer.calls` collects the tokens every forward pass
receives (through a debug callback, so it works inside jit and scan);
tests clear it, decode, then read what each step saw.
"""

from flax import nnx
import jax
import numpy as np

from muse_jax.models import transformer as tr


class RecordingTransformer(tr.MaskedTransformer):
  """Reports the tokens each forward pass receives."""

  calls: list[np.ndarray] = []

  def features(self, tokens, kv):
    jax.debug.callback(
        lambda t: RecordingTransformer.calls.append(np.asarray(t)), tokens)
    return super().features(tokens, kv)


def make(cfg: tr.TransformerConfig, cls=tr.MaskedTransformer, seed=0):
  """An unsharded model of `cls` (e.g. `RecordingTransformer`)."""
  with nnx.use_eager_sharding(False):
    return cls(cfg, rngs=nnx.Rngs(seed))
