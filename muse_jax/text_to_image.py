"""Text -> images with trained models: encode, decode tokens, detokenize.

`TextToImage` ties a text encoder, the base masked transformer, its VQ
tokenizer and a sampler config together. Requests are cut into fixed-size
batches (one compiled program), each sharded over the mesh's data axis:
every device samples a slice, and the images are gathered to the host.
The same seed gives the same images, whatever the number of devices or
processes.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax.core import spmd as flax_spmd
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models import conditioning
from muse_jax.models import transformer as transformer_lib
from muse_jax.models import vqgan
from muse_jax import sampling
from muse_jax import sharding


class TextToImage:
  """Samples images for prompts (or for precomputed text embeddings)."""

  def __init__(self, vq: vqgan.VQModel,
               transformer: transformer_lib.MaskedTransformer,
               sampler: sampling.SamplerConfig, env, *, batch_size: int,
               text_encoder=None):
    sampler.check_codebook(transformer.cfg.codebook_size)
    self.vq = vq
    self.transformer = transformer
    self.sampler = sampler
    self.env = env
    self.text_encoder = text_encoder
    shards = env.data_shards
    self.batch_size = max(1, -(-batch_size // shards)) * shards
    self._decode = jax.jit(lambda m, t: m.decode_from_indices(t))

  def _put(self, x: np.ndarray) -> jax.Array:
    return sharding.shard_host_batch(x, self.env.mesh, self.env.rules)

  def tokens(self, emb: np.ndarray, mask: np.ndarray, *, seed: int = 0,
             negative: tuple[np.ndarray, np.ndarray] | None = None
             ) -> np.ndarray:
    """Token grids int32 [N, grid, grid] for text embeddings [N, L, D]."""
    n, bs = emb.shape[0], self.batch_size
    grid = self.transformer.cfg.grid_size
    out = []
    with jax.set_mesh(self.env.mesh), flax_spmd.logical_axis_rules(
        self.env.rules):
      for start in range(0, n, bs):
        rows = min(bs, n - start)
        e, m = (_pad_rows(a[start:start + bs], bs) for a in (emb, mask))
        cond = conditioning.Text(self._put(e), self._put(m))
        neg = None
        if negative is not None:
          neg = conditioning.Text(
              self._put(np.broadcast_to(negative[0], e.shape)),
              self._put(np.broadcast_to(negative[1], m.shape)))
        rng = jax.random.fold_in(jax.random.key(seed), start)
        tokens = sampling.sample(self.transformer, rng, cond,
                                 cfg=self.sampler, negative=neg)
        out.append(sharding.to_host(tokens)[:rows])
    return np.concatenate(out).reshape(n, grid, grid)

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    """uint8 images [N, S, S, 3] of token grids [N, grid, grid]."""
    n, bs = tokens.shape[0], self.batch_size
    out = []
    with jax.set_mesh(self.env.mesh):
      for start in range(0, n, bs):
        rows = min(bs, n - start)
        t = self._put(_pad_rows(tokens[start:start + bs], bs))
        out.append(sharding.to_host(self._decode(self.vq, t))[:rows])
    return vqgan.from_unit_range(np.concatenate(out))

  def from_embeddings(self, emb: np.ndarray, mask: np.ndarray, *,
                      seed: int = 0, negative=None) -> np.ndarray:
    return self.decode(self.tokens(emb, mask, seed=seed, negative=negative))

  def __call__(self, prompts: Sequence[str], *, seed: int = 0,
               negative_prompt: str | None = None) -> np.ndarray:
    """uint8 images [N, S, S, 3] for `prompts`."""
    if self.text_encoder is None:
      raise ValueError("TextToImage was built without a text encoder")
    text = self.text_encoder.encode(list(prompts))
    negative = None
    if negative_prompt is not None:
      neg = self.text_encoder.encode([negative_prompt])
      negative = (neg.embeddings[0], neg.mask[0])
    return self.from_embeddings(text.embeddings, text.mask, seed=seed,
                                negative=negative)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  x = np.asarray(x)
  if x.shape[0] == rows:
    return x
  pad = np.repeat(x[-1:], rows - x.shape[0], axis=0)
  return np.concatenate([x, pad])
